"""Redemption codes: prepaid credit with no third party (the embedded way to fund).

``flintproxy admin create-codes`` makes codes of 80 random bits (16 characters of
Crockford's base32, shown as ``FLINT-XXXX-XXXX-XXXX-XXXX``), prints them once and
stores only their SHA-256, like API keys: a copy of the database redeems nothing.

A redemption is ONE transaction: a conditional UPDATE claims the code (unredeemed,
unexpired) and, only if it claimed it, the balance and its ledger entry change
(store.entries). Two concurrent redemptions of one code: the second UPDATE finds the
code already claimed (SQLite serialises writers; PostgreSQL's row lock makes the
second re-check the WHERE after the first commits) and credits nothing.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from flintproxy.errors import BadRequest, NotFound
from flintproxy.store.accounts import Accounts
from flintproxy.store.entries import Reason

__all__ = ["Codes", "Redeemed", "code_hash", "new_code", "normalize_code"]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford: no I, L, O, U
CODE_CHARS = 16  # x 5 bits = 80 random bits
PREFIX = "FLINT"
MAX_CODE_INPUT = 64
MAX_NOTE_CHARS = 200
MAX_BATCH = 10_000
_CLEAN = re.compile(r"[\s-]+")
_CONFUSABLE = str.maketrans({"I": "1", "L": "1", "O": "0"})


def new_code() -> str:
    body = "".join(secrets.choice(ALPHABET) for _ in range(CODE_CHARS))
    return "-".join([PREFIX, *(body[i:i + 4] for i in range(0, CODE_CHARS, 4))])


def normalize_code(raw: object) -> str:
    """The canonical form of what a user typed (case, dashes, spaces, I/L/O forgiven);
    BadRequest when it cannot be a code at all."""
    if not isinstance(raw, str) or not raw or len(raw) > MAX_CODE_INPUT:
        raise BadRequest("code must be a redemption code such as FLINT-XXXX-XXXX-XXXX-XXXX.",
                         param="code")
    text = _CLEAN.sub("", raw).upper()
    text = text.removeprefix(PREFIX).translate(_CONFUSABLE)
    if len(text) != CODE_CHARS or any(c not in ALPHABET for c in text):
        raise BadRequest("code must be a redemption code such as FLINT-XXXX-XXXX-XXXX-XXXX.",
                         param="code")
    return text


def code_hash(code: object) -> bytes:
    return hashlib.sha256(normalize_code(code).encode("ascii")).digest()


@dataclass(frozen=True, slots=True)
class Redeemed:
    amount_nano: int
    balance_nano: int


class Codes:
    """The codes' SQL, on the accounts database (``Accounts.transaction``)."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    async def create(self, count: int, amount_nano: int, *, expires_at: int | None = None,
                     note: str = "") -> list[str]:
        """``count`` new codes worth ``amount_nano`` each; the plaintexts, never stored."""
        if not 1 <= count <= MAX_BATCH:
            raise BadRequest(f"COUNT must be between 1 and {MAX_BATCH}.")
        if amount_nano <= 0:
            raise BadRequest("A code must be worth more than 0 USD.")
        if len(note) > MAX_NOTE_CHARS or any(not c.isprintable() for c in note):
            raise BadRequest(f"--note must be printable text of at most {MAX_NOTE_CHARS} "
                             "characters.")
        codes = [new_code() for _ in range(count)]
        now = self.accounts.clock()
        async with self.accounts.transaction() as db:
            await db.executemany(
                "INSERT INTO redemption_codes (code_hash, amount_nano, note, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?)",
                [(code_hash(c), amount_nano, note, now, expires_at) for c in codes])
        return codes

    async def redeem(self, account_id: int, code: object) -> Redeemed:
        """Credit the code's value to the account, once; NotFound when the code is
        unknown, used or expired (one answer for all three: no oracle)."""
        digest = code_hash(code)
        now = self.accounts.clock()
        async with self.accounts.transaction() as db:
            amount = await db.fetchval(
                "UPDATE redemption_codes SET redeemed_by = ?, redeemed_at = ? "
                "WHERE code_hash = ? AND redeemed_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > ?) RETURNING amount_nano",
                account_id, now, digest, now)
            if amount is None:
                raise NotFound("This code is not valid, has expired or was already used.",
                               param="code", code="invalid_code")
            balance, ev = await self.accounts.credit_in(
                db, account_id, int(amount), Reason.REDEMPTION, f"account:{account_id}")
        self.accounts.publish(ev)
        return Redeemed(int(amount), balance)
