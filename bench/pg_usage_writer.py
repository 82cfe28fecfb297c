"""The usage writer's rate on PostgreSQL (issue 14 target: >= 50,000 rows/s per node).

    .venv/bin/python bench/pg_usage_writer.py [ROWS] [--dsn DSN]

Without ``--dsn`` it starts a throwaway PostgreSQL on loopback (tests/engines.py, the
tests' own fixture code: fsync off, as in the tests; pass a DSN to measure a real
server). Records ROWS (default 300,000) rows over 100 accounts into a started
``UsageWriter`` as fast as the queue takes them and reports rows/s until every row
is committed, the CPU the PostgreSQL backends and this process spent per row (what
a dedicated core would sustain, whatever else the machine runs), the batch
statement's own rate, and the SQLite writer's rate on the same rows for the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flintproxy.config import BillingConfig
from flintproxy.gate.billing import Billing
from flintproxy.relay.routes import new_request_id
from flintproxy.store import postgres, sqlite
from flintproxy.store.db import Database
from flintproxy.store.ledger import Balances, UsageRow, UsageWriter, open_writer_db

ACCOUNTS = 100
NANO = 1_000_000_000


def rows(n: int) -> list[UsageRow]:
    now = sqlite.now_ms()
    return [UsageRow(new_request_id(), 1 + i % ACCOUNTS, 1, "gpt-4o-mini", "local", 40, 120,
                     8, 0, 0, 81, 200, "ok", 1, now + i, 350, 40) for i in range(n)]


async def seed(db: Database) -> None:
    async with db.transaction() as tx:
        await tx.executemany(
            "INSERT INTO accounts (id, email, created_at, credited_nano, balance_nano) "
            "VALUES (?, ?, 0, ?, ?)",
            [(i, f"a{i}@bench", 10**6 * NANO, 10**6 * NANO) for i in range(1, ACCOUNTS + 1)])


def backend_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the PostgreSQL backends ``pids`` have used."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


async def through_writer(db: Database, data: list[UsageRow]) -> float:
    cfg = BillingConfig(max_backlog_rows=10**9, flush_batch_rows=5000)
    writer = UsageWriter(db, Billing({}, cfg, Balances(db)), cfg)
    writer.start()
    t0 = time.perf_counter()
    for i in range(0, len(data), 1000):
        for row in data[i:i + 1000]:
            writer.record(row)
        await asyncio.sleep(0)
    assert await writer.sync(600)
    elapsed = time.perf_counter() - t0
    assert await writer.drain(10) == 0
    return len(data) / elapsed


async def run(n: int, dsn: str) -> None:
    db = await postgres.open_database(dsn, 4)
    try:
        await postgres.migrate(db)
        await seed(db)
        await through_writer(db, rows(20_000))  # warm: prepared statements, caches
        pids = [int(r[0]) for r in await db.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]
        cpu0, own0 = backend_cpu_s(pids), time.process_time()
        pg_rate = await through_writer(db, rows(n))
        pg_cpu, own_cpu = backend_cpu_s(pids) - cpu0, time.process_time() - own0
        sql = postgres.batch_sql(UsageRow._fields)
        batch = [tuple(r) for r in rows(5000)]
        t0 = time.perf_counter()
        await postgres.commit_usage(db, sql, batch, list(range(1, ACCOUNTS + 1)),
                                    UsageRow._fields)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        await postgres.commit_usage(db, sql, batch, list(range(1, ACCOUNTS + 1)),
                                    UsageRow._fields)
        again = time.perf_counter() - t0
        stored = await db.fetchval("SELECT COUNT(*) FROM usage")
    finally:
        await db.close()
    with tempfile.TemporaryDirectory(prefix="flint-bench-") as d:
        lite = await open_writer_db(Path(d) / "w.db")
        try:
            await seed(lite)
            await through_writer(lite, rows(20_000))
            lite_rate = await through_writer(lite, rows(n))
        finally:
            await lite.close()
    print(f"PostgreSQL usage writer: {n:,} rows in batches of 5,000: {pg_rate:,.0f} rows/s "
          f"wall clock ({stored:,} rows stored; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores)")
    print(f"  CPU per row: PostgreSQL backends {pg_cpu / n * 1e6:.1f} us "
          f"({n / max(pg_cpu, 1e-9):,.0f} rows per backend CPU-second), the gateway process "
          f"{own_cpu / n * 1e6:.1f} us ({n / max(own_cpu, 1e-9):,.0f} rows per CPU-second)")
    print(f"  one batch statement, 5,000 rows: {one * 1000:.1f} ms "
          f"({5000 / one:,.0f} rows/s); the same batch retried: {again * 1000:.1f} ms, "
          "nothing inserted or charged")
    print(f"SQLite usage writer, same rows: {lite_rate:,.0f} rows/s; "
          f"PostgreSQL / SQLite = {pg_rate / lite_rate:.2f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("rows", type=int, nargs="?", default=300_000)
    p.add_argument("--dsn")
    args = p.parse_args()
    if args.dsn:
        asyncio.run(run(args.rows, args.dsn))
        return
    from tests.engines import PostgresServer

    server = PostgresServer.start()
    try:
        asyncio.run(run(args.rows, server.new_database("bench")))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
