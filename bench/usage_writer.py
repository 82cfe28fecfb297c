"""Usage-ledger benchmark: writer rows/s into SQLite (WAL), event-loop lag, export speed.

    .venv/bin/python bench/usage_writer.py [--rows 1000000] [--accounts 1000]
                                           [--rate 50000] [--export-rows 1000000]

1. burst: records --rows rows as fast as the loop allows and times until all are
   committed (the writer's sustained ceiling), plus the commit-only rate;
2. paced: records at --rate rows/s for 5 s while a 1 ms ticker measures how late
   the event loop runs (what a /v1 request would feel), against an idle baseline;
3. export: streams --export-rows rows of one account through the real
   GET /api/usage/export (CSV and JSON) over HTTP with a login session and reports
   rows/s and the process's peak RSS growth.
Prints plain figures; the database lives in a temp directory.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flintproxy.config import BillingConfig, build_config
from flintproxy.gate.billing import Billing
from flintproxy.store import sqlite
from flintproxy.store.ledger import Balances, UsageRow, UsageWriter, open_writer_db

NANO = 1_000_000_000


def request_id(ordered: bool) -> str:
    if ordered:  # time-ordered (ms prefix), as a gateway can generate them
        return f"req_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"
    return f"req_{secrets.token_hex(12)}"  # random: the index's worst case


def make_rows(n: int, accounts: int, start: int = 0, ordered: bool = False) -> list[UsageRow]:
    now = sqlite.now_ms()
    return [UsageRow(request_id(ordered), 1 + i % accounts, 1 + i % accounts,
                     "gpt-4o-mini", "local", 40, 120, 8, 0, 0, 81, 200, "ok", 1,
                     now + i, 350, 40) for i in range(start, start + n)]


async def open_db(path: Path, accounts: int, batch: int) -> tuple[Any, UsageWriter, Billing]:
    db = await open_writer_db(path)
    await db.conn.execute("BEGIN")
    await db.conn.executemany(
        "INSERT INTO accounts (id, email, created_at, credited_nano, balance_nano) "
        "VALUES (?, ?, 0, ?, ?)",
        [(i, f"a{i}@bench", 10**6 * NANO, 10**6 * NANO) for i in range(1, accounts + 1)])
    await db.conn.execute("COMMIT")
    cfg = BillingConfig(max_backlog_rows=10**9, flush_batch_rows=batch)
    billing = Billing({}, cfg, Balances(db))
    writer = UsageWriter(db, billing, cfg)
    writer.start()
    return db, writer, billing


async def burst(tmp: Path, rows: int, accounts: int, batch: int, ordered: bool) -> None:
    db, writer, _ = await open_db(tmp / f"burst{batch}{ordered}.db", accounts, batch)
    data = make_rows(rows, accounts, ordered=ordered)
    flush_s: list[float] = []
    writer.flush_observers.append(lambda s, n: flush_s.append(s))
    t0 = time.perf_counter()
    for i in range(0, rows, 1000):
        for row in data[i:i + 1000]:
            writer.record(row)
        await asyncio.sleep(0)
    record_s = time.perf_counter() - t0
    await writer.sync()
    total = time.perf_counter() - t0
    await writer.drain()
    async with db.conn.execute("SELECT COUNT(*), SUM(cost_nano) FROM usage") as cur:
        count, cost = await cur.fetchone()
    async with db.conn.execute("SELECT SUM(charged_nano) FROM accounts") as cur:
        (charged,) = await cur.fetchone()
    await db.close()
    assert count == rows and cost == charged, (count, rows, cost, charged)
    kind = "ordered" if ordered else "random"
    print(f"burst (batch {batch}, {kind} ids): {rows} rows recorded in {record_s:.2f} s, "
          f"all committed after {total:.2f} s -> {rows / total:,.0f} rows/s sustained; "
          f"{len(flush_s)} transactions, median {statistics.median(flush_s) * 1000:.0f} ms, "
          f"max {max(flush_s) * 1000:.0f} ms")


async def ticker(stop: asyncio.Event, lags: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t - 0.001)


async def paced(tmp: Path, rate: int, accounts: int, batch: int, ordered: bool,
                seconds: float = 5.0) -> None:
    async def measure(mode: str) -> list[float]:
        db, writer, _ = await open_db(tmp / f"paced-{mode}.db", accounts, batch)
        stop = asyncio.Event()
        lags: list[float] = []
        tick = asyncio.get_running_loop().create_task(ticker(stop, lags))
        t0 = time.perf_counter()
        sent = 0
        while (elapsed := time.perf_counter() - t0) < seconds:
            if mode != "idle":
                due = int(elapsed * rate) - sent
                rows = make_rows(due, accounts, sent, ordered)
                if mode == "writer":
                    for row in rows:
                        writer.record(row)
                sent += due
            await asyncio.sleep(0.002)
        stop.set()
        await tick
        backlog_end = writer.backlog
        await writer.drain()
        if mode == "writer":
            print(f"paced: {sent} rows offered at {sent / seconds:,.0f} rows/s for {seconds:.0f} s,"
                  f" {writer.flushes} transactions, backlog at the end {backlog_end}")
        await db.close()
        return lags

    results = [(name, await measure(mode)) for name, mode in (
        ("idle", "idle"), ("rows made, not written", "produce"),
        ("rows made and written", "writer"))]
    for name, lags in results:
        q = statistics.quantiles([x * 1000 for x in lags], n=100)
        print(f"event-loop lag, {name}: p50 {q[49]:.2f} ms  p99 {q[98]:.2f} ms  "
              f"max {max(lags) * 1000:.2f} ms")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


async def export(tmp: Path, rows: int) -> None:
    from flintproxy.app import factory as app_module
    from flintproxy.gate.keys import ACCOUNTS, accounts_ctx
    from flintproxy.store.ledger import add_usage_routes, usage_ctx

    path = tmp / "export.db"
    db = await sqlite.open_store(path)
    await db.execute("INSERT INTO accounts (id, email, created_at) VALUES (1, 'x@bench', 0)")
    await db.execute("BEGIN")
    for i in range(0, rows, 50_000):
        await db.executemany(
            "INSERT INTO usage (request_id, account_id, key_id, model, upstream, prompt_tokens,"
            " completion_tokens, cost_nano, status, outcome, stream, started_at, duration_ms,"
            " ttfb_ms) VALUES (?, 1, 1, 'gpt-4o-mini', 'local', 40, 120, 81, 200, 'ok', 1, ?,"
            " 350, 40)", [(f"req_{j:012d}", 1_700_000_000_000 + j)
                          for j in range(i, min(rows, i + 50_000))])
    await db.execute("COMMIT")
    await db.close()
    cfg = build_config({
        "storage": {"path": str(path)},
        "upstreams": [{"name": "x", "base_url": "http://127.0.0.1:9/v1", "models": ["m"]}],
        "models": {"m": {"input_usd_per_mtok": "1", "output_usd_per_mtok": "1"}},
        "accounts": {"bcrypt_cost": 4}}, {})
    app = web.Application()
    app[app_module.CONFIG] = cfg
    app.cleanup_ctx.append(accounts_ctx)
    app.cleanup_ctx.append(usage_ctx)
    add_usage_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    token, _ = await app[ACCOUNTS].create_session(1)
    async with aiohttp.ClientSession(cookies={"flint_session": token}) as http:
        for fmt in ("csv", "json"):
            rss0 = rss_mb()
            peak = [rss0]
            stop = asyncio.Event()

            async def sample(peak: list[float] = peak, stop: asyncio.Event = stop) -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_mb())
                    await asyncio.sleep(0.02)

            sampler = asyncio.get_running_loop().create_task(sample())
            t0 = time.perf_counter()
            size = 0
            async with http.get(f"http://127.0.0.1:{port}/api/usage/export?format={fmt}") as r:
                assert r.status == 200, r.status
                async for chunk in r.content.iter_chunked(1 << 16):
                    size += len(chunk)
            dt = time.perf_counter() - t0
            stop.set()
            await sampler
            print(f"export {fmt}: {rows} rows, {size / 1e6:.0f} MB in {dt:.2f} s -> "
                  f"{rows / dt:,.0f} rows/s; process RSS {rss0:.0f} MB before, "
                  f"{peak[0]:.0f} MB peak during (server and client in one process)")
    await runner.cleanup()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--rate", type=int, default=50_000)
    p.add_argument("--export-rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=5000, help="billing.flush_batch_rows")
    p.add_argument("--ids", choices=("random", "ordered"), default="random")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() first, as a server can do once after start-up")
    p.add_argument("--skip", default="", help="comma list of burst,paced,export to skip")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    if args.gc_freeze:
        gc.freeze()
    with tempfile.TemporaryDirectory(prefix="flint-bench-") as d:
        tmp = Path(d)
        if "burst" not in skip:
            await burst(tmp, args.rows, args.accounts, args.batch, args.ids == "ordered")
        if "paced" not in skip:
            await paced(tmp, args.rate, args.accounts, args.batch, args.ids == "ordered")
        if "export" not in skip:
            await export(tmp, args.export_rows)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
