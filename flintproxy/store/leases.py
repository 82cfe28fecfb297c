"""Credit leases in PostgreSQL: the few shared statements behind exact money on many nodes.

The idea is RFC 4006's credit-control quota grants. A node does not ask the shared
database before each request; it takes a *lease* on a slice of an account's available
balance, spends it locally in O(1) (``gate.leases``), and comes back only to top it
up, renew it, or return what is left. With slices sized to ~10 s of the account's
spend, the money round trips per request are ~1 / (requests in 10 s): at 100
requests/s on one account, one top-up per ~1000 requests.

Schema (``store.postgres`` migration 2). ``accounts.leased_nano`` is the part of ``balance_nano``
that open leases hold and have not yet spent::

    leased_nano = SUM(granted_nano - spent_nano) over the account's credit_leases rows
    free        = balance_nano - leased_nano            (what a new grant may take)

Every statement that moves money between ``free`` and a lease locks the account row
first (``SELECT ... FOR UPDATE`` in its first CTE), so grants, top-ups, returns, the
expiry sweep and the usage writer's debits on one account are serialized and can
never together lease more than the balance. Each is ONE statement (one round trip).

The rules:
- grant / top-up: ``LEAST(want, free)``, nothing when the account is not active;
  a top-up also renews the lease (``expires_at = now + ttl``, PostgreSQL's clock).
- renew: one statement per node for all its leases (``extend``); it returns the
  leases still alive, so the node learns which were swept while it was away.
- return / close: give back part of a lease, or delete it and free what it did not
  spend. Expired leases (a crashed node's) are deleted by ``sweep``, which any node
  runs; deleting is idempotent.
- debits (in the usage writer's transaction: ``lock_for_debits``, the rows' insert,
  then ``plan_debits`` over the rows actually inserted, then ``apply_debits``): a row
  is charged to its node's lease while the lease row exists (``spent += cost``,
  ``leased -= cost``, ``balance -= cost``). A lease is never spent twice: once
  swept or closed its row is gone, and a row arriving after that (its node could
  not reach the database for a whole TTL) is charged only from the account's
  ``free`` money: **a late row never takes the balance below what the other leases
  hold, nor below zero**. What it cannot cover is written off: the row is stored
  with the cost actually charged (``WRITE_OFF_SQL``), so the ledger still sums to
  credited - balance, and the difference is counted (``LeaseStore.written_off_nano``,
  metric ``flintproxy_usage_written_off_nano_total``).

Round trips are counted per operation (``LeaseStore.round_trips``, metric
``flintproxy_money_round_trips_total{op}``); ``debit`` counts the statements the
lease rules add to a usage batch's transaction: the lock and the debit, 2 a batch
whatever its size (staging, insert, BEGIN and COMMIT are the ledger's own), plus the
keys' spend (``key_spend``) when the batch has rows of API keys, which is 3 in
practice; a batch with rows of keys that have cap books on this node adds 3 more
(``store.cap_leases``: the pots' rows made, locked, and the cap leases' charge).
Cap lease operations are counted as ``cap_grant``, ``cap_top_up``,
``cap_give_back``, ``cap_close``, ``cap_extend`` and ``cap_sweep``.

Times are unix milliseconds on PostgreSQL's clock only: no node's clock takes part
in deciding that a lease expired.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from flintproxy.store import caps, postgres
from flintproxy.store.cap_leases import CapLeaseStore, Pot
from flintproxy.store.db import PgDatabase, converted
from flintproxy.store.debitplan import DebitPlan, plan_debits

log = logging.getLogger("flintproxy.store.leases")

STATEMENT_TIMEOUT_S = 5.0
SWEEP_BATCH = 100  # accounts per sweep pass

_NOW = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"

# $1 account, $2 node, $3 want, $4 ttl ms
GRANT_SQL = f"""
WITH a AS (
    SELECT id, LEAST($3::bigint, balance_nano - leased_nano) AS g
    FROM accounts WHERE id = $1 AND status = 'active' FOR UPDATE
), l AS (
    INSERT INTO credit_leases (account_id, node_id, granted_nano, spent_nano,
                               created_at, expires_at)
    SELECT a.id, $2, a.g, 0, {_NOW}, {_NOW} + $4 FROM a WHERE a.g > 0
    RETURNING id, account_id, granted_nano, expires_at
)
UPDATE accounts SET leased_nano = accounts.leased_nano + l.granted_nano
FROM l WHERE accounts.id = l.account_id
RETURNING l.id, l.granted_nano
"""  # noqa: S608

# $1 lease, $2 node, $3 want, $4 ttl ms, $5 account
TOP_UP_SQL = f"""
WITH a AS (
    SELECT id, LEAST($3::bigint, balance_nano - leased_nano) AS g
    FROM accounts WHERE id = $5 AND status = 'active' FOR UPDATE
), l AS (
    UPDATE credit_leases SET granted_nano = credit_leases.granted_nano + a.g,
                             expires_at = {_NOW} + $4
    FROM a WHERE credit_leases.id = $1 AND credit_leases.node_id = $2
             AND credit_leases.account_id = a.id AND credit_leases.expires_at > {_NOW}
             AND a.g > 0
    RETURNING a.id, a.g
)
UPDATE accounts SET leased_nano = accounts.leased_nano + l.g
FROM l WHERE accounts.id = l.id
RETURNING l.g
"""  # noqa: S608

# $1 lease, $2 node, $3 amount, $4 account
GIVE_BACK_SQL = """
WITH a AS (
    SELECT id FROM accounts WHERE id = $4 FOR UPDATE
), l AS (
    UPDATE credit_leases SET granted_nano = credit_leases.granted_nano - $3
    FROM a WHERE credit_leases.id = $1 AND credit_leases.node_id = $2
             AND credit_leases.account_id = a.id
             AND credit_leases.granted_nano - credit_leases.spent_nano >= $3
    RETURNING a.id
)
UPDATE accounts SET leased_nano = accounts.leased_nano - $3
FROM l WHERE accounts.id = l.id
RETURNING accounts.id
"""

# Delete leases of one account (the locked one) matching a condition; free their rest.
_DELETE_SQL = """
WITH a AS (
    SELECT id FROM accounts WHERE id = $1 FOR UPDATE
), l AS (
    DELETE FROM credit_leases USING a
    WHERE credit_leases.account_id = a.id AND {cond}
    RETURNING credit_leases.account_id, credit_leases.granted_nano - credit_leases.spent_nano
              AS rest
), s AS (
    SELECT account_id, SUM(rest)::bigint AS rest, COUNT(*) AS n FROM l GROUP BY account_id
)
UPDATE accounts SET leased_nano = accounts.leased_nano - s.rest
FROM s WHERE accounts.id = s.account_id
RETURNING s.rest, s.n
"""
# $1 account, $2 lease, $3 node
CLOSE_SQL = _DELETE_SQL.format(cond="credit_leases.id = $2 AND credit_leases.node_id = $3")
# $1 account
SWEEP_SQL = _DELETE_SQL.format(cond=f"credit_leases.expires_at <= {_NOW}")
SWEEP_DUE_SQL = f"""
SELECT DISTINCT account_id FROM credit_leases WHERE expires_at <= {_NOW} LIMIT {SWEEP_BATCH}
"""  # noqa: S608

# $1 node, $2 ttl ms, $3 lease ids (only those the node still uses: one it let go of
# without closing, e.g. when the close failed, expires)
EXTEND_SQL = f"""
UPDATE credit_leases SET expires_at = {_NOW} + $2
WHERE node_id = $1 AND id = ANY($3::bigint[]) AND expires_at > {_NOW}
RETURNING id
"""  # noqa: S608

# The usage writer's side (inside its transaction): lock, then charge.
# One statement: the accounts first (UNION ALL runs its branches in order), then the
# leases, the order every lease statement locks in. Rows: (kind, id, a, b).
LOCK_SQL = """
WITH a AS (
    SELECT id, balance_nano - leased_nano AS free FROM accounts
    WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
), l AS (
    SELECT id, account_id, granted_nano - spent_nano AS unspent FROM credit_leases
    WHERE id = ANY($2::bigint[]) ORDER BY id FOR UPDATE
)
SELECT 'a', id, free, 0::bigint FROM a
UNION ALL
SELECT 'l', id, account_id, unspent FROM l
"""
# One statement: the leases' spend (a data-modifying CTE), then the accounts' debit.
DEBIT_SQL = """
WITH s AS (
    UPDATE credit_leases SET spent_nano = credit_leases.spent_nano + d.amount
    FROM unnest($4::bigint[], $5::bigint[]) AS d(id, amount)
    WHERE credit_leases.id = d.id
)
UPDATE accounts SET balance_nano = accounts.balance_nano - d.charge,
                    charged_nano = accounts.charged_nano + d.charge,
                    leased_nano = accounts.leased_nano - d.leased
FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS d(id, charge, leased)
WHERE accounts.id = d.id
RETURNING accounts.id, accounts.balance_nano
"""
# $1 request ids, $2 the cost actually charged (rare: only rows with a write-off)
WRITE_OFF_SQL = """
UPDATE usage SET cost_nano = d.cost
FROM unnest($1::text[], $2::bigint[]) AS d(request_id, cost)
WHERE usage.request_id = d.request_id
"""


# A key's cap leases by period on this node; None: no cap books for the key here.
CapLeasesOf = Callable[[int], Mapping[str, int | None] | None]


def _pots_of(key_id: int | None, started_ms: int,
             capped: Mapping[int, Mapping[str, int | None]]) -> list[tuple[Pot, int | None]]:
    """A row's pots (the day and the month of its start) with its node's cap lease."""
    if key_id is None:
        return []
    held = capped.get(key_id)
    if held is None:
        return []
    return [((key_id, p), held.get(p)) for p in caps.periods(started_ms)]


class Grant(NamedTuple):
    lease_id: int
    granted_nano: int


class LeaseStore:
    """The lease statements over a pool; every call is one round trip, counted.

    Database failures become ``StoreUnavailable`` (503) through the store's one
    conversion boundary, ``store.db.converted``.
    """

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._insert_sql: dict[tuple[str, ...], str] = {}
        # Round trips by operation, read by metrics (the bench divides by requests).
        self.round_trips: dict[str, int] = {
            "grant": 0, "top_up": 0, "give_back": 0, "close": 0, "extend": 0, "sweep": 0,
            "debit": 0}
        self.swept_leases = 0
        self.written_off_nano = 0
        self.caps = CapLeaseStore(db, self.round_trips)  # spend caps' leases, same pool

    async def _fetch(self, op: str, sql: str, *args: Any) -> list[Any]:
        self.round_trips[op] += 1
        async with converted():
            return list(await self._db.pool.fetch(sql, *args, timeout=STATEMENT_TIMEOUT_S))

    async def grant(self, account_id: int, node_id: str, want_nano: int, ttl_ms: int
                    ) -> Grant | None:
        """A new lease of ``LEAST(want, free)``; None when nothing is free or the account
        is not active."""
        rows = await self._fetch("grant", GRANT_SQL, account_id, node_id, want_nano, ttl_ms)
        return Grant(int(rows[0][0]), int(rows[0][1])) if rows else None

    async def top_up(self, lease_id: int, account_id: int, node_id: str, want_nano: int,
                     ttl_ms: int) -> int:
        """Add ``LEAST(want, free)`` to a live lease of this node and renew it; returns
        what was added (0: nothing free, account not active, or the lease is gone)."""
        rows = await self._fetch("top_up", TOP_UP_SQL, lease_id, node_id, want_nano, ttl_ms,
                                 account_id)
        return int(rows[0][0]) if rows else 0

    async def give_back(self, lease_id: int, account_id: int, node_id: str,
                        amount_nano: int) -> bool:
        """Return ``amount`` of the lease's unspent part to the account."""
        if amount_nano <= 0:
            return True
        rows = await self._fetch("give_back", GIVE_BACK_SQL, lease_id, node_id, amount_nano,
                                 account_id)
        return bool(rows)

    async def close(self, lease_id: int, account_id: int, node_id: str) -> int:
        """Delete the lease and free what it did not spend; returns that amount."""
        rows = await self._fetch("close", CLOSE_SQL, account_id, lease_id, node_id)
        return int(rows[0][0]) if rows else 0

    async def extend(self, node_id: str, ttl_ms: int, lease_ids: Sequence[int]) -> set[int]:
        """Renew these leases of the node (one statement); returns the ids still alive."""
        rows = await self._fetch("extend", EXTEND_SQL, node_id, ttl_ms, list(lease_ids))
        return {int(r[0]) for r in rows}

    async def sweep(self) -> int:
        """Delete expired leases (any node's) and free their rest; returns how many.

        Idempotent and safe on every node at once: each account is swept under its
        row lock, and a lease renewed meanwhile no longer matches.
        """
        swept = 0
        while True:
            due = await self._fetch("sweep", SWEEP_DUE_SQL)
            for (account_id,) in due:
                for _rest, n in await self._fetch("sweep", SWEEP_SQL, account_id):
                    swept += int(n)
            if len(due) < SWEEP_BATCH:
                break
        self.swept_leases += swept
        return swept



    async def lock_for_debits(self, conn: Any, account_ids: Iterable[int],
                              lease_ids: Iterable[int]
                              ) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
        """Inside the writer's transaction: lock the batch's accounts (then leases, the
        order every lease statement uses) and read ``free`` per account and
        ``(account, unspent)`` per lease that still exists."""
        self.round_trips["debit"] += 1
        free: dict[int, int] = {}
        leases: dict[int, tuple[int, int]] = {}
        for kind, row_id, x, y in await conn.fetch(LOCK_SQL, sorted(set(account_ids)),
                                                   sorted(set(lease_ids))):
            if kind == "a":
                free[int(row_id)] = int(x)
            else:
                leases[int(row_id)] = (int(x), int(y))
        return free, leases

    async def apply_debits(self, conn: Any, plan: DebitPlan
                           ) -> list[tuple[int, int]]:
        """Charge a plan made over the rows the batch inserted (a row already in the
        ledger was charged by the batch that inserted it); returns (account, balance).
        Call it after the transaction's rows are in; count its write-off only once the
        transaction committed (``written_off``)."""
        ids = [a for a, c in plan.charges.items() if c]
        if not ids:
            return []
        self.round_trips["debit"] += 1
        rows = await conn.fetch(DEBIT_SQL, ids, [plan.charges[a] for a in ids],
                                [plan.from_leases.get(a, 0) for a in ids],
                                list(plan.spends), list(plan.spends.values()))
        return [(int(r[0]), int(r[1])) for r in rows]

    async def commit_usage(self, fields: Sequence[str], batch: Sequence[tuple[Any, ...]],
                           lease_of: Callable[[int], int | None],
                           cap_leases_of: CapLeasesOf | None = None
                           ) -> list[tuple[int, int]]:
        """The usage writer's batch in shared mode: ONE transaction that locks, inserts
        (idempotent by request id: a retried batch inserts and charges nothing twice),
        charges what it inserted to the node's leases (``plan_debits``), and stores a
        written-off row at the cost actually charged. Returns (account, balance).

        ``cap_leases_of(key)``: None for a key without cap books on this node, else its
        cap lease per period (``gate.capleases``). A batch with such keys also locks
        ALL its (key, period) pots after the credit leases (``store.cap_leases``: one
        sorted sweep, so writers never deadlock on them) and charges the cap leases.
        """
        key = tuple(fields)
        sql = self._insert_sql.get(key)
        if sql is None:
            sql = self._insert_sql[key] = postgres.insert_staged_sql(fields)
        account_at, key_at, started_at = (key.index("account_id"), key.index("key_id"),
                                          key.index("started_at"))
        leases = {row[account_at]: lease_of(row[account_at]) for row in batch}
        capped: dict[int, Mapping[str, int | None]] = {}
        if cap_leases_of is not None:
            for key_id in {row[key_at] for row in batch}:  # one probe per key
                if key_id is not None:
                    held = cap_leases_of(key_id)
                    if held is not None:
                        capped[key_id] = held
        async with self._db.connection() as con, con.transaction():
            free, held_leases = await self.lock_for_debits(
                con, leases, [lease for lease in leases.values() if lease is not None])
            pot_free: dict[Pot, int | None] = {}
            pot_leases: dict[int, tuple[Pot, int]] = {}
            if capped:
                pots = {(row[key_at], p) for row in batch if row[key_at] is not None
                        for p in caps.periods(row[started_at])}
                pot_free, pot_leases = await self.caps.lock(
                    con, pots, [x for held in capped.values() for x in held.values()
                                if x is not None])
            await postgres.stage_usage(con, batch, fields)
            inserted = await con.fetch(sql)
            row_pots = [_pots_of(r[3], int(r[4]), capped) for r in inserted] if capped else []
            plan = plan_debits([(int(r[1]), int(r[2]), leases.get(int(r[1])))
                                for r in inserted], free, held_leases, row_pots, pot_free,
                               pot_leases)
            if plan.written_off:
                cut = [(str(r[0]), c) for r, c in zip(inserted, plan.costs, strict=True)
                       if c != int(r[2])]
                await con.execute(WRITE_OFF_SQL, [r for r, _ in cut], [c for _, c in cut])
            balances = await self.apply_debits(con, plan)
            await self.caps.apply(con, plan.cap_from_leases, plan.cap_spends)
            # In (key, period) order: nodes' writers lock the rows they share in one
            # order, so two batches never deadlock on them.
            spends = dict(sorted(caps.spends_of(
                (r[3], int(r[4]), c) for r, c in zip(inserted, plan.costs, strict=True)
            ).items()))
            if spends:
                self.round_trips["debit"] += 1
                await con.execute(caps.PG_SPEND_SQL, [k for k, _ in spends],
                                  [p for _, p in spends], list(spends.values()))
        self.written_off(plan)
        return balances

    def written_off(self, plan: DebitPlan) -> None:
        """A committed plan's write-off: counted and logged (amounts only)."""
        if plan.written_off:
            self.written_off_nano += plan.written_off
            log.warning("usage rows of an expired credit lease cost %d nano-USD more than "
                        "their accounts had free; written off", plan.written_off)
