"""Accounts, API keys and login sessions, on either store engine (no ORM).

Privacy rules this module enforces (CONTRACT.md promises 1, 2, 6, 7):

* an account holds an email and a bcrypt hash, nothing else personal; deleting it
  erases both at once and revokes every key and session in the same transaction;
* API keys and session cookies are stored only as SHA-256 digests, so neither the
  database nor its WAL ever holds a usable secret;
* bcrypt runs in the default thread pool, never on the event loop.

Every change another process must see (key revoked, account disabled, credit...)
writes an ``events`` row in the same transaction as the change itself (and, on
PostgreSQL, a ``pg_notify`` that commits with it); servers poll that table and
listen (``store.changes.ChangeWatcher``) and drop what they cached. That is how
``flintproxy admin`` or another node reaches a running server, within one second.

Why one module of this size: every method is one transaction on the same connection,
under the same lock, writing the same events; split by entity (accounts, keys,
sessions), each part would need all three, and the change feed's guarantee (a change
and its event commit together) would live in several places.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import unicodedata
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import bcrypt
import orjson

from flintproxy.config import Config, usd_to_nano
from flintproxy.errors import AuthenticationError, BadRequest, Conflict, NotFound, PermissionDenied
from flintproxy.money import NANO_PER_USD, format_usd
from flintproxy.store import caps as key_caps
from flintproxy.store import entries
from flintproxy.store.db import Database, Dialect, Queries
from flintproxy.store.entries import Reason
from flintproxy.store.pii import PiiCodec
from flintproxy.store.postgres import CHANNEL
from flintproxy.store.sqlite import now_ms

# events.kind values; subscribers of store.changes.ChangeWatcher receive these.
EV_ACCOUNT_CREATED = "account_created"
EV_ACCOUNT_DISABLED = "account_disabled"
EV_ACCOUNT_ENABLED = "account_enabled"
EV_ACCOUNT_DELETED = "account_deleted"
EV_EMAIL_CHANGED = "email_changed"
EV_PASSWORD_CHANGED = "password_changed"  # noqa: S105 (an event name)
EV_CREDIT = "credit"
EV_KEY_CREATED = "key_created"
EV_KEY_REVOKED = "key_revoked"
EV_LIMITS = "limits_changed"
EV_KEY_CAPS = "key_caps_changed"  # a key's spend caps (store.caps)

KEY_PREFIX = "sk-flint-"
KEY_RANDOM_CHARS = 40  # 40 base62 characters: ~238 bits
KEY_DISPLAY_CHARS = 4  # random characters kept (with the prefix) for display
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_RE = re.compile(r"sk-flint-[0-9A-Za-z]{32,128}")

MAX_EMAIL_CHARS = 254
MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_BYTES = 72  # bcrypt ignores everything past 72 bytes: refuse, never truncate
MAX_KEY_NAME_CHARS = 64
MAX_ALLOWED_MODELS = 100
SESSION_TOKEN_BYTES = 32  # 256 random bits
MAX_LIVE_KEYS = 100  # per account
MAX_SESSIONS = 20  # per account; logging in again ends the oldest

# A pragmatic address check (ASCII; dotted domain with a TLD) rather than RFC 5322.
_LOCAL = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
EMAIL_RE = re.compile(rf"{_LOCAL}@{_LABEL}(?:\.{_LABEL})*\.[a-z]{{2,63}}")

Notify = Callable[[int, str, int | None, int | None], None]
# Run inside a change's transaction, after it (``store.operators``: the audit row
# commits with the operator's change, or neither does).
Also = Callable[[Queries], Awaitable[None]]
Event = tuple[int, str, int | None, int | None]  # (id, kind, account_id, key_id)


def hash_key(token: str) -> bytes:
    """SHA-256 of an API key: the only form in which keys are stored or cached."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()




# --- validation -------------------------------------------------------------------


def normalize_email(raw: object, field: str = "email") -> str:
    """Strip, lowercase and validate an email address; BadRequest when unusable."""
    if not isinstance(raw, str) or not raw.strip():
        raise BadRequest(f"'{field}' is required and must be a string.", param=field)
    email = raw.strip().lower()
    if len(email) > MAX_EMAIL_CHARS:
        raise BadRequest(f"'{field}' is longer than {MAX_EMAIL_CHARS} characters.", param=field)
    local, _, _ = email.partition("@")
    if len(local) > 64 or not EMAIL_RE.fullmatch(email):
        raise BadRequest(f"'{field}' is not a valid email address.", param=field)
    return email


def _password_bytes(raw: object, field: str) -> bytes:
    if not isinstance(raw, str) or not raw:
        raise BadRequest(f"'{field}' is required and must be a string.", param=field)
    if "\x00" in raw:
        raise BadRequest(f"'{field}' must not contain NUL characters.", param=field)
    # NFKC (NIST SP 800-63B) so the same password typed on another keyboard matches.
    data = unicodedata.normalize("NFKC", raw).encode("utf-8", "surrogateescape")
    if len(data) > MAX_PASSWORD_BYTES:
        raise BadRequest(
            f"'{field}' is {len(data)} bytes long in UTF-8; the maximum is "
            f"{MAX_PASSWORD_BYTES} bytes (a bcrypt limit; longer passwords are not truncated).",
            param=field, code="password_too_long")
    return data


def new_password(raw: object, field: str = "password") -> bytes:
    """Validate a password being set: 10 characters .. 72 UTF-8 bytes, no NUL."""
    data = _password_bytes(raw, field)
    if len(data.decode("utf-8", "surrogateescape")) < MIN_PASSWORD_CHARS:
        raise BadRequest(f"'{field}' must be at least {MIN_PASSWORD_CHARS} characters long.",
                         param=field, code="password_too_short")
    return data


def given_password(raw: object, field: str = "password") -> bytes:
    """A password offered for verification (no minimum: only the hash decides)."""
    return _password_bytes(raw, field)


def key_name(raw: object) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise BadRequest("'name' must be a string.", param="name")
    name = unicodedata.normalize("NFC", raw.strip())
    if len(name) > MAX_KEY_NAME_CHARS:
        raise BadRequest(f"'name' is longer than {MAX_KEY_NAME_CHARS} characters.", param="name")
    if any(unicodedata.category(c)[0] == "C" for c in name):
        raise BadRequest("'name' must not contain control or format characters.", param="name")
    return name


def model_list(raw: object, known: Iterable[str]) -> tuple[str, ...] | None:
    """Validate an allow-list against the configured models; None means all models."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
        raise BadRequest("'allowed_models' must be a list of model names.", param="allowed_models")
    if not raw or len(raw) > MAX_ALLOWED_MODELS:
        raise BadRequest(f"'allowed_models' must hold 1 to {MAX_ALLOWED_MODELS} models.",
                         param="allowed_models")
    known_set = set(known)
    for m in raw:
        if m not in known_set:
            raise BadRequest(f"'allowed_models' names an unknown model: {m[:100]!r}.",
                             param="allowed_models")
    return tuple(sorted(set(raw)))


def parse_usd(text: str) -> int:
    """A positive USD amount as nano-dollars (exact; raises BadRequest)."""
    try:
        nano = usd_to_nano(text.strip(), "amount")
    except ValueError as exc:
        raise BadRequest(f"invalid amount {text!r}: {str(exc).split(': ', 2)[-1]}") from None
    if nano <= 0 or nano > 10**9 * NANO_PER_USD:
        raise BadRequest(f"invalid amount {text!r}: must be > 0 and at most 1e9 USD")
    return nano


def new_api_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(BASE62) for _ in range(KEY_RANDOM_CHARS))


def session_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


# --- passwords (thread pool) ------------------------------------------------------


async def hash_password(password: bytes, cost: int) -> str:
    loop = asyncio.get_running_loop()
    digest = await loop.run_in_executor(None, _hashpw, password, cost)
    return digest.decode("ascii")


def _hashpw(password: bytes, cost: int) -> bytes:
    return bcrypt.hashpw(password, bcrypt.gensalt(cost))


async def check_password(password: bytes, stored: str) -> bool:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, _checkpw, password, stored.encode("ascii"))


def _checkpw(password: bytes, stored: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, stored)
    except ValueError:  # a malformed stored hash never matches
        return False


# --- records ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountInfo:
    id: int
    email: str | None
    status: str
    created_at: int
    balance_nano: int
    credited_nano: int
    charged_nano: int

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "email": self.email, "status": self.status,
                "created_at": self.created_at // 1000,
                "balance_usd": format_usd(self.balance_nano), "balance_nano": self.balance_nano}


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: int
    account_id: int
    prefix: str
    last4: str
    name: str
    created_at: int
    last_used_at: int | None
    expires_at: int | None
    revoked_at: int | None
    allowed_models: tuple[str, ...] | None

    def as_json(self) -> dict[str, Any]:
        def secs(ms: int | None) -> int | None:
            return None if ms is None else ms // 1000

        return {"id": self.id, "name": self.name, "display": f"{self.prefix}...{self.last4}",
                "prefix": self.prefix, "last4": self.last4,
                "created_at": secs(self.created_at), "last_used_at": secs(self.last_used_at),
                "expires_at": secs(self.expires_at), "revoked_at": secs(self.revoked_at),
                "allowed_models": None if self.allowed_models is None
                else list(self.allowed_models)}


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What authentication needs of a key row and its account (``Accounts.find_key``)."""

    key_id: int
    account_id: int
    expires_at: int | None  # unix ms
    revoked: bool
    allowed_models: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    account_status: str  # "active" | "disabled" | "deleted"
    account_limits: tuple[int | None, int | None, int | None]
    # Spend caps (day, month) in nano-USD, None each when not set (store.caps).
    caps: tuple[int | None, int | None] = (None, None)


@dataclass(frozen=True, slots=True)
class Session:
    token_hash: bytes
    account_id: int
    csrf_token: str
    expires_at: int
    disabled: bool = False  # the account is disabled (read and data rights only)


_ACCOUNT_COLS = ("id, email, status, created_at, balance_nano, credited_nano, charged_nano, "
                 "email_sealed")
_KEY_COLS = ("id, account_id, prefix, last4, name, created_at, last_used_at, expires_at, "
             "revoked_at, allowed_models")


def _key(row: Any) -> KeyInfo:
    models = None if row[9] is None else tuple(orjson.loads(row[9]))
    return KeyInfo(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                   models)


# --- the repository ---------------------------------------------------------------


class Accounts:
    """SQL for accounts, keys and sessions on one ``Database`` (either engine).

    Every method is one transaction (``Database.transaction``).
    ``notify(event_id, kind, account_id, key_id)`` is called after each committed
    change so this process reacts at once.
    """

    def __init__(self, db: Database, bcrypt_cost: int, session_ttl_s: int,
                 *, notify: Notify | None = None, clock: Callable[[], int] = now_ms,
                 pii: PiiCodec | None = None) -> None:
        self.db = db
        # How the email is stored: in clear, or sealed with a blind index (store.pii).
        self.pii = pii or PiiCodec()
        self.bcrypt_cost = bcrypt_cost
        self.session_ttl_s = session_ttl_s
        self.notify = notify
        self.clock = clock
        self._notify_sql = ("SELECT pg_notify(?, ?)" if db.dialect is Dialect.POSTGRESQL
                            else None)
        # At most this many bcrypt jobs in the thread pool at once: a login flood then
        # waits here, as cheap coroutines, instead of occupying every pool thread
        # (the pool also serves DNS lookups for upstream connections).
        self._bcrypt_slots = asyncio.Semaphore(max(2, os.cpu_count() or 2))
        self._dummy_hash: str | None = None

    def transaction(self) -> AbstractAsyncContextManager[Queries]:
        """A transaction on the accounts database (``Database.transaction``)."""
        return self.db.transaction()

    async def _event(self, db: Queries, kind: str, account_id: int | None,
                     key_id: int | None = None) -> tuple[int, str, int | None, int | None]:
        event_id = int(await db.fetchval(
            "INSERT INTO events (kind, account_id, key_id, created_at) VALUES (?, ?, ?, ?) "
            "RETURNING id", kind, account_id, key_id, self.clock()))
        if self._notify_sql is not None:
            # Delivered to every listening node when (and only if) this commits.
            await db.fetchval(self._notify_sql, CHANNEL, str(event_id))
        return (event_id, kind, account_id, key_id)

    async def _hash(self, password: bytes) -> str:
        async with self._bcrypt_slots:
            return await hash_password(password, self.bcrypt_cost)

    async def _check(self, password: bytes, stored: str) -> bool:
        async with self._bcrypt_slots:
            return await check_password(password, stored)

    def _publish(self, *events: tuple[int, str, int | None, int | None]) -> None:
        if self.notify is not None:
            for ev in events:
                self.notify(*ev)

    # The change-feed seam for sibling repositories (``store.operators``): their
    # changes commit with their event, and are published, exactly as these are.
    record_event = _event

    async def warm(self) -> None:
        """Compute the dummy hash now so the first unknown-email login is not slower."""
        if self._dummy_hash is None:
            self._dummy_hash = await self._hash(secrets.token_bytes(16).hex().encode())

    # accounts ------------------------------------------------------------------------

    async def create_account(self, email: str, password: bytes | None) -> int:
        pw_hash = None if password is None else await self._hash(password)
        try:
            async with self.transaction() as db:
                account_id = int(await db.fetchval(
                    "INSERT INTO accounts (email, email_sealed, password_hash, created_at) "
                    "VALUES (?, ?, ?, ?) RETURNING id", *self.pii.stored(email), pw_hash,
                    self.clock()))
                ev = await self._event(db, EV_ACCOUNT_CREATED, account_id)
        except Conflict:
            raise Conflict("An account with this email already exists.", param="email",
                           code="email_taken") from None
        self._publish(ev)
        return account_id

    async def get(self, account_id: int) -> AccountInfo:
        row = await self.db.fetchrow(f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE id = ?",  # noqa: S608
                                     account_id)
        if row is None:
            raise NotFound("No such account.")
        return self._info(row)

    def _info(self, row: Any) -> AccountInfo:
        return AccountInfo(row[0], self.pii.reveal(row[1], row[7]), *row[2:7])

    def email_is(self, email: str) -> tuple[str, list[str]]:
        """``email IN (...)`` and its arguments: the address under every key held."""
        keys = list(self.pii.lookups(email))
        return "email IN (" + ", ".join("?" * len(keys)) + ")", keys

    async def by_email(self, email: str) -> AccountInfo:
        where, args = self.email_is(email)
        row = await self.db.fetchrow(f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE {where}",  # noqa: S608
                                     *args)
        if row is None:
            raise NotFound(f"No account with email {email!r}.")
        return self._info(row)

    async def list_accounts(self) -> list[tuple[AccountInfo, int]]:
        """Every account with its count of live (unrevoked) keys."""
        sql = (f"SELECT {_ACCOUNT_COLS}, (SELECT COUNT(*) FROM api_keys k WHERE "  # noqa: S608
               "k.account_id = accounts.id AND k.revoked_at IS NULL) FROM accounts ORDER BY id")
        rows = await self.db.fetch(sql)
        return [(self._info(r[:8]), int(r[8])) for r in rows]

    async def verify_login(self, email: str, password: bytes) -> int:
        """The account id for a correct email + password, else the same 401 either way;
        403 for the right password of a disabled account.

        An unknown email is checked against a dummy hash of the same cost, so both
        answers take one bcrypt verification.
        """
        where, args = self.email_is(email)
        row = await self.db.fetchrow(
            f"SELECT id, password_hash, status FROM accounts WHERE {where}", *args)  # noqa: S608
        if row is not None and row[1] is not None:
            if await self._check(password, row[1]):
                if row[2] == "disabled":  # told only to who knows the password
                    raise PermissionDenied("This account is disabled.", code="account_disabled")
                return int(row[0])
        else:
            await self.warm()
            assert self._dummy_hash is not None
            await self._check(password, self._dummy_hash)
        raise AuthenticationError("Incorrect email or password.", code="invalid_credentials")

    async def check_password_of(self, account_id: int, password: bytes) -> None:
        """Confirm a logged-in user's password before a sensitive change (else 401)."""
        row = await self.db.fetchrow("SELECT password_hash FROM accounts WHERE id = ? AND "
                                     "status != 'deleted'", account_id)
        if row is None:
            raise AuthenticationError("This account no longer exists.", code="invalid_session")
        if row[0] is None or not await self._check(password, row[0]):
            raise AuthenticationError("Incorrect password.", param="password",
                                      code="invalid_credentials")

    async def change_email(self, account_id: int, new_email: str) -> None:
        try:
            async with self.transaction() as db:
                await db.execute("UPDATE accounts SET email = ?, email_sealed = ? WHERE id = ?",
                                 *self.pii.stored(new_email), account_id)
                ev = await self._event(db, EV_EMAIL_CHANGED, account_id)
        except Conflict:
            raise Conflict("An account with this email already exists.", param="new_email",
                           code="email_taken") from None
        self._publish(ev)

    async def set_password(self, account_id: int, new: bytes, keep_session: bytes | None) -> None:
        """Set a new password and end every session but ``keep_session`` (a token hash)."""
        pw_hash = await self._hash(new)
        async with self.transaction() as db:
            await db.execute("UPDATE accounts SET password_hash = ? WHERE id = ?",
                             pw_hash, account_id)
            await db.execute("DELETE FROM sessions WHERE account_id = ? AND "
                             "token_hash IS DISTINCT FROM ?", account_id, keep_session)
            ev = await self._event(db, EV_PASSWORD_CHANGED, account_id)
        self._publish(ev)

    async def delete_account(self, account_id: int) -> None:
        """Close the account: erase email and hash, revoke all keys, end all sessions.

        Usage rows stay (they carry no personal data) until the retention job.
        """
        now = self.clock()
        async with self.transaction() as db:
            changed = await db.execute(
                "UPDATE accounts SET status = 'deleted', email = NULL, email_sealed = NULL, "
                "password_hash = NULL, "
                "deleted_at = ? WHERE id = ? AND status != 'deleted'", now, account_id)
            if changed == 0:
                raise NotFound("No such account.")
            # Key names are free text a user chose: erase them with the account.
            await db.execute("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?), "
                             "name = '' WHERE account_id = ?", now, account_id)
            await db.execute("DELETE FROM sessions WHERE account_id = ?", account_id)
            ev = await self._event(db, EV_ACCOUNT_DELETED, account_id)
        self._publish(ev)

    async def set_status(self, account_id: int, status: str, *,
                         also: Also | None = None) -> bool:
        """'active' or 'disabled'; False when it already was (or is deleted)."""
        kind = EV_ACCOUNT_DISABLED if status == "disabled" else EV_ACCOUNT_ENABLED
        async with self.transaction() as db:
            changed = await db.execute(
                "UPDATE accounts SET status = ? WHERE id = ? AND status NOT IN (?, 'deleted')",
                status, account_id, status)
            if changed == 0:
                return False
            ev = await self._event(db, kind, account_id)
            if also is not None:
                await also(db)
        self._publish(ev)
        return True

    async def credit(self, account_id: int, amount_nano: int, *,
                     also: Also | None = None) -> int:
        """Add funds; returns the new balance. Credits row + event in one transaction."""
        if amount_nano <= 0:
            raise BadRequest("A credit must be positive.")
        async with self.transaction() as db:
            balance, ev = await self.credit_in(db, account_id, amount_nano, Reason.CREDIT,
                                               "operator")
            if also is not None:
                await also(db)
        self._publish(ev)
        return balance

    async def credit_in(self, db: Queries, account_id: int, amount_nano: int, reason: Reason,
                        actor: str) -> tuple[int, Event]:
        """A balance change and its ledger entry and event inside the caller's
        transaction (a redemption, a top-up); ``publish`` the event once committed."""
        balance = await entries.apply(db, account_id, amount_nano, reason, actor,
                                      self.clock())
        return balance, await self._event(db, EV_CREDIT, account_id)

    async def announce(self, kind: str) -> None:
        """Tell every running server of a change no row carries (a new data key)."""
        async with self.transaction() as db:
            ev = await self._event(db, kind, None)
        self._publish(ev)

    def publish(self, *events: Event) -> None:
        """Tell this process of committed changes (``notify``) at once."""
        self._publish(*events)

    # keys ----------------------------------------------------------------------------

    async def create_key(self, account_id: int, name: str = "", *,
                         expires_at: int | None = None,
                         allowed_models: tuple[str, ...] | None = None,
                         caps: tuple[int | None, int | None] = (None, None)
                         ) -> tuple[KeyInfo, str]:
        """A new key: (its record, the plaintext). The plaintext is never stored.
        ``caps``: its spend caps per UTC day and month, nano-USD (``store.caps``)."""
        key = new_api_key()
        prefix = key[:len(KEY_PREFIX) + KEY_DISPLAY_CHARS]
        models = None if allowed_models is None else orjson.dumps(list(allowed_models)).decode()
        now = self.clock()
        async with self.transaction() as db:
            row = await db.fetchrow("SELECT status FROM accounts WHERE id = ?", account_id)
            if row is None or row[0] == "deleted":
                raise NotFound("No such account.")
            if row[0] == "disabled":
                raise PermissionDenied("This account is disabled.", code="account_disabled")
            live = await db.fetchval("SELECT COUNT(*) FROM api_keys WHERE account_id = ? AND "
                                     "revoked_at IS NULL", account_id)
            if live is not None and live >= MAX_LIVE_KEYS:
                raise Conflict(f"An account may have at most {MAX_LIVE_KEYS} active keys; "
                               "revoke one first.", code="too_many_keys")
            key_id = int(await db.fetchval(
                "INSERT INTO api_keys (account_id, key_hash, prefix, last4, name, created_at, "
                "expires_at, allowed_models, cap_day_nano, cap_month_nano) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                account_id, hash_key(key), prefix, key[-4:], name, now, expires_at, models,
                *caps))
            ev = await self._event(db, EV_KEY_CREATED, account_id, key_id)
        self._publish(ev)
        info = KeyInfo(key_id, account_id, prefix, key[-4:], name, now, None, expires_at, None,
                       allowed_models)
        return info, key

    async def find_key(self, key_hash: bytes) -> KeyRecord | None:
        """The key with this SHA-256 and its account's status and limits (a cache miss)."""
        row = await self.db.fetchrow(
            "SELECT k.id, k.account_id, k.expires_at, k.revoked_at, k.allowed_models, "
            "k.rpm, k.tpm, k.max_concurrent, a.status, a.rpm, a.tpm, a.max_concurrent, "
            "k.cap_day_nano, k.cap_month_nano "
            "FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.key_hash = ?",
            key_hash)
        if row is None:
            return None
        return KeyRecord(
            key_id=int(row[0]), account_id=int(row[1]), expires_at=row[2],
            revoked=row[3] is not None,
            allowed_models=None if row[4] is None else frozenset(orjson.loads(row[4])),
            rpm=row[5], tpm=row[6], max_concurrent=row[7], account_status=row[8],
            account_limits=(row[9], row[10], row[11]), caps=(row[12], row[13]))

    async def mark_keys_used(self, used: dict[int, int]) -> None:
        """Record last_used_at (unix ms) per key id; an older mark never overwrites."""
        async with self.transaction() as db:
            await db.executemany(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ? AND "
                "(last_used_at IS NULL OR last_used_at < ?)",
                [(ts, kid, ts) for kid, ts in used.items()])

    async def list_keys(self, account_id: int) -> list[KeyInfo]:
        sql = f"SELECT {_KEY_COLS} FROM api_keys WHERE account_id = ? ORDER BY id"  # noqa: S608
        return [_key(r) for r in await self.db.fetch(sql, account_id)]

    async def revoke_key(self, key_id: int, account_id: int | None = None, *,
                         also: Also | None = None) -> bool:
        """Revoke a key (only the account's own when ``account_id`` is given).

        Returns False when it was already revoked; NotFound when there is no such key.
        """
        async with self.transaction() as db:
            row = await db.fetchrow("SELECT account_id, revoked_at FROM api_keys WHERE id = ?",
                                    key_id)
            if row is None or (account_id is not None and row[0] != account_id):
                raise NotFound(f"No API key with id {key_id}.")
            if row[1] is not None:
                return False
            await db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?",
                             self.clock(), key_id)
            ev = await self._event(db, EV_KEY_REVOKED, int(row[0]), key_id)
            if also is not None:
                await also(db)
        self._publish(ev)
        return True

    async def set_limits(self, account_id: int, key_id: int | None,
                         rpm: int | None, tpm: int | None, max_concurrent: int | None, *,
                         also: Also | None = None) -> None:
        """Override rate limits of an account (all its keys together) or of one key.

        None means "the configured default"; takes effect on running servers
        through the events table like every other change.
        """
        for name, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)):
            if value is not None and value < 1:
                raise BadRequest(f"'{name}' must be a positive integer.", param=name)
        async with self.transaction() as db:
            if key_id is None:
                changed = await db.execute(
                    "UPDATE accounts SET rpm = ?, tpm = ?, max_concurrent = ? WHERE id = ?",
                    rpm, tpm, max_concurrent, account_id)
            else:
                changed = await db.execute(
                    "UPDATE api_keys SET rpm = ?, tpm = ?, max_concurrent = ? "
                    "WHERE id = ? AND account_id = ?",
                    rpm, tpm, max_concurrent, key_id, account_id)
            if changed != 1:
                raise NotFound("No such account or key.")
            ev = await self._event(db, EV_LIMITS, account_id, key_id)
            if also is not None:
                await also(db)
        self._publish(ev)

    async def set_key_caps(self, key_id: int, account_id: int | None,
                           caps: dict[str, int | None], *, also: Also | None = None) -> int:
        """Set a key's spend caps (``store.caps.set_caps``: "day"/"month" in nano-USD,
        None: no cap) with its event, in one transaction; returns the key's account."""
        async with self.transaction() as db:
            owner = await key_caps.set_caps(db, key_id, account_id, caps)
            ev = await self._event(db, EV_KEY_CAPS, owner, key_id)
            if also is not None:
                await also(db)
        self._publish(ev)
        return owner

    # sessions ------------------------------------------------------------------------

    async def create_session(self, account_id: int) -> tuple[str, Session]:
        """A new login session: (cookie value, record). Only its SHA-256 is stored."""
        token = secrets.token_urlsafe(SESSION_TOKEN_BYTES)
        now = self.clock()
        session = Session(session_hash(token), account_id, secrets.token_urlsafe(32),
                          now + self.session_ttl_s * 1000)
        async with self.transaction() as db:
            await db.execute(
                "DELETE FROM sessions WHERE account_id = ? AND token_hash NOT IN (SELECT "
                "token_hash FROM sessions WHERE account_id = ? ORDER BY created_at DESC "
                "LIMIT ?)", account_id, account_id, MAX_SESSIONS - 1)
            await db.execute(
                "INSERT INTO sessions (token_hash, account_id, csrf_token, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?)",
                session.token_hash, account_id, session.csrf_token, now, session.expires_at)
        return token, session

    async def get_session(self, token: str) -> Session | None:
        """The live session for a cookie value (expired ones are deleted on sight)."""
        if not 20 <= len(token) <= 128:
            return None
        h = session_hash(token)
        row = await self.db.fetchrow(
            "SELECT s.account_id, s.csrf_token, s.expires_at, a.status "
            "FROM sessions s JOIN accounts a "
            "ON a.id = s.account_id WHERE s.token_hash = ? AND a.status != 'deleted'", h)
        if row is None:
            return None
        if row[2] <= self.clock():
            await self.delete_session(h)
            return None
        return Session(h, int(row[0]), row[1], int(row[2]), row[3] == "disabled")

    async def delete_session(self, token_hash: bytes) -> None:
        async with self.transaction() as db:
            await db.execute("DELETE FROM sessions WHERE token_hash = ?", token_hash)

    async def sweep(self, events_keep_ms: int) -> None:
        """Delete expired sessions, and change events older than ``events_keep_ms``
        (every process has long read them)."""
        await self.purge_expired_sessions()
        async with self.transaction() as db:
            await db.execute("DELETE FROM events WHERE created_at < ?",
                             self.clock() - events_keep_ms)

    async def purge_expired_sessions(self) -> int:
        async with self.transaction() as db:
            return await db.execute("DELETE FROM sessions WHERE expires_at <= ?", self.clock())


async def bootstrap_demo(db: Database, cfg: Config) -> str | None:
    """Create the funded demo account and a key on first start; return the plaintext key.

    Returns None when ``accounts.bootstrap_demo`` is off or the demo account already
    exists (its key was shown at creation and cannot be recovered). ``db`` must not
    be in use by other coroutines meanwhile; a running server does this in
    ``app.root.open_components`` (``Components.demo_key``).
    """
    return await bootstrap_demo_account(
        Accounts(db, cfg.accounts.bcrypt_cost, cfg.accounts.session_ttl_s), cfg)


async def bootstrap_demo_account(repo: Accounts, cfg: Config) -> str | None:
    acfg = cfg.accounts
    if not acfg.bootstrap_demo:
        return None
    email = normalize_email(acfg.demo_email, "accounts.demo_email")
    try:
        account_id = await repo.create_account(email, None)
    except Conflict:
        return None
    credit = usd_to_nano(acfg.demo_credit_usd, "accounts.demo_credit_usd")
    if credit > 0:
        await repo.credit(account_id, credit)
    _, key = await repo.create_key(account_id, "demo")
    return key
