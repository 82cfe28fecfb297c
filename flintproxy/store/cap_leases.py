"""Cap leases in PostgreSQL: spend caps per key exact on many nodes (shared mode).

A key's spend cap in a UTC period is a pot of money like an account's balance, and
it is leased like one (``store.leases``, RFC 4006 quota grants): a node takes a slice
of the cap's free part on the ``key_spend`` row of the (key, period), spends it
locally in O(1) (``gate.capleases``), and comes back only to top it up, renew it or
return it. Schema (migration 13)::

    key_spend.leased_nano = SUM(granted_nano - spent_nano) over the pot's cap_leases rows
    free = cap - spent_nano - leased_nano   (cap: api_keys.cap_day_nano / cap_month_nano)

Every statement that moves money between ``free`` and a cap lease locks the
``key_spend`` row first (``FOR UPDATE`` in its first CTE), so grants, top-ups,
returns, the sweep and the usage writer's charges on one pot are serialized and the
cap leases of a pot never sum to more than the cap's free part. A grant creates the
row first when it is missing (``ENSURE_SQL``, idempotent; the first grant of a pot
on a node is 2 round trips, every later one 1). A revoked key, or a pot whose cap
was removed (NULL), is granted nothing.

Lock order (deadlocks otherwise): the usage writer locks accounts, credit leases,
then the batch's ``key_spend`` rows in (key, period) order, then cap leases by id;
every statement here locks one ``key_spend`` row, then its cap leases.

The writer's charge (``lock``, then ``store.debitplan.plan_debits`` with the pots, then
``apply``): a row's cost is charged to its node's cap lease while that lease exists;
a row whose cap lease is gone (a node that could not reach the database for a whole
TTL) is charged only what is free on every pot it touches: the account's free money,
the day cap's free part and the month cap's free part; the rest is written off and
counted, so **a cap is never exceeded, even by late rows**.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from flintproxy.store.db import PgDatabase, converted

__all__ = ["CapGrant", "CapLeaseStore", "Pot"]

STATEMENT_TIMEOUT_S = 5.0
SWEEP_BATCH = 100  # pots per sweep pass

Pot = tuple[int, str]  # (key_id, period)

_NOW = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
_CAP = "CASE WHEN left(ks.period, 1) = 'd' THEN k.cap_day_nano ELSE k.cap_month_nano END"

# $1 keys, $2 periods (in (key, period) order)
ENSURE_SQL = """
INSERT INTO key_spend (key_id, period)
SELECT * FROM unnest($1::bigint[], $2::text[]) ORDER BY 1, 2
ON CONFLICT (key_id, period) DO NOTHING
"""

# $1 key, $2 period, $3 node, $4 want, $5 ttl ms
GRANT_SQL = f"""
WITH s AS (
    SELECT ks.key_id, ks.period,
           LEAST($4::bigint, {_CAP} - ks.spent_nano - ks.leased_nano) AS g
    FROM key_spend ks JOIN api_keys k ON k.id = ks.key_id
    WHERE ks.key_id = $1 AND ks.period = $2 AND k.revoked_at IS NULL
      AND ({_CAP}) IS NOT NULL FOR UPDATE OF ks
), l AS (
    INSERT INTO cap_leases (key_id, period, node_id, granted_nano, spent_nano,
                            created_at, expires_at)
    SELECT s.key_id, s.period, $3, s.g, 0, {_NOW}, {_NOW} + $5 FROM s WHERE s.g > 0
    RETURNING id, key_id, period, granted_nano
)
UPDATE key_spend SET leased_nano = key_spend.leased_nano + l.granted_nano
FROM l WHERE key_spend.key_id = l.key_id AND key_spend.period = l.period
RETURNING l.id, l.granted_nano
"""  # noqa: S608

# $1 lease, $2 node, $3 want, $4 ttl ms, $5 key, $6 period
TOP_UP_SQL = f"""
WITH s AS (
    SELECT ks.key_id, ks.period,
           LEAST($3::bigint, {_CAP} - ks.spent_nano - ks.leased_nano) AS g
    FROM key_spend ks JOIN api_keys k ON k.id = ks.key_id
    WHERE ks.key_id = $5 AND ks.period = $6 AND k.revoked_at IS NULL
      AND ({_CAP}) IS NOT NULL FOR UPDATE OF ks
), l AS (
    UPDATE cap_leases SET granted_nano = cap_leases.granted_nano + s.g,
                          expires_at = {_NOW} + $4
    FROM s WHERE cap_leases.id = $1 AND cap_leases.node_id = $2
             AND cap_leases.key_id = s.key_id AND cap_leases.period = s.period
             AND cap_leases.expires_at > {_NOW} AND s.g > 0
    RETURNING s.key_id, s.period, s.g
)
UPDATE key_spend SET leased_nano = key_spend.leased_nano + l.g
FROM l WHERE key_spend.key_id = l.key_id AND key_spend.period = l.period
RETURNING l.g
"""  # noqa: S608

# $1 lease, $2 node, $3 amount, $4 key, $5 period
GIVE_BACK_SQL = """
WITH s AS (
    SELECT key_id, period FROM key_spend WHERE key_id = $4 AND period = $5 FOR UPDATE
), l AS (
    UPDATE cap_leases SET granted_nano = cap_leases.granted_nano - $3
    FROM s WHERE cap_leases.id = $1 AND cap_leases.node_id = $2
             AND cap_leases.key_id = s.key_id AND cap_leases.period = s.period
             AND cap_leases.granted_nano - cap_leases.spent_nano >= $3
    RETURNING s.key_id, s.period
)
UPDATE key_spend SET leased_nano = key_spend.leased_nano - $3
FROM l WHERE key_spend.key_id = l.key_id AND key_spend.period = l.period
RETURNING key_spend.key_id
"""

# Delete cap leases of one pot (the locked row) matching a condition; free their rest.
_DELETE_SQL = """
WITH s AS (
    SELECT key_id, period FROM key_spend WHERE key_id = $1 AND period = $2 FOR UPDATE
), l AS (
    DELETE FROM cap_leases USING s
    WHERE cap_leases.key_id = s.key_id AND cap_leases.period = s.period AND {cond}
    RETURNING cap_leases.granted_nano - cap_leases.spent_nano AS rest
), t AS (
    SELECT SUM(rest)::bigint AS rest, COUNT(*) AS n FROM l
)
UPDATE key_spend SET leased_nano = key_spend.leased_nano - t.rest
FROM t WHERE key_spend.key_id = $1 AND key_spend.period = $2 AND t.n > 0
RETURNING t.rest, t.n
"""
# $1 key, $2 period, $3 lease, $4 node
CLOSE_SQL = _DELETE_SQL.format(cond="cap_leases.id = $3 AND cap_leases.node_id = $4")
# $1 key, $2 period
SWEEP_SQL = _DELETE_SQL.format(cond=f"cap_leases.expires_at <= {_NOW}")
SWEEP_DUE_SQL = f"""
SELECT DISTINCT key_id, period FROM cap_leases WHERE expires_at <= {_NOW} LIMIT {SWEEP_BATCH}
"""  # noqa: S608

# $1 node, $2 ttl ms, $3 lease ids
EXTEND_SQL = f"""
UPDATE cap_leases SET expires_at = {_NOW} + $2
WHERE node_id = $1 AND id = ANY($3::bigint[]) AND expires_at > {_NOW}
RETURNING id
"""  # noqa: S608

# The usage writer's side, after the accounts and credit leases are locked: the pots in
# (key, period) order, then the cap leases by id. Rows: (kind, key, period, a, lease).
LOCK_SQL = f"""
WITH s AS (
    SELECT ks.key_id, ks.period, {_CAP} - ks.spent_nano - ks.leased_nano AS free
    FROM key_spend ks JOIN api_keys k ON k.id = ks.key_id
    JOIN unnest($1::bigint[], $2::text[]) AS p(key_id, period)
      ON ks.key_id = p.key_id AND ks.period = p.period
    ORDER BY ks.key_id, ks.period FOR UPDATE OF ks
), l AS (
    SELECT id, key_id, period, granted_nano - spent_nano AS unspent FROM cap_leases
    WHERE id = ANY($3::bigint[]) ORDER BY id FOR UPDATE
)
SELECT 's', key_id, period, free, 0::bigint FROM s
UNION ALL
SELECT 'l', key_id, period, unspent, id FROM l
"""  # noqa: S608
# The cap leases' spend, then the pots' leased part (their spent_nano is the ledger's
# key_spend UPSERT, charged costs).
DEBIT_SQL = """
WITH c AS (
    UPDATE cap_leases SET spent_nano = cap_leases.spent_nano + d.amount
    FROM unnest($4::bigint[], $5::bigint[]) AS d(id, amount)
    WHERE cap_leases.id = d.id
)
UPDATE key_spend SET leased_nano = key_spend.leased_nano - d.leased
FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS d(key_id, period, leased)
WHERE key_spend.key_id = d.key_id AND key_spend.period = d.period
"""


class CapGrant(NamedTuple):
    lease_id: int
    granted_nano: int


class CapLeaseStore:
    """The cap lease statements over a pool; every call is one round trip, counted in
    the credit leases' counters (``round_trips``: metric
    ``flintproxy_money_round_trips_total{op}``, ops ``cap_*``)."""

    def __init__(self, db: PgDatabase, round_trips: dict[str, int]) -> None:
        self._db = db
        self.round_trips = round_trips
        for op in ("cap_grant", "cap_top_up", "cap_give_back", "cap_close", "cap_extend",
                   "cap_sweep"):
            round_trips.setdefault(op, 0)
        self.swept_leases = 0

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[Any]:
        self.round_trips[op] += 1
        async with converted():
            return list(await self._db.pool.fetch(sql, *args, timeout=STATEMENT_TIMEOUT_S))

    async def grant(self, pot: Pot, node_id: str, want_nano: int, ttl_ms: int, *,
                    ensure: bool = True) -> CapGrant | None:
        """A new cap lease of ``LEAST(want, free)``; None when nothing is free, the key
        is revoked or the period is not capped. ``ensure``: create the pot's row first
        (a node's first grant on it)."""
        if ensure:
            await self._fetch("cap_grant", ENSURE_SQL, [pot[0]], [pot[1]])
        rows = await self._fetch("cap_grant", GRANT_SQL, pot[0], pot[1], node_id, want_nano,
                                 ttl_ms)
        return CapGrant(int(rows[0][0]), int(rows[0][1])) if rows else None

    async def top_up(self, lease_id: int, pot: Pot, node_id: str, want_nano: int,
                     ttl_ms: int) -> int:
        """Add ``LEAST(want, free)`` to a live cap lease of this node and renew it."""
        rows = await self._fetch("cap_top_up", TOP_UP_SQL, lease_id, node_id, want_nano,
                                 ttl_ms, pot[0], pot[1])
        return int(rows[0][0]) if rows else 0

    async def give_back(self, lease_id: int, pot: Pot, node_id: str, amount_nano: int
                        ) -> bool:
        """Return ``amount`` of the cap lease's unspent part to the cap."""
        if amount_nano <= 0:
            return True
        rows = await self._fetch("cap_give_back", GIVE_BACK_SQL, lease_id, node_id,
                                 amount_nano, pot[0], pot[1])
        return bool(rows)

    async def close(self, lease_id: int, pot: Pot, node_id: str) -> int:
        """Delete the cap lease and free what it did not spend; returns that amount."""
        rows = await self._fetch("cap_close", CLOSE_SQL, pot[0], pot[1], lease_id, node_id)
        return int(rows[0][0]) if rows else 0

    async def extend(self, node_id: str, ttl_ms: int, lease_ids: Sequence[int]) -> set[int]:
        """Renew these cap leases of the node (one statement); the ids still alive."""
        rows = await self._fetch("cap_extend", EXTEND_SQL, node_id, ttl_ms, list(lease_ids))
        return {int(r[0]) for r in rows}

    async def sweep(self) -> int:
        """Delete expired cap leases (any node's) and free their rest; returns how many."""
        swept = 0
        while True:
            due = await self._fetch("cap_sweep", SWEEP_DUE_SQL)
            before = swept
            for key_id, period in due:
                for _rest, n in await self._fetch("cap_sweep", SWEEP_SQL, key_id, period):
                    swept += int(n)
            if len(due) < SWEEP_BATCH or swept == before:  # never spin on what won't go
                break
        self.swept_leases += swept
        return swept

    async def lock(self, conn: Any, pots: Iterable[Pot], lease_ids: Iterable[int]
                   ) -> tuple[dict[Pot, int | None], dict[int, tuple[Pot, int]]]:
        """Inside the writer's transaction (after the accounts and credit leases): create
        the pots' rows when missing, lock them in (key, period) order, then the cap
        leases; returns ``free`` per pot (None: not capped) and ``(pot, unspent)`` per
        cap lease that still exists. Two statements."""
        ordered = sorted(set(pots))
        self.round_trips["debit"] += 2
        keys, names = [k for k, _ in ordered], [p for _, p in ordered]
        await conn.execute(ENSURE_SQL, keys, names)
        free: dict[Pot, int | None] = {}
        leases: dict[int, tuple[Pot, int]] = {}
        for kind, key_id, period, x, lease_id in await conn.fetch(
                LOCK_SQL, keys, names, sorted(set(lease_ids))):
            pot = (int(key_id), str(period))
            if kind == "s":
                free[pot] = None if x is None else int(x)
            else:
                leases[int(lease_id)] = (pot, int(x))
        return free, leases

    async def apply(self, conn: Any, from_leases: Mapping[Pot, int],
                    spends: Mapping[int, int]) -> None:
        """Charge the cap leases a plan spent (``spent += x``, the pot's ``leased -= x``)."""
        if not spends:
            return
        self.round_trips["debit"] += 1
        pots = sorted(p for p, x in from_leases.items() if x)
        await conn.execute(DEBIT_SQL, [k for k, _ in pots], [p for _, p in pots],
                           [from_leases[p] for p in pots], list(spends), list(spends.values()))
