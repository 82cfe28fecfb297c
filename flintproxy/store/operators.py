"""The operator role and its audit trail (the console's /api/admin/ and the admin CLI).

An operator is an account listed in ``operators`` (``flintproxy admin
grant-operator EMAIL``). Every change an operator makes goes through ``Operators``,
which writes one ``audit`` row (operator account id, action, target account or
key, amount, note, time) in the same transaction as the change itself: an action
without its audit row, or an audit row without its action, never commits. Audit
rows hold no request content and no client address; the target is an account id,
not an email, so closing an account erases its email from the trail too.

Credits and debits are ledger entries, ``credits`` rows (reason ``credit``, and
``adjustment`` with a negative amount for a debit: ``store.entries``) and the
same ``credit`` change event, so a running gateway re-reads the balance at once.
A debit never takes the stored balance below zero, nor below what nodes hold as
credit leases in the shared mode (``balance_nano - leased_nano``: the UPDATE's own
condition, atomic with the change), so a lease is never left unbacked.

The SQL is plain (no SQLite-only syntax) so a second backend can port it as is.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from flintproxy.errors import BadRequest, Conflict, NotFound
from flintproxy.money import format_usd
from flintproxy.store.accounts import EV_CREDIT, AccountInfo, Accounts
from flintproxy.store.db import Database, Queries
from flintproxy.store.entries import Reason

__all__ = [
    "MAX_NOTE_CHARS",
    "AccountSummary",
    "Action",
    "AuditEntry",
    "Operators",
    "audit_note",
]

MAX_NOTE_CHARS = 500
MAX_FOUND = 50
MAX_AUDIT_PAGE = 200


class Action(StrEnum):
    """What an audit row records."""

    GRANT_OPERATOR = "grant_operator"
    REVOKE_OPERATOR = "revoke_operator"
    CREDIT = "credit"
    DEBIT = "debit"
    DISABLE = "disable_account"
    ENABLE = "enable_account"
    REVOKE_KEY = "revoke_key"
    SET_LIMITS = "set_limits"
    SET_KEY_CAPS = "set_key_caps"


def audit_note(raw: object, *, required: bool) -> str:
    """An operator's note: plain text up to MAX_NOTE_CHARS, required for money."""
    if raw is None:
        raw = ""
    if not isinstance(raw, str):
        raise BadRequest("'note' must be a string.", param="note")
    note = unicodedata.normalize("NFC", raw.strip())
    if required and not note:
        raise BadRequest("A note is required: say why (it is kept in the audit log).",
                         param="note", code="note_required")
    if len(note) > MAX_NOTE_CHARS:
        raise BadRequest(f"'note' is longer than {MAX_NOTE_CHARS} characters.", param="note")
    if any(unicodedata.category(c)[0] == "C" for c in note):
        raise BadRequest("'note' must not contain control or format characters.",
                         param="note")
    return note


@dataclass(frozen=True, slots=True)
class AccountSummary:
    """An account as an operator sees it: money, limits, keys and usage totals."""

    account: AccountInfo
    operator: bool
    live_keys: int
    limits: tuple[int | None, int | None, int | None]
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nano: int

    def as_json(self) -> dict[str, Any]:
        a = self.account
        return {**a.as_json(), "operator": self.operator, "live_keys": self.live_keys,
                "credited_nano": a.credited_nano, "credited_usd": format_usd(a.credited_nano),
                "charged_nano": a.charged_nano, "charged_usd": format_usd(a.charged_nano),
                "limits": dict(zip(("rpm", "tpm", "max_concurrent"), self.limits,
                                   strict=True)),
                "usage": {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                          "completion_tokens": self.completion_tokens,
                          "cost_nano": self.cost_nano,
                          "cost_usd": format_usd(self.cost_nano)}}


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    operator_id: int | None
    operator_email: str | None
    action: str
    target_account_id: int | None
    target_email: str | None
    target_key_id: int | None
    amount_nano: int | None
    note: str
    created_at: int

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "operator_id": self.operator_id,
                "operator_email": self.operator_email, "action": self.action,
                "target_account_id": self.target_account_id,
                "target_email": self.target_email, "target_key_id": self.target_key_id,
                "amount_nano": self.amount_nano,
                "amount_usd": None if self.amount_nano is None
                else format_usd(self.amount_nano),
                "note": self.note, "created_at": self.created_at // 1000}


_SUMMARY_SQL = (
    "SELECT a.id, a.email, a.status, a.created_at, a.balance_nano, a.credited_nano, "
    "a.charged_nano, "
    "(SELECT COUNT(*) FROM operators o WHERE o.account_id = a.id), "
    "(SELECT COUNT(*) FROM api_keys k WHERE k.account_id = a.id AND k.revoked_at IS NULL), "
    "a.rpm, a.tpm, a.max_concurrent, "
    "(SELECT COUNT(*) FROM usage u WHERE u.account_id = a.id), "
    "(SELECT COALESCE(SUM(u.prompt_tokens), 0) FROM usage u WHERE u.account_id = a.id), "
    "(SELECT COALESCE(SUM(u.completion_tokens), 0) FROM usage u WHERE u.account_id = a.id), "
    "(SELECT COALESCE(SUM(u.cost_nano), 0) FROM usage u WHERE u.account_id = a.id), "
    "a.email_sealed FROM accounts a")


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Operators:
    """Operator role checks, account look-ups and audited changes over ``Accounts``."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    @property
    def db(self) -> Database:
        return self.accounts.db

    def _audit(self, operator_id: int | None, action: Action, *,
               account_id: int | None = None, key_id: int | None = None,
               amount_nano: int | None = None, note: str = "") -> Any:
        clock = self.accounts.clock

        async def write(db: Queries) -> None:
            target = account_id
            if target is None and key_id is not None:
                found = await db.fetchval("SELECT account_id FROM api_keys WHERE id = ?",
                                          key_id)
                target = None if found is None else int(found)
            await db.execute(
                "INSERT INTO audit (operator_id, action, target_account_id, target_key_id, "
                "amount_nano, note, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                operator_id, str(action), target, key_id, amount_nano, note, clock())

        return write

    def _summary(self, row: Any) -> AccountSummary:
        email = self.accounts.pii.reveal(row[1], row[16])
        return AccountSummary(AccountInfo(row[0], email, *row[2:7]), bool(row[7]),
                              int(row[8]), (row[9], row[10], row[11]), int(row[12]),
                              int(row[13]), int(row[14]), int(row[15]))

    # -- the role ------------------------------------------------------------------

    async def is_operator(self, account_id: int) -> bool:
        return await self._is_operator_in(self.db, account_id)

    async def grant(self, account_id: int, by: int | None = None) -> bool:
        """Make the account an operator; False when it already was."""
        async with self.accounts.transaction() as db:
            if await self._is_operator_in(db, account_id):
                return False
            await db.execute("INSERT INTO operators (account_id, granted_at) VALUES (?, ?)",
                             account_id, self.accounts.clock())
            await self._audit(by, Action.GRANT_OPERATOR, account_id=account_id)(db)
        return True

    async def revoke(self, account_id: int, by: int | None = None) -> bool:
        """Take the role away; False when the account was not an operator."""
        async with self.accounts.transaction() as db:
            if await db.execute("DELETE FROM operators WHERE account_id = ?",
                                account_id) == 0:
                return False
            await self._audit(by, Action.REVOKE_OPERATOR, account_id=account_id)(db)
        return True

    @staticmethod
    async def _is_operator_in(db: Queries, account_id: int) -> bool:
        return await db.fetchrow("SELECT 1 FROM operators WHERE account_id = ?",
                                 account_id) is not None

    # -- look-ups ------------------------------------------------------------------

    async def find(self, email_part: str) -> list[AccountSummary]:
        """Accounts whose email contains ``email_part`` (at most MAX_FOUND, by id).

        With the email sealed at rest (``store.pii``) the column holds a blind index:
        only the whole address can be found then, exactly as a login finds it.
        """
        if self.accounts.pii.keyring is not None:
            where, args = self.accounts.email_is(email_part.strip().lower())
            sql = f"{_SUMMARY_SQL} WHERE a.{where} ORDER BY a.id LIMIT ?"
            return [self._summary(r) for r in await self.db.fetch(sql, *args, MAX_FOUND)]
        sql = (f"{_SUMMARY_SQL} WHERE a.email LIKE ? ESCAPE '\\' "
               "ORDER BY a.id LIMIT ?")
        return [self._summary(r) for r in await self.db.fetch(sql, _like(email_part.lower()),
                                                               MAX_FOUND)]

    async def summary(self, account_id: int) -> AccountSummary:
        row = await self.db.fetchrow(f"{_SUMMARY_SQL} WHERE a.id = ?", account_id)
        if row is None:
            raise NotFound(f"No account with id {account_id}.")
        return self._summary(row)

    async def audit_log(self, limit: int, before: int | None = None) -> list[AuditEntry]:
        """Audit rows, newest first (at most MAX_AUDIT_PAGE + 1: one more tells a page
        has a next); ``before``: only rows with a smaller id."""
        sql = ("SELECT t.id, t.operator_id, o.email, t.action, t.target_account_id, a.email, "
               "t.target_key_id, t.amount_nano, t.note, t.created_at, o.email_sealed, "
               "a.email_sealed FROM audit t "
               "LEFT JOIN accounts o ON o.id = t.operator_id "
               "LEFT JOIN accounts a ON a.id = t.target_account_id "
               "WHERE t.id < ? ORDER BY t.id DESC LIMIT ?")
        bound = before if before is not None else 2**62
        reveal = self.accounts.pii.reveal
        return [AuditEntry(r[0], r[1], reveal(r[2], r[10]), r[3], r[4], reveal(r[5], r[11]),
                           *r[6:10])
                for r in await self.db.fetch(sql, bound, min(limit, MAX_AUDIT_PAGE + 1))]

    # -- audited changes -----------------------------------------------------------

    async def credit(self, operator_id: int | None, account_id: int, amount_nano: int,
                     note: str) -> int:
        """Add funds (a ``credits`` row); returns the new balance."""
        return await self.accounts.credit(
            account_id, amount_nano,
            also=self._audit(operator_id, Action.CREDIT, account_id=account_id,
                             amount_nano=amount_nano, note=note))

    async def debit(self, operator_id: int | None, account_id: int, amount_nano: int,
                    note: str) -> int:
        """Take funds back (a negative ``credits`` row); never below a zero balance.

        Returns the new balance; Conflict when the balance is smaller than the amount.
        """
        if amount_nano <= 0:
            raise BadRequest("A debit must be positive.")
        repo = self.accounts
        async with repo.transaction() as db:
            changed = await db.execute(
                "UPDATE accounts SET credited_nano = credited_nano - ?, "
                "balance_nano = balance_nano - ? "
                "WHERE id = ? AND status <> 'deleted' AND balance_nano - leased_nano >= ?",
                amount_nano, amount_nano, account_id, amount_nano)
            row = await db.fetchrow("SELECT balance_nano - leased_nano, status FROM accounts "
                                    "WHERE id = ?", account_id)
            if changed == 0:
                if row is None or row[1] == "deleted":
                    raise NotFound(f"No account with id {account_id}.")
                raise Conflict(f"The free balance is {format_usd(int(row[0]))} USD: a debit of "
                               f"{format_usd(amount_nano)} USD would make it negative.",
                               code="insufficient_balance")
            await db.execute("INSERT INTO credits (account_id, amount_nano, created_at, "
                             "reason, actor) VALUES (?, ?, ?, ?, ?)", account_id, -amount_nano,
                             repo.clock(), str(Reason.ADJUSTMENT), "operator")
            ev = await repo.record_event(db, EV_CREDIT, account_id)
            await self._audit(operator_id, Action.DEBIT, account_id=account_id,
                              amount_nano=-amount_nano, note=note)(db)
        repo.publish(ev)
        return 0 if row is None else int(row[0])

    async def set_status(self, operator_id: int | None, account_id: int, status: str,
                         note: str) -> bool:
        """'active' or 'disabled'; False (and no audit row) when it already was."""
        if status not in ("active", "disabled"):
            raise BadRequest("status must be 'active' or 'disabled'.", param="status")
        await self.summary(account_id)  # NotFound for an unknown id
        action = Action.DISABLE if status == "disabled" else Action.ENABLE
        return await self.accounts.set_status(
            account_id, status,
            also=self._audit(operator_id, action, account_id=account_id, note=note))

    async def revoke_key(self, operator_id: int | None, key_id: int, note: str) -> bool:
        return await self.accounts.revoke_key(
            key_id, also=self._audit(operator_id, Action.REVOKE_KEY, key_id=key_id,
                                     note=note))

    async def set_limits(self, operator_id: int | None, account_id: int, key_id: int | None,
                         limits: tuple[int | None, int | None, int | None],
                         note: str) -> None:
        rpm, tpm, conc = limits
        shown = ", ".join(f"{n}={'default' if v is None else v}" for n, v in
                          (("rpm", rpm), ("tpm", tpm), ("max_concurrent", conc)))
        await self.accounts.set_limits(
            account_id, key_id, rpm, tpm, conc,
            also=self._audit(operator_id, Action.SET_LIMITS, account_id=account_id,
                             key_id=key_id, note=f"{shown}; {note}" if note else shown))

    async def set_key_caps(self, operator_id: int | None, key_id: int,
                           caps: dict[str, int | None], note: str) -> int:
        """Set a key's spend caps (``Accounts.set_key_caps``), audited; returns its account."""
        shown = ", ".join(f"{n}={'none' if v is None else '$' + format_usd(v)}"
                          for n, v in caps.items())
        return await self.accounts.set_key_caps(
            key_id, None, caps,
            also=self._audit(operator_id, Action.SET_KEY_CAPS, key_id=key_id,
                             note=f"{shown}; {note}" if note else shown))
