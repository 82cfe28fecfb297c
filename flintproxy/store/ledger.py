"""The usage ledger: one row per finished request, written in batches off the hot path.

``UsageWriter.record`` appends a row to an in-memory queue and returns; a
background task commits the queue in batches (``billing.flush_batch_rows`` rows,
or whatever is queued once the oldest row is ``billing.flush_interval_s`` old).
Each batch is ONE transaction on the writer's own connection that inserts the
rows and debits ``accounts.charged_nano`` / ``balance_nano`` by the cost of the
rows it inserted, so the stored balance always equals credits minus charges and,
while no user deleted rows, ``charged_nano`` equals the sum of the rows' costs.
The same transaction adds each keyed row's charged cost to ``key_spend`` for the
UTC day and month it started in (``store.caps``: one UPSERT per batch, aggregated
per key and period), what spend caps are enforced against.

No double charge, no lost charge. A batch leaves the queue for ``_inflight``
before its transaction and is dropped only after COMMIT succeeded; a failed
transaction is rolled back and retried as it was. Nothing is replayed across a
restart (the queue is memory only), so a crash can lose rows (see below) but
never apply one twice. Request ids are not trusted to be unique (clients may
choose them): a row whose id is already in the ledger is stored with a suffix
(``<id>~<hex>``) instead of being dropped, and the batch's debits are applied
only after every one of its rows is verified inserted.

Loss window. On SIGKILL (or power loss) the rows still in memory are lost,
together with their charges: normally those of the last flush interval
(200 ms by default) plus the batch being committed; while the disk is failing,
the whole backlog. A graceful shutdown (SIGTERM/SIGINT) drains the queue.

Engines. The queue, retries and backlog bound are engine-neutral; only the batch
statement differs: on SQLite an ``executemany`` and one debit UPDATE per chunk on
the writer's own connection (below), on PostgreSQL one statement per batch
(``store.postgres.commit_usage``: COPY into a staging table, then one INSERT of
the rows not yet in the ledger + the debit of what was inserted), idempotent by
request id, so a batch retried after an ambiguous COMMIT never charges twice. With
credit leases (shared mode) the same transaction also draws the node's leases down
(``store.leases``: ``LeaseStore.commit_usage``). A PostgreSQL that is down or restarting is one more
"disk fault" below: /readyz unready, the backlog bounded, nothing lost.

Disk faults. A failing transaction (read-only file, disk full, locked, I/O
error) is retried with exponential backoff (50 ms doubling to 5 s) and nothing is
dropped; ``stalled``/``ready()`` report it (/readyz unready), ``backlog`` shows
the queue. /v1 keeps serving while the backlog is below
``billing.max_backlog_rows`` (balances stay exact in memory meanwhile), then
``overloaded()`` is true and the gate refuses new requests with 503 until the
rows land. If a drain at shutdown cannot finish, every unwritten row is logged
at ERROR as JSON (counts and costs only), so no charge disappears silently.

Why one module of this size: the queue, the batch transaction and the balances it
returns are one mechanism; money must not cross a module seam half-written.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import aiosqlite
import orjson

from flintproxy.config import BillingConfig
from flintproxy.errors import ServiceUnavailable
from flintproxy.store import caps, postgres, sqlite
from flintproxy.store.db import Database, PgDatabase, SqliteDatabase
from flintproxy.store.debitplan import DebitPlan, plan_debits
from flintproxy.store.leases import CapLeasesOf, LeaseStore

log = logging.getLogger("flintproxy.store.ledger")

MIN_BACKOFF_S = 0.05
MAX_BACKOFF_S = 5.0
# A single flush running longer than this marks the writer stalled (slow disk).
STALL_S = 5.0
WRITER_WAL_AUTOCHECKPOINT_PAGES = 10_000
# Largest token count or cost a row stores: 2**53 also stays exact as a JSON number
# for JavaScript consumers of the export (a cost of 2**53 nano is $9M).


class UsageRow(NamedTuple):
    """One finished request, in the column order of the ``usage`` table."""

    request_id: str
    account_id: int
    key_id: int | None
    model: str
    upstream: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    estimated: int  # 0/1 (ints bind faster than bools)
    cost_nano: int
    status: int
    outcome: str  # a gate.gate.Ending value (this layer sits below the gate)
    stream: int  # 0/1
    started_at: int  # unix ms
    duration_ms: int
    ttfb_ms: int | None
    # The API called (a relay.routes endpoint); None in rows written before it was kept.
    endpoint: str | None = None


_ACCOUNT = UsageRow._fields.index("account_id")
_KEY = UsageRow._fields.index("key_id")
_COST = UsageRow._fields.index("cost_nano")
_STARTED = UsageRow._fields.index("started_at")
if (_ACCOUNT, _COST, _KEY, _STARTED) != (1, 10, 2, 14):  # UsageWriter.record's indexes
    raise ImportError("UsageRow's columns moved: update UsageWriter.record")
_COLS = ", ".join(UsageRow._fields)
_MARKS = ", ".join("?" * len(UsageRow._fields))
INSERT_SQL = f"INSERT OR IGNORE INTO usage ({_COLS}) VALUES ({_MARKS})"  # noqa: S608
# Debits as one UPDATE per chunk of (account_id, amount) pairs; the balances it
# returns are read inside the batch's transaction, i.e. exactly as committed.
DEBIT_PAIRS_PER_STATEMENT = 5000
_IDS_PER_QUERY = 500  # well under SQLite's 999 host parameters


def _debit_sql(pairs: int) -> str:
    # Only "?" placeholders are interpolated.
    values = ", ".join(["(?, ?)"] * pairs)
    return ("UPDATE accounts SET charged_nano = charged_nano + d.amount, "  # noqa: S608
            "balance_nano = balance_nano - d.amount "
            "FROM (SELECT column1 AS account_id, column2 AS amount "
            f"FROM (VALUES {values})) AS d WHERE accounts.id = d.account_id "
            "RETURNING accounts.id, accounts.balance_nano")


def spends_of(batch: Iterable[tuple[Any, ...]]) -> dict[tuple[int, str], int]:
    """What the keys of these usage rows spent, per (key, UTC day or month)."""
    return caps.spends_of((row[_KEY], row[_STARTED], row[_COST]) for row in batch)


class BalanceBook(Protocol):
    """What the writer tells the in-memory balances (``gate.billing.Billing``): rows
    queued, batches committed, and when balances changed elsewhere must be reloaded."""

    on_stale: Callable[[], None] | None
    # The writer's queued rows of some keys, (key_id, started_ms, cost): spend caps.
    queued_rows: Callable[[set[int]], Iterable[tuple[int, int, int]]] | None

    def add_pending(self, account_id: int, cost_nano: int, key_id: int | None = None,
                    started_ms: int = 0) -> None: ...

    def committed(self, debits: Mapping[int, int], balances: Iterable[tuple[int, int]],
                  spends: Mapping[tuple[int, str], int] | None = None,
                  spent: Iterable[tuple[int, str, int]] = ()) -> None: ...

    def has_stale(self) -> bool: ...

    async def reload_stale(self) -> None: ...


class UsageWriter:
    """The in-memory usage queue and the task that commits it; see the module docstring."""

    def __init__(self, db: Database, billing: BalanceBook, cfg: BillingConfig, *,
                 leases: LeaseStore | None = None,
                 lease_of: Callable[[int], int | None] | None = None,
                 cap_leases_of: CapLeasesOf | None = None) -> None:
        self._db = db
        # Shared mode: batches are charged to this node's credit leases (store.leases);
        # ``lease_of`` names the lease an account's rows are charged to (gate.leases).
        self._leases = leases
        self._lease_of = lease_of
        self._cap_leases_of = cap_leases_of  # spend caps' leases (gate.capleases)
        self._pg_sql = (postgres.batch_sql(UsageRow._fields) if isinstance(db, PgDatabase)
                        else None)
        self._billing = billing
        self._batch_rows = cfg.flush_batch_rows
        self._interval = cfg.flush_interval_s
        self.max_backlog_rows = cfg.max_backlog_rows
        # Plain tuples, not UsageRows: CPython's GC stops tracking tuples of ints and
        # strings, so a large queue adds nothing to its full collections (a queue of
        # NamedTuples caused 20 ms pauses at 50k rows/s). Exact tuples also bind faster.
        self._q: list[tuple[Any, ...]] = []
        self._inflight: list[tuple[Any, ...]] = []
        self._first_at = 0.0  # monotonic time the queue last became non-empty
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._stop = False
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._done_seq = 0  # rows committed, counted in recording order
        self._flush_started: float | None = None
        self._reload_retry_at = 0.0
        billing.on_stale = self._wake.set
        billing.queued_rows = self._queued_rows
        # Metrics, read by the metrics module (plain numbers, no labels).
        self.recorded = 0
        self.rows_written = 0
        self.rows_renamed = 0  # rows stored under a suffixed request id
        # Cost of rows no balance could cover (SQLite: ``_over_balance``), nano-USD.
        self.written_off_nano = 0
        self.flushes = 0
        self.flush_errors = 0
        self.consecutive_errors = 0
        self.last_error: str | None = None
        self.last_flush_seconds = 0.0
        self.last_batch_rows = 0
        # Called with (seconds, rows) after every committed batch (histograms).
        self.flush_observers: list[Callable[[float, int], None]] = []

    # --- the hot path ---------------------------------------------------------------

    def record(self, row: UsageRow) -> None:
        """Queue one finished request's row: O(1), never awaits, never raises."""
        q = self._q
        q.append(tuple(row))
        self.recorded += 1
        # Literal indexes (account_id, cost_nano, key_id, started_at; checked at import):
        # a NamedTuple's attribute is a property call, twice the price on this path.
        self._billing.add_pending(row[1], row[10], row[2], row[14])
        n = len(q)
        if n == 1:
            self._first_at = time.monotonic()
            self._wake.set()
        elif n == self._batch_rows:
            self._wake.set()

    def _queued_rows(self, key_ids: set[int]) -> list[tuple[int, int, int]]:
        """(key_id, started_ms, cost) of the rows of these keys not yet committed (a
        cap book's first read: rare, O(backlog))."""
        return [(row[_KEY], row[_STARTED], row[_COST]) for part in (self._inflight, self._q)
                for row in part if row[_KEY] in key_ids]

    @property
    def backlog(self) -> int:
        """Rows recorded but not yet committed."""
        return len(self._q) + len(self._inflight)

    @property
    def stalled(self) -> bool:
        """The last flush failed, or the current one has been running too long."""
        started = self._flush_started
        return self.consecutive_errors > 0 or (
            started is not None and time.monotonic() - started > STALL_S)

    def overloaded(self) -> bool:
        """Backlog at its bound: /v1 must refuse new requests (503) until it drains."""
        return self.backlog >= self.max_backlog_rows

    def refuse_if_overloaded(self) -> None:
        """Raise 503 when ``overloaded()``; for the gate's admission."""
        if self.overloaded():
            raise ServiceUnavailable(
                "The usage ledger is behind (storage is slow or failing); "
                "please retry shortly.", headers={"Retry-After": "1"})

    def ready(self) -> bool:
        """For /readyz: the writer runs, is not stalled and not overloaded."""
        task = self._task
        return (task is not None and not task.done() and not self.stalled
                and not self.overloaded())

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def sync(self, timeout_s: float | None = None) -> bool:
        """Flush now and wait until every row recorded before the call is committed."""
        target = self.recorded
        if self._done_seq >= target:
            return True
        fut = asyncio.get_running_loop().create_future()
        entry = (target, fut)
        self._waiters.append(entry)
        self._wake.set()
        try:
            done, _ = await asyncio.wait([fut], timeout=timeout_s)
            return bool(done)
        finally:
            with suppress(ValueError):
                self._waiters.remove(entry)

    async def drain(self, timeout_s: float | None = None) -> int:
        """Commit everything queued (shutdown); returns how many rows could not be.

        Rows still unwritten after ``timeout_s`` are logged at ERROR, one JSON line each.
        """
        self._closing = True
        self._wake.set()
        task = self._task
        if task is None:
            self.start()
            task = self._task
        assert task is not None
        done, _ = await asyncio.wait([task], timeout=timeout_s)
        if not done:
            # Let the attempt in progress finish (never cut a COMMIT in half), then stop.
            self._stop = True
            self._wake.set()
            done, _ = await asyncio.wait([task], timeout=MAX_BACKOFF_S + 10.0)
            if not done:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        elif not task.cancelled() and task.exception() is not None:
            log.error("usage writer failed", exc_info=task.exception())
        left = self._inflight + self._q
        if left:
            log.error("usage writer stopped with %d unwritten rows (their charges are not in "
                      "the database); the rows follow as JSON lines", len(left))
            for row in left:
                log.error("unwritten usage row: %s",
                          orjson.dumps(UsageRow._make(row)._asdict()).decode())
        return len(left)

    # --- the writer task --------------------------------------------------------------

    def _due(self) -> bool:
        if self._inflight:
            return True
        n = len(self._q)
        return n > 0 and (n >= self._batch_rows or self._closing or bool(self._waiters)
                          or time.monotonic() - self._first_at >= self._interval)

    async def _run(self) -> None:
        backoff = 0.0
        retry_at = 0.0
        while not self._stop:
            now = time.monotonic()
            if self._billing.has_stale() and now >= self._reload_retry_at:
                await self._reload()
            if self._due() and now >= retry_at:
                if await self._flush_once():
                    backoff = retry_at = 0.0
                    continue
                backoff = min(max(backoff * 2, MIN_BACKOFF_S), MAX_BACKOFF_S)
                retry_at = time.monotonic() + backoff
                continue
            if self._closing and not self._q and not self._inflight:
                return
            await self._sleep(retry_at)

    async def _sleep(self, retry_at: float) -> None:
        now = time.monotonic()
        timeout: float | None = None
        if self._inflight:
            timeout = retry_at - now
        elif self._q:
            timeout = max(self._first_at + self._interval, retry_at) - now
        if self._billing.has_stale():
            wait = self._reload_retry_at - now
            timeout = wait if timeout is None else min(timeout, wait)
        # No await since the caller's checks: clearing cannot lose a wake-up.
        self._wake.clear()
        if timeout is not None and timeout <= 0:
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _reload(self) -> None:
        try:
            await self._billing.reload_stale()
        except Exception as exc:
            self._reload_retry_at = time.monotonic() + max(self._interval, MIN_BACKOFF_S)
            log.warning("re-reading balances failed (will retry): %s", exc)

    async def _flush_once(self) -> bool:
        if not self._inflight:
            q, n = self._q, self._batch_rows
            if len(q) <= n:
                self._inflight, self._q = q, []
            else:
                self._inflight = q[:n]
                del q[:n]
        batch = self._inflight
        debits: dict[int, int] = {}
        for row in batch:
            debits[row[_ACCOUNT]] = debits.get(row[_ACCOUNT], 0) + row[_COST]
        spends = spends_of(batch)
        self._flush_started = started = time.monotonic()
        try:
            balances, spent = await self._commit(batch, debits, spends)
        except Exception as exc:
            # Rolled back; retried as is: a full or read-only disk, a lock, a bug.
            self.flush_errors += 1
            self.consecutive_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.consecutive_errors in (1, 10) or self.consecutive_errors % 100 == 0:
                log.error("writing %d usage rows failed (attempt %d, backlog %d); retrying: %s",
                          len(batch), self.consecutive_errors, self.backlog, self.last_error)
            return False
        finally:
            self._flush_started = None
        elapsed = time.monotonic() - started
        self._inflight = []
        self._billing.committed(debits, balances, spends, spent)
        if self.consecutive_errors:
            log.warning("usage writer recovered after %d failed attempts",
                        self.consecutive_errors)
            self.consecutive_errors = 0
        self._done_seq += len(batch)
        self.rows_written += len(batch)
        self.flushes += 1
        self.last_flush_seconds = elapsed
        self.last_batch_rows = len(batch)
        for target, fut in self._waiters:
            if target <= self._done_seq and not fut.done():
                fut.set_result(None)
        for observe in self.flush_observers:
            observe(elapsed, len(batch))
        return True

    async def _commit(self, batch: list[tuple[Any, ...]], debits: dict[int, int],
                      spends: dict[tuple[int, str], int]
                      ) -> tuple[list[tuple[int, int]], list[tuple[int, str, int]]]:
        """Returns (account, balance) and (key, period, spent) as committed."""
        db = self._db
        if self._leases is not None and self._lease_of is not None:
            return (await self._leases.commit_usage(UsageRow._fields, batch, self._lease_of,
                                                    self._cap_leases_of), [])
        if isinstance(db, PgDatabase):
            assert self._pg_sql is not None
            return (await postgres.commit_usage(db, self._pg_sql, batch, list(debits),
                                                UsageRow._fields), [])
        assert isinstance(db, SqliteDatabase)
        return await self._commit_sqlite(db, batch, debits, spends)

    async def _commit_sqlite(self, sdb: SqliteDatabase, batch: list[tuple[Any, ...]],
                             debits: dict[int, int], spends: dict[tuple[int, str], int]
                             ) -> tuple[list[tuple[int, int]], list[tuple[int, str, int]]]:
        returned: list[tuple[int, int]] = []
        spent: list[tuple[int, str, int]] = []
        plan: DebitPlan | None = None
        async with sqlite.transaction(sdb.conn, sdb.lock) as db:
            plan = await self._over_balance(db, batch, debits)
            if plan is not None:
                batch = [row if cost == row[_COST] else (*row[:_COST], cost, *row[_COST + 1:])
                         for row, cost in zip(batch, plan.costs, strict=True)]
                debits = plan.charges
                spends = spends_of(batch)  # keys spent what their rows were charged
            async with db.execute("SELECT COALESCE(MAX(id), 0) FROM usage") as cur:
                row = await cur.fetchone()
            max_before = int(row[0]) if row else 0
            cur = await db.executemany(INSERT_SQL, batch)
            inserted = cur.rowcount
            if inserted != len(batch):
                inserted += await self._insert_renamed(db, batch, max_before)
            if inserted != len(batch):  # never debit rows that are not in the ledger
                raise RuntimeError(f"inserted {inserted} of {len(batch)} usage rows")
            pairs = [(a, d) for a, d in debits.items() if d]
            for i in range(0, len(pairs), DEBIT_PAIRS_PER_STATEMENT):
                chunk = pairs[i:i + DEBIT_PAIRS_PER_STATEMENT]
                rows = await db.execute_fetchall(_debit_sql(len(chunk)),
                                                 [x for pair in chunk for x in pair])
                returned.extend((int(a), int(b)) for a, b in rows)
            # Every row of the batch is in the ledger (checked above): its key's spend.
            for params in caps.spend_triples(spends):
                rows = await db.execute_fetchall(caps.spend_upsert_sql(len(params) // 3),
                                                 params)
                spent.extend((int(k), str(p), int(v)) for k, p, v in rows)
        if plan is not None:
            self.written_off_nano += plan.written_off
            log.warning("usage rows cost %d nano-USD more than their accounts' balances "
                        "(money debited by another process while they ran); written off",
                        plan.written_off)
        return returned, spent

    async def _over_balance(self, db: aiosqlite.Connection, batch: list[tuple[Any, ...]],
                            debits: dict[int, int]) -> DebitPlan | None:
        """Never below zero: None when every account's balance covers its debit, else
        the plan charging each row only what its account still holds (``plan_debits``).

        In one process ``Billing`` keeps each reservation under the balance, so this is
        the backstop for money taken where ``Billing`` cannot see: ``flintproxy admin
        debit`` from another process while requests it had reserved for were running.
        Those rows are stored at the cost actually charged, so the ledger still sums to
        credited - balance, and the rest is counted (``written_off_nano``) and logged
        (amounts only). One SELECT per batch: ~1 % of a 1,000-row SQLite batch.
        """
        ids = [a for a, d in debits.items() if d]
        free: dict[int, int] = {}
        for i in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[i:i + _IDS_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            rows = await db.execute_fetchall(
                f"SELECT id, balance_nano FROM accounts WHERE id IN ({marks})",  # noqa: S608
                chunk)
            free.update((int(a), int(b)) for a, b in rows)
        if all(free.get(a, 0) >= debits[a] for a in ids):
            return None
        return plan_debits([(row[_ACCOUNT], row[_COST], None) for row in batch], free, {})

    async def _insert_renamed(self, db: aiosqlite.Connection, batch: list[tuple[Any, ...]],
                              max_before: int) -> int:
        # Some request ids were already in the ledger (or repeated in the batch).
        # Dropping those rows would lose their charges: store them renamed.
        fresh = await db.execute_fetchall(
            "SELECT request_id FROM usage WHERE id > ?", (max_before,))
        first = {str(r[0]) for r in fresh}
        again = []
        for row in batch:
            if row[0] in first:
                first.discard(row[0])
            else:
                again.append((f"{row[0]}~{secrets.token_hex(8)}", *row[1:]))
        cur = await db.executemany(INSERT_SQL.replace("OR IGNORE ", ""), again)
        self.rows_renamed += len(again)
        log.warning("%d usage rows reused a request id already in the ledger; stored with "
                    "a suffix", len(again))
        return cur.rowcount


async def open_writer_db(path: Path) -> SqliteDatabase:
    """The usage writer's own connection (store pragmas, migrated, larger WAL)."""
    db = await SqliteDatabase.open(path)
    # Checkpoint every ~40 MB of WAL instead of 4 MB: a batch dirties index pages all
    # over the file (random request ids, one insertion point per account), and
    # copying them back less often, coalesced, doubles the rows/s. The checkpoint
    # runs on the writer's thread inside COMMIT, never on the event loop.
    await db.execute(f"PRAGMA wal_autocheckpoint = {WRITER_WAL_AUTOCHECKPOINT_PAGES}")
    return db


class Balances:
    """Account balances as stored: what ``gate.billing.Billing`` reads on first use and
    after changes made elsewhere (the embedded implementation of its ``BalanceSource``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def read(self, account_ids: list[int]) -> dict[int, int]:
        """Balance in nano-USD per account id; an unknown id is left out."""
        marks = ",".join("?" * len(account_ids))
        rows = await self._db.fetch(
            f"SELECT id, balance_nano FROM accounts WHERE id IN ({marks})",  # noqa: S608
            *account_ids)
        return {int(r[0]): int(r[1]) for r in rows}

    async def read_spend(self, key_ids: list[int], periods: list[str]
                         ) -> dict[tuple[int, str], int]:
        """``key_spend.spent_nano`` per (key, period); absent: 0 (spend caps)."""
        return await caps.read_spend(self._db, key_ids, periods)
