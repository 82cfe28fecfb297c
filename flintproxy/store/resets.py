"""Password reset tokens: single use, 30 minutes, stored only as their SHA-256.

``request`` answers the same whether or not the email has an account (the caller's
response never says); for an active account it replaces any earlier token and queues
the email with the link in one transaction. ``confirm`` consumes the token (a DELETE
that returns it: of two concurrent uses one wins), then sets the password, which ends
every session of the account.
"""

from __future__ import annotations

from collections.abc import Callable

from flintproxy.errors import BadRequest
from flintproxy.store.accounts import Accounts
from flintproxy.store.outbox import enqueue
from flintproxy.store.tokens import consume, new_token, token_hash

__all__ = ["TOKEN_TTL_MS", "PasswordResets"]

TOKEN_TTL_MS = 30 * 60 * 1000

# token -> (subject, body) of the email that carries it
Compose = Callable[[str], tuple[str, str]]


class PasswordResets:
    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    async def request(self, email: str, compose: Compose) -> bool:
        """Queue a reset email when ``email`` is an active account's; True when queued
        (for tests and metrics only: never tell the client)."""
        where, args = self.accounts.email_is(email)
        row = await self.accounts.db.fetchrow(
            f"SELECT id FROM accounts WHERE {where} AND status = 'active'", *args)  # noqa: S608
        if row is None:
            return False
        token = new_token()
        subject, body = compose(token)
        now = self.accounts.clock()
        async with self.accounts.transaction() as q:
            await q.execute("DELETE FROM password_resets WHERE account_id = ?", row[0])
            await q.execute("INSERT INTO password_resets (token_hash, account_id, expires_at) "
                            "VALUES (?, ?, ?)", token_hash(token), row[0], now + TOKEN_TTL_MS)
            await enqueue(q, email, subject, body, now, self.accounts.pii)
        return True

    async def confirm(self, token: object, password: bytes) -> int:
        """Consume ``token`` and set ``password``; returns the account id. One refusal,
        400 ``invalid_token``, for an unknown, used or expired token."""
        refusal = BadRequest("This reset link is not valid or has expired; ask for a new one.",
                             param="token", code="invalid_token")
        row = await consume(self.accounts.transaction, "password_resets",
                            "account_id, expires_at", token, self.accounts.clock(), refusal)
        account_id = int(row[0])
        await self.accounts.set_password(account_id, password, None)
        return account_id
