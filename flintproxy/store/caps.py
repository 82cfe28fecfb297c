"""Spend caps per API key: the UTC periods, the durable spend per period, setting caps.

A key may carry a cap per UTC day and per UTC month (``api_keys.cap_day_nano`` /
``cap_month_nano``, NULL: none). What a key has spent in a period lives in
``key_spend(key_id, period, spent_nano, leased_nano)`` (migration 13), written by the
usage writer in the same transaction as the usage rows (``spend_upsert_sql``: one
UPSERT per batch), never derived from ``SUM(usage)``: a user may erase usage rows,
and erasing must not reset a cap.

Periods. A request belongs to the day and the month in which it *started*
(``usage.started_at``, set before admission), named ``"d2026-12-03"`` and
``"m2026-12"`` by ``periods``: the gate reserves against the books of the request's
``started_ms`` and the writer charges the same periods, so a request admitted at
23:59:59.999 is charged to the day it was admitted in, whenever it ends.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flintproxy.errors import BadRequest, NotFound
from flintproxy.money import NANO_PER_USD, format_usd, usd_to_nano
from flintproxy.store.db import Queries

__all__ = ["DAY_MS", "MAX_CAP_NANO", "KeyCaps", "by_period", "day_of", "key_caps", "parse_cap",
           "period_reset_ms", "periods", "read_spend", "set_caps", "spend_triples",
           "spend_upsert_sql", "spends_of"]

DAY_MS = 86_400_000
# The largest cap a key may carry: $1e9, as for credits (an amount beyond any balance).
MAX_CAP_NANO = 10**9 * NANO_PER_USD
# Rows per UPSERT statement: 3 variables each, well under SQLite's 32766.
SPEND_ROWS_PER_STATEMENT = 5000


def day_of(started_ms: int) -> int:
    """The UTC day number (days since 1970-01-01) of a unix-ms time."""
    return started_ms // DAY_MS


def periods(started_ms: int) -> tuple[str, str]:
    """The (day, month) periods of a request that started at ``started_ms`` (unix ms, UTC)."""
    t = time.gmtime(started_ms // 1000)
    return (f"d{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}",
            f"m{t.tm_year:04d}-{t.tm_mon:02d}")


def period_reset_ms(period: str) -> int:
    """When a period ends (unix ms): the next UTC midnight, or the next month's first."""
    if period.startswith("d"):
        year, month, day = (int(x) for x in period[1:].split("-"))
        return calendar.timegm((year, month, day, 0, 0, 0, 0, 0, 0)) * 1000 + DAY_MS
    year, month = (int(x) for x in period[1:].split("-"))
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)) * 1000


def spends_of(rows: Iterable[tuple[int | None, int, int]]) -> dict[tuple[int, str], int]:
    """What (key_id, started_ms, cost) rows add to ``key_spend``, per (key, period)."""
    per_day: dict[tuple[int, int], int] = {}
    for key_id, started_ms, cost in rows:
        if key_id is not None and cost:
            k = (key_id, started_ms // DAY_MS)
            per_day[k] = per_day.get(k, 0) + cost
    return by_period(per_day)


def by_period(per_day: Mapping[tuple[int, int], int]) -> dict[tuple[int, str], int]:
    """Costs per (key, UTC day number) as costs per (key, period): each counts in its
    day and its month (one period computation per distinct day)."""
    out: dict[tuple[int, str], int] = {}
    names: dict[int, tuple[str, str]] = {}
    for (key_id, day), cost in per_day.items():
        both = names.get(day)
        if both is None:
            both = names[day] = periods(day * DAY_MS)
        for period in both:
            out[(key_id, period)] = out.get((key_id, period), 0) + cost
    return out


def spend_upsert_sql(pairs: int) -> str:
    """One UPSERT adding ``pairs`` (key_id, period, amount) triples to ``key_spend``;
    returns (key_id, period, spent_nano) as committed (the gate's cap books)."""
    values = ", ".join(["(?, ?, ?)"] * pairs)
    return ("INSERT INTO key_spend (key_id, period, spent_nano) "  # noqa: S608
            f"VALUES {values} ON CONFLICT (key_id, period) DO UPDATE "
            "SET spent_nano = key_spend.spent_nano + excluded.spent_nano "
            "RETURNING key_id, period, spent_nano")


def spend_triples(spends: Mapping[tuple[int, str], int]) -> list[list[Any]]:
    """The UPSERT's parameters, chunked: flat (key_id, period, amount) lists."""
    items = [(k, p, a) for (k, p), a in spends.items() if a]
    return [[x for t in items[i:i + SPEND_ROWS_PER_STATEMENT] for x in t]
            for i in range(0, len(items), SPEND_ROWS_PER_STATEMENT)]


# PostgreSQL: the same UPSERT over arrays (one statement whatever the batch).
PG_SPEND_SQL = """
INSERT INTO key_spend (key_id, period, spent_nano)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[])
ON CONFLICT (key_id, period) DO UPDATE SET spent_nano = key_spend.spent_nano + excluded.spent_nano
"""


def parse_cap(value: object, field: str) -> int | None:
    """A cap from the API or the command line: None (no cap), or a decimal USD string
    or a JSON number, >= 0 and at most $1e9, exact to the nano-dollar (else 400 naming
    the field). A number is read through its decimal text, never as a binary float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRequest(f"'{field}' must be a USD amount such as \"5.00\", or null.",
                         param=field)
    text = (repr(value) if isinstance(value, float) else str(value)).strip()
    if len(text) > 40:
        raise BadRequest(f"'{field}' is too long for a USD amount.", param=field)
    try:
        nano = usd_to_nano(text)
    except ValueError as exc:
        raise BadRequest(f"'{field}' {exc}.", param=field) from None
    if nano > MAX_CAP_NANO:
        raise BadRequest(f"'{field}' must be at most 1000000000 USD.", param=field)
    return nano


class KeyCaps:
    """A key's caps and its spend in the current periods, for listings."""

    __slots__ = ("day_nano", "day_spent", "month_nano", "month_spent")

    def __init__(self, day_nano: int | None, month_nano: int | None, day_spent: int,
                 month_spent: int) -> None:
        self.day_nano = day_nano
        self.month_nano = month_nano
        self.day_spent = day_spent
        self.month_spent = month_spent

    def as_json(self) -> dict[str, Any]:
        def usd(nano: int | None) -> str | None:
            return None if nano is None else format_usd(nano)

        return {"spend_cap_day_usd": usd(self.day_nano),
                "spend_cap_month_usd": usd(self.month_nano),
                "spent_today_usd": format_usd(self.day_spent),
                "spent_this_month_usd": format_usd(self.month_spent)}


async def read_spend(db: Queries, key_ids: Sequence[int], periods_: Sequence[str]
                     ) -> dict[tuple[int, str], int]:
    """``spent_nano`` per (key, period) for these keys and periods (absent: 0)."""
    if not key_ids or not periods_:
        return {}
    keys = ",".join("?" * len(key_ids))
    names = ",".join("?" * len(periods_))
    rows = await db.fetch(
        f"SELECT key_id, period, spent_nano FROM key_spend "  # noqa: S608
        f"WHERE key_id IN ({keys}) AND period IN ({names})", *key_ids, *periods_)
    return {(int(r[0]), str(r[1])): int(r[2]) for r in rows}


async def key_caps(db: Queries, account_id: int, now_ms: int) -> dict[int, KeyCaps]:
    """Every key of the account with its caps and its spend today and this month."""
    rows = await db.fetch("SELECT id, cap_day_nano, cap_month_nano FROM api_keys "
                          "WHERE account_id = ? ORDER BY id", account_id)
    day, month = periods(now_ms)
    spent = await read_spend(db, [int(r[0]) for r in rows], [day, month])
    return {int(r[0]): KeyCaps(r[1], r[2], spent.get((int(r[0]), day), 0),
                               spent.get((int(r[0]), month), 0)) for r in rows}


async def set_caps(db: Queries, key_id: int, account_id: int | None,
                   caps: Mapping[str, int | None]) -> int:
    """Inside the caller's transaction: set the named caps (``day``/``month``; a name
    left out keeps its value) of a key (only the account's own when ``account_id``
    is given); returns the key's account id. NotFound for no such key."""
    row = await db.fetchrow("SELECT account_id FROM api_keys WHERE id = ?", key_id)
    if row is None or (account_id is not None and int(row[0]) != account_id):
        raise NotFound(f"No API key with id {key_id}.")
    for name, value in caps.items():
        column = {"day": "cap_day_nano", "month": "cap_month_nano"}[name]
        await db.execute(f"UPDATE api_keys SET {column} = ? WHERE id = ?",  # noqa: S608
                         value, key_id)
    return int(row[0])
