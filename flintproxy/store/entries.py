"""The ledger of balance changes that are not usage: every ``credits`` row says why
(``Reason``) and who (an actor), so ``balance = Σ credits - Σ charges`` is auditable.

Usage charges are the usage rows the ledger writer debits (store.ledger); rows erased
later (on the holder's request, by retention) leave their cost in ``usage_erased``
(``erase_usage``), so a charge never leaves the books. Every other change of a
balance (an operator's credit or adjustment, a redemption, a top-up) is one
``credits`` row written by ``apply`` in the same transaction as the balance's UPDATE.
``reconcile`` (``flintproxy admin reconcile``) re-adds all of it for every account:
``credited = Σ credits``, ``charged = Σ usage + Σ usage_erased``,
``balance = credited - charged``.

An actor is ``operator`` (the command line), ``operator:<account id>`` (an operator in
the console), ``account:<id>`` (the holder: a redemption) or ``stripe:<event id>``.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flintproxy.errors import NotFound
from flintproxy.money import format_usd
from flintproxy.store.db import Database, Queries
from flintproxy.store.sqlite import now_ms as clock_ms

__all__ = ["Reason", "Reconciliation", "apply", "erase_usage", "history", "recent_entries",
           "reconcile"]

ERASE_CHUNK = 5000


class Reason(enum.StrEnum):
    CREDIT = "credit"            # an operator added funds
    ADJUSTMENT = "adjustment"    # an operator corrected a balance (either sign)
    REDEMPTION = "redemption"    # a redemption code
    TOPUP = "topup"              # a payment processor's completed checkout


async def apply(q: Queries, account_id: int, amount_nano: int, reason: Reason, actor: str,
                now_ms: int) -> int:
    """Change the balance of a live account by ``amount_nano`` and write its entry, inside
    the caller's transaction; returns the new balance (NotFound: no live account)."""
    balance = await q.fetchval(
        "UPDATE accounts SET credited_nano = credited_nano + ?, "
        "balance_nano = balance_nano + ? WHERE id = ? AND status != 'deleted' "
        "RETURNING balance_nano", amount_nano, amount_nano, account_id)
    if balance is None:
        raise NotFound("No such account.")
    await q.execute("INSERT INTO credits (account_id, amount_nano, created_at, reason, actor) "
                    "VALUES (?, ?, ?, ?, ?)", account_id, amount_nano, now_ms, str(reason),
                    actor)
    return int(balance)


async def erase_usage(db: Database, ids_sql: str, *args: object) -> int:
    """Delete the usage rows ``ids_sql`` selects (``SELECT id ... LIMIT ?``, the limit
    last in ``args``) in chunks, each one short transaction that also keeps the erased
    rows' cost per account in ``usage_erased``; returns the rows deleted."""
    limit = args[-1]
    assert isinstance(limit, int)
    total = 0
    while True:
        async with db.transaction() as q:
            rows = await q.fetch("SELECT id, account_id, cost_nano FROM usage "  # noqa: S608
                                 f"WHERE id IN ({ids_sql})", *args)
            if rows:
                await q.executemany("DELETE FROM usage WHERE id = ?", [(r[0],) for r in rows])
                per: dict[int, list[int]] = defaultdict(lambda: [0, 0])
                for _, account_id, cost in rows:
                    per[int(account_id)][0] += 1
                    per[int(account_id)][1] += int(cost)
                now = clock_ms()
                await q.executemany(
                    "INSERT INTO usage_erased (account_id, rows_erased, cost_nano, created_at) "
                    "VALUES (?, ?, ?, ?)", [(a, n, c, now) for a, (n, c) in per.items()])
        total += len(rows)
        if len(rows) < limit:
            return total


@dataclass
class Reconciliation:
    accounts: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


async def reconcile(db: Queries) -> Reconciliation:
    """Check every account's totals against its entries, and what accounts and keys'
    cap periods record as leased against their open leases (read-only; each check is
    one statement, one snapshot, so it can run while servers run: the usage writer
    debits a batch in the transaction that inserts it, and every lease statement
    moves the lease and its pot together)."""
    rows = await db.fetch(
        "SELECT a.id, a.credited_nano, a.charged_nano, a.balance_nano, "
        "(SELECT COALESCE(SUM(amount_nano), 0) FROM credits c WHERE c.account_id = a.id), "
        "(SELECT COALESCE(SUM(cost_nano), 0) FROM usage u WHERE u.account_id = a.id), "
        "(SELECT COALESCE(SUM(cost_nano), 0) FROM usage_erased e WHERE e.account_id = a.id), "
        "a.leased_nano, (SELECT COALESCE(SUM(granted_nano - spent_nano), 0) "
        "FROM credit_leases l WHERE l.account_id = a.id) FROM accounts a ORDER BY a.id")
    out = Reconciliation(accounts=len(rows))
    for account_id, credited, charged, balance, credits, used, erased, leased, held_by in rows:
        credited, charged, balance = int(credited), int(charged), int(balance)
        checks = (("credited", credited, int(credits), "the sum of its credits"),
                  ("charged", charged, int(used) + int(erased), "the sum of its usage"),
                  ("balance", balance, credited - charged, "credited - charged"),
                  ("leased", int(leased), int(held_by), "what its open credit leases hold"))
        for name, held, entries_sum, what in checks:
            if held != entries_sum:
                out.mismatches.append(
                    f"account {account_id}: {name} {format_usd(held)} USD != {what} "
                    f"{format_usd(entries_sum)} USD (off by {format_usd(held - entries_sum)})")
    caps = await db.fetch(
        "SELECT k.key_id, k.period, k.leased_nano, "
        "COALESCE(SUM(c.granted_nano - c.spent_nano), 0) FROM key_spend k "
        "LEFT JOIN cap_leases c ON c.key_id = k.key_id AND c.period = k.period "
        "GROUP BY k.key_id, k.period, k.leased_nano "
        "HAVING k.leased_nano <> COALESCE(SUM(c.granted_nano - c.spent_nano), 0) "
        "ORDER BY k.key_id, k.period")
    for key_id, period, leased, held_by in caps:
        out.mismatches.append(
            f"key {key_id} {period}: leased {format_usd(int(leased))} USD != what its open "
            f"cap leases hold {format_usd(int(held_by))} USD (off by "
            f"{format_usd(int(leased) - int(held_by))})")
    return out


def _entry(row: Sequence[Any]) -> dict[str, object]:
    """A ``credits`` row (id, amount_nano, reason, actor, created_at) as JSON."""
    return {"id": row[0], "amount_usd": format_usd(int(row[1])), "amount_nano": int(row[1]),
            "reason": row[2], "actor": row[3], "created_at_ms": int(row[4])}


async def recent_entries(q: Queries, account_id: int, limit: int) -> list[dict[str, object]]:
    """The account's ``limit`` newest ledger entries, newest first (the console's
    balance history; the export has them all)."""
    rows = await q.fetch("SELECT id, amount_nano, reason, actor, created_at FROM credits "
                         "WHERE account_id = ? ORDER BY id DESC LIMIT ?", account_id, limit)
    return [_entry(r) for r in rows]


async def history(q: Queries, account_id: int) -> dict[str, list[dict[str, object]]]:
    """Everything held about an account's money but its usage rows (the export's):
    ledger entries, erased-usage totals, top-ups and redeemed codes (not the codes)."""
    def usd(nano: object) -> str:
        return format_usd(int(nano))  # type: ignore[call-overload]

    credits = await q.fetch("SELECT id, amount_nano, reason, actor, created_at FROM credits "
                            "WHERE account_id = ? ORDER BY id", account_id)
    erased = await q.fetch("SELECT rows_erased, cost_nano, created_at FROM usage_erased "
                           "WHERE account_id = ? ORDER BY id", account_id)
    topups = await q.fetch("SELECT session_id, amount_nano, created_at, completed_at "
                           "FROM topups WHERE account_id = ? ORDER BY created_at", account_id)
    codes = await q.fetch("SELECT amount_nano, redeemed_at FROM redemption_codes "
                          "WHERE redeemed_by = ? ORDER BY redeemed_at", account_id)
    return {
        "ledger": [_entry(r) for r in credits],
        "usage_erased": [{"rows": int(r[0]), "cost_usd": usd(r[1]), "cost_nano": int(r[1]),
                          "erased_at_ms": int(r[2])} for r in erased],
        "topups": [{"checkout_session": r[0], "amount_usd": usd(r[1]),
                    "created_at_ms": int(r[2]),
                    "completed_at_ms": None if r[3] is None else int(r[3])} for r in topups],
        "redeemed_codes": [{"amount_usd": usd(r[0]), "redeemed_at_ms": int(r[1])}
                           for r in codes],
    }
