"""Account PII at rest: how the email is stored, with or without a data key.

Without ``[crypto]`` the ``accounts.email`` column holds the normalised address, as
it always did. With a keyring (crypto.Keyring) it holds the address's *blind index*,
``bi1:`` + hex HMAC-SHA256, and ``email_sealed`` holds the AES-GCM ciphertext: the
UNIQUE constraint, ``WHERE email = ?`` lookups (login, reset) and their index keep
working on a value that reveals nothing without the key. During a key rotation a
lookup tries the index under each key the keyring holds (``email IN (?, ?)``).

The outbox's recipient and body are sealed the same way (``sealed:`` + base64), so
no address reaches the data directory in clear, not even for the seconds a message
waits: a deleted row's bytes linger in SQLite's free pages and WAL.

``check`` runs at start: encrypted rows without a key, or a key that opens none of
them, stop the start (KeyringError) instead of serving garbage; rows stored in clear
before encryption was turned on are sealed then (``seal_clear``).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable

from flintproxy.crypto import Keyring
from flintproxy.errors import KeyringError
from flintproxy.store.db import Database

__all__ = ["EV_KEYRING", "PiiCodec", "reseal_outbox"]

log = logging.getLogger("flintproxy.store.pii")

# The change event ``flintproxy admin rotate-key`` writes: servers reload the key file.
EV_KEYRING = "keyring_changed"

INDEX_PREFIX = "bi1:"
SEALED_PREFIX = "sealed:"
COLUMN = "accounts.email"
BATCH = 500


class PiiCodec:
    """The email's stored forms under an optional keyring (swappable on rotation)."""

    def __init__(self, keyring: Keyring | None = None) -> None:
        self.keyring = keyring

    def reloader(self, load: Callable[[], Keyring | None]) -> Callable[
            [str, int | None, int | None], None]:
        """A change-feed subscriber that swaps in ``load()`` on a keyring event; a key
        file that does not load keeps the keyring in use (and says so)."""
        def on_change(kind: str, account_id: int | None, key_id: int | None) -> None:
            if kind != EV_KEYRING:
                return
            try:
                keyring = load()
            except KeyringError as exc:
                log.error("data key not reloaded, keeping the one in use: %s", exc)
                return
            if keyring is not None:
                self.keyring = keyring
                log.info("data keyring reloaded: %d keys", len(keyring.keys))
        return on_change

    def lookups(self, email: str) -> tuple[str, ...]:
        """The ``email`` column values that mean this address."""
        if self.keyring is None:
            return (email,)
        return tuple(INDEX_PREFIX + i.hex() for i in self.keyring.indexes(email))

    def stored(self, email: str) -> tuple[str, bytes | None]:
        """(the ``email`` column, ``email_sealed``) for a new or changed address."""
        if self.keyring is None:
            return email, None
        return (INDEX_PREFIX + self.keyring.index(email).hex(),
                self.keyring.seal(email, COLUMN))

    def reveal(self, column: str | None, sealed: bytes | None) -> str | None:
        if sealed is None:
            if column is not None and column.startswith(INDEX_PREFIX):
                raise KeyringError(f"{COLUMN}: an index without its sealed value")
            return column
        if self.keyring is None:
            raise KeyringError(f"{COLUMN} is encrypted and no [crypto] key is configured")
        return self.keyring.open(bytes(sealed), COLUMN)

    def seal_text(self, text: str, column: str) -> str:
        """A text column's stored form (the outbox): sealed when there is a key."""
        if self.keyring is None:
            return text
        return SEALED_PREFIX + base64.b64encode(self.keyring.seal(text, column)).decode()

    def open_text(self, stored: str, column: str) -> str:
        if not stored.startswith(SEALED_PREFIX):
            return stored
        if self.keyring is None:
            raise KeyringError(f"{column} is encrypted and no [crypto] key is configured")
        return self.keyring.open(base64.b64decode(stored[len(SEALED_PREFIX):]), column)

    async def check(self, db: Database) -> int:
        """The start-up check (see the module's docstring); returns rows sealed now."""
        row = await db.fetchrow("SELECT email, email_sealed FROM accounts "
                                "WHERE email_sealed IS NOT NULL LIMIT 1")
        if row is not None:
            if self.keyring is None:
                raise KeyringError("account data is encrypted but [crypto] names no key "
                                   "(set crypto.key_env or crypto.key_file)")
            try:
                self.reveal(row[0], row[1])
            except KeyringError:
                raise KeyringError("the configured [crypto] key is not the one the account "
                                   "data was encrypted with; refusing to start") from None
        return await self.seal_clear(db) if self.keyring is not None else 0

    async def seal_clear(self, db: Database) -> int:
        """Seal, under the current key, every email stored in clear or under an older
        key (encryption turned on, or a rotation); batches of BATCH rows."""
        assert self.keyring is not None
        done = 0
        after = 0
        while True:
            async with db.transaction() as q:
                rows = await q.fetch("SELECT id, email, email_sealed FROM accounts "
                                     "WHERE id > ? AND email IS NOT NULL ORDER BY id LIMIT ?",
                                     after, BATCH)
                for account_id, column, sealed in rows:
                    if sealed is not None and self.keyring.is_current(bytes(sealed)):
                        continue
                    email = self.reveal(column, sealed)
                    assert email is not None
                    new_column, new_sealed = self.stored(email)
                    await q.execute("UPDATE accounts SET email = ?, email_sealed = ? "
                                    "WHERE id = ?", new_column, new_sealed, account_id)
                    done += 1
            if len(rows) < BATCH:
                return done
            after = int(rows[-1][0])


async def reseal_outbox(db: Database, pii: PiiCodec) -> int:
    """Seal every queued message's recipient and body under the current key."""
    assert pii.keyring is not None
    done = 0
    async with db.transaction() as q:
        for mail_id, recipient, body in await q.fetch(
                "SELECT id, recipient, body FROM email_outbox"):
            await q.execute(
                "UPDATE email_outbox SET recipient = ?, body = ? WHERE id = ?",
                pii.seal_text(pii.open_text(recipient, "email_outbox.recipient"),
                              "email_outbox.recipient"),
                pii.seal_text(pii.open_text(body, "email_outbox.body"), "email_outbox.body"),
                mail_id)
            done += 1
    return done
