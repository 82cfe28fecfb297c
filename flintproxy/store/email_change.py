"""An email change takes effect only once the NEW address confirms it.

Otherwise a typo (or an attacker holding a session and the password) would move the
account, and its password resets, to an address nobody there controls. ``request``
stores the pending address (sealed under the data key when there is one) with a
single-use token (only its SHA-256; 24 hours) and queues the link to the new address,
in one transaction; ``confirm`` consumes the token and changes the email.
"""

from __future__ import annotations

from collections.abc import Callable

from flintproxy.errors import BadRequest, Conflict, NotFound
from flintproxy.store.accounts import Accounts
from flintproxy.store.outbox import enqueue
from flintproxy.store.tokens import consume, new_token, token_hash

__all__ = ["TOKEN_TTL_MS", "EmailChanges"]

TOKEN_TTL_MS = 24 * 3600 * 1000
COLUMN = "email_changes.new_email"


class EmailChanges:
    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    async def request(self, account_id: int, new_email: str,
                      compose: Callable[[str], tuple[str, str]]) -> None:
        """Queue the confirmation to ``new_email`` (409 when another account has it)."""
        try:
            await self.accounts.by_email(new_email)
        except NotFound:
            pass
        else:
            raise Conflict("An account with this email already exists.", param="new_email",
                           code="email_taken")
        token = new_token()
        subject, body = compose(token)
        pii = self.accounts.pii
        now = self.accounts.clock()
        async with self.accounts.transaction() as q:
            await q.execute("DELETE FROM email_changes WHERE account_id = ?", account_id)
            await q.execute("INSERT INTO email_changes (token_hash, account_id, new_email, "
                            "expires_at) VALUES (?, ?, ?, ?)", token_hash(token), account_id,
                            pii.seal_text(new_email, COLUMN), now + TOKEN_TTL_MS)
            await enqueue(q, new_email, subject, body, now, pii)

    async def confirm(self, token: object) -> int:
        """Apply the change the token stands for; returns the account id."""
        refusal = BadRequest("This confirmation link is not valid or has expired.",
                             param="token", code="invalid_token")
        row = await consume(self.accounts.transaction, "email_changes",
                            "account_id, new_email, expires_at", token,
                            self.accounts.clock(), refusal)
        account_id = int(row[0])
        await self.accounts.change_email(account_id, self.accounts.pii.open_text(row[1], COLUMN))
        return account_id
