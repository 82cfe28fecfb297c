"""The usage ledger: batched writer, invariant, faults, SIGKILL, export, delete, retention."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import orjson
import pytest

from flintproxy.app.runner import Server as GatewayServer
from flintproxy.config import BillingConfig, Config, ModelPrice, build_config
from flintproxy.errors import ServiceUnavailable
from flintproxy.gate.billing import Billing
from flintproxy.store import sqlite
from flintproxy.store.db import Database, SqliteDatabase
from flintproxy.store.ledger import Balances, UsageRow, UsageWriter, open_writer_db
from flintproxy.store.retention import DAY_MS, PURGE_CHUNK, RetentionJob, purge
from tests.support import to_toml

ROOT = Path(__file__).resolve().parents[2]
PRICES = {"gpt-4o-mini": ModelPrice(150_000_000, 600_000_000, 75_000_000)}
CLOCK0 = 1_700_000_000_000



def row(request_id: str, account_id: int, cost: int, started_at: int | None = None,
        model: str = "gpt-4o-mini") -> UsageRow:
    return UsageRow(request_id, account_id, 7, model, "local", 10, 20, 2, 0, 0, cost, 200, "ok",
                    1, started_at if started_at is not None else sqlite.now_ms(), 12, 3)


async def add_account(db: aiosqlite.Connection, credit: int, status: str = "active",
                      deleted_at: int | None = None) -> int:
    cur = await db.execute(
        "INSERT INTO accounts (email, status, created_at, deleted_at, credited_nano, "
        "balance_nano) VALUES (?, ?, 0, ?, ?, ?)",
        (None if status == "deleted" else f"{time.time_ns()}@x", status, deleted_at, credit,
         credit))
    assert cur.lastrowid is not None
    return cur.lastrowid


async def check_invariant(conn: aiosqlite.Connection | Database,
                          rows_deleted: bool = False) -> int:
    """balance = credited - charged for every account; charged = sum(costs) if nothing deleted.

    Returns the number of usage rows.
    """
    db = SqliteDatabase(conn) if isinstance(conn, aiosqlite.Connection) else conn
    bad = await db.fetch(
        "SELECT id FROM accounts WHERE balance_nano != credited_nano - charged_nano")
    assert list(bad) == []
    if not rows_deleted:
        mismatched = await db.fetch(
            "SELECT a.id, a.charged_nano, COALESCE(u.total, 0) FROM accounts a LEFT JOIN "
            "(SELECT account_id, SUM(cost_nano) AS total FROM usage GROUP BY account_id) u "
            "ON u.account_id = a.id WHERE a.charged_nano != COALESCE(u.total, 0)")
        assert list(mismatched) == []
    dups = await db.fetch(
        "SELECT request_id FROM usage GROUP BY request_id HAVING COUNT(*) > 1")
    assert list(dups) == []
    return int(await db.fetchval("SELECT COUNT(*) FROM usage"))


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[tuple[aiosqlite.Connection, Path]]:
    path = tmp_path / "ledger.db"
    db = await sqlite.open_store(path)
    yield db, path
    await db.close()


def make_writer(conn: aiosqlite.Connection | Database, **cfg: Any
                ) -> tuple[Billing, UsageWriter]:
    db = SqliteDatabase(conn) if isinstance(conn, aiosqlite.Connection) else conn
    bcfg = BillingConfig(**{"flush_interval_s": 0.02, "flush_batch_rows": 100, **cfg})
    billing = Billing(PRICES, bcfg, Balances(db))
    return billing, UsageWriter(db, billing, bcfg)


# --- the writer ---------------------------------------------------------------------------


def test_usage_row_maps_outcome_and_bounds_absurd_counts() -> None:
    from flintproxy.gate.gate import Admission, Call, Outcome, Principal
    from flintproxy.gate.service import MAX_ROW_INT, usage_row
    from flintproxy.relay.routes import new_request_id

    call = Call("chat/completions", "gpt-4o-mini", True, 12, 30, new_request_id())
    adm = Admission(call, Principal(key_id=5, account_id=9), 0.0, CLOCK0)
    out = Outcome(status=200, outcome="client_disconnect", upstream="local", prompt_tokens=12,
                  completion_tokens=10**30, cached_tokens=-3, estimated=True, ttfb_s=0.0425,
                  duration_s=1.2344)
    r = usage_row(adm, out, 10**40)
    assert r == UsageRow(call.request_id, 9, 5, "gpt-4o-mini", "local", 12, MAX_ROW_INT, 0, 0,
                         1, MAX_ROW_INT, 200, "client_disconnect", 1, CLOCK0, 1234, 42,
                         "chat/completions")
    a, b = new_request_id(), new_request_id()
    assert a != b and len(a) == 28 and a[:16] <= b[:16]  # time-ordered prefix


async def test_batches_and_invariant(ledger: tuple[aiosqlite.Connection, Path]) -> None:
    db, path = ledger
    wdb = await open_writer_db(path)
    billing, writer = make_writer(wdb)
    accounts = [await add_account(db, 10**9) for _ in range(3)]
    for a in accounts:
        await billing.load(a)
    sizes: list[int] = []
    writer.flush_observers.append(lambda s, n: sizes.append(n))
    writer.start()
    for i in range(1050):
        writer.record(row(f"req-{i}", accounts[i % 3], 1000 + i))
        if i % 200 == 0:
            await asyncio.sleep(0)
    assert await writer.sync(10)
    assert sum(sizes) == 1050 and max(sizes) <= 100 and len(sizes) >= 11
    assert writer.rows_written == 1050 and writer.backlog == 0 and writer.ready()
    assert await check_invariant(db) == 1050
    for a in accounts:
        async with db.execute("SELECT balance_nano FROM accounts WHERE id = ?", (a,)) as cur:
            bal = await cur.fetchone()
        assert bal is not None and billing.snapshot(a) == (bal[0], 0, 0)
    assert await writer.drain(5) == 0
    await wdb.close()


async def test_flushes_by_time_without_reaching_batch(
        ledger: tuple[aiosqlite.Connection, Path]) -> None:
    db, _ = ledger
    _, writer = make_writer(db, flush_batch_rows=10_000, flush_interval_s=0.05)
    account = await add_account(db, 10**9)
    writer.start()
    t0 = time.monotonic()
    for i in range(3):
        writer.record(row(f"t{i}", account, 5))
    while await check_invariant(db) < 3:
        assert time.monotonic() - t0 < 5
        await asyncio.sleep(0.01)
    assert writer.flushes == 1
    await writer.drain(5)


async def test_reused_request_ids_are_all_charged(
        ledger: tuple[aiosqlite.Connection, Path]) -> None:
    db, _ = ledger
    _, writer = make_writer(db)
    account = await add_account(db, 10**9)
    await db.execute(
        "INSERT INTO usage (request_id, account_id, model, prompt_tokens, completion_tokens, "
        "cost_nano, status, outcome, stream, started_at, duration_ms) "
        "VALUES ('client-id', ?, 'gpt-4o-mini', 1, 1, 11, 200, 'ok', 0, 0, 1)", (account,))
    await db.execute("UPDATE accounts SET charged_nano = 11, balance_nano = balance_nano - 11 "
                     "WHERE id = ?", (account,))
    writer.start()
    # A client resends its own X-Request-ID: same batch, next batch, and one already stored.
    for cost in (100, 200, 300):
        writer.record(row("client-id", account, cost))
    assert await writer.sync(5)
    writer.record(row("client-id", account, 400))
    assert await writer.sync(5)
    assert writer.rows_renamed == 4
    assert await check_invariant(db) == 5
    async with db.execute("SELECT charged_nano FROM accounts WHERE id = ?", (account,)) as cur:
        charged = await cur.fetchone()
    assert charged is not None and charged[0] == 11 + 100 + 200 + 300 + 400
    await writer.drain(5)


async def test_rows_never_take_a_balance_below_zero_and_the_rest_is_written_off(
        ledger: tuple[aiosqlite.Connection, Path]) -> None:
    # Money left the account where this process's Billing could not see it (an
    # operator's debit from another process) while these requests ran.
    db, _ = ledger
    _, writer = make_writer(db)
    poor, rich = await add_account(db, 250), await add_account(db, 10**9)
    writer.start()
    for i, cost in enumerate((100, 100, 100, 100)):
        writer.record(row(f"p{i}", poor, cost))
        writer.record(row(f"r{i}", rich, cost))
    assert await writer.sync(5)
    assert writer.written_off_nano == 150
    assert await check_invariant(db) == 8  # each row stored at the cost actually charged
    async with db.execute("SELECT id, balance_nano FROM accounts WHERE id IN (?, ?)",
                          (poor, rich)) as cur:
        balances = dict(await cur.fetchall())
    assert balances == {poor: 0, rich: 10**9 - 400}
    async with db.execute("SELECT request_id, cost_nano FROM usage WHERE account_id = ? "
                          "ORDER BY request_id", (poor,)) as cur:
        assert await cur.fetchall() == [("p0", 100), ("p1", 100), ("p2", 50), ("p3", 0)]
    async with db.execute("SELECT SUM(spent_nano) FROM key_spend WHERE key_id = 7 "
                          "GROUP BY substr(period, 1, 1)") as cur:
        assert await cur.fetchall() == [(250 + 400,), (250 + 400,)]  # the day, the month
    await writer.drain(5)


async def test_drain_commits_everything_at_shutdown(
        ledger: tuple[aiosqlite.Connection, Path]) -> None:
    db, _ = ledger
    _, writer = make_writer(db, flush_batch_rows=1_000_000, flush_interval_s=3600)
    account = await add_account(db, 10**9)
    writer.start()
    for i in range(2500):
        writer.record(row(f"d{i}", account, 3))
    await asyncio.sleep(0.05)
    assert writer.backlog == 2500  # neither count nor interval reached
    assert await writer.drain(10) == 0
    assert await check_invariant(db) == 2500


# --- faults -------------------------------------------------------------------------------


class Fault:
    """A real write failure for the writer's database; ``apply()`` / ``heal()``."""

    name = "fault"

    def __init__(self, path: Path, wdb: SqliteDatabase | None = None) -> None:
        self.path = path
        self.wdb = wdb

    async def apply(self) -> None:
        raise NotImplementedError

    async def heal(self) -> None:
        raise NotImplementedError


class PageLimit(Fault):
    """SQLite's own "database or disk is full": max_page_count pinned to the current size."""

    async def apply(self) -> None:
        assert self.wdb is not None
        async with self.wdb.conn.execute("PRAGMA page_count") as cur:
            pages = await cur.fetchone()
        assert pages is not None
        await self.wdb.conn.execute(f"PRAGMA max_page_count = {pages[0]}")

    async def heal(self) -> None:
        assert self.wdb is not None
        await self.wdb.conn.execute("PRAGMA max_page_count = 1073741823")


class Immutable(Fault):
    """The database and WAL files made immutable (chattr +i): writes fail even for root."""

    def files(self) -> list[str]:
        return [str(self.path), f"{self.path}-wal"]

    async def apply(self) -> None:
        if shutil.which("chattr") is None:
            pytest.skip("chattr not available")
        done = await asyncio.to_thread(subprocess.run, ["chattr", "+i", *self.files()],
                                       capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"chattr +i not permitted here: {done.stderr.decode().strip()}")

    async def heal(self) -> None:
        await asyncio.to_thread(subprocess.run, ["chattr", "-i", *self.files()],
                                capture_output=True, check=False)


class FullDisk(Fault):
    """A real full filesystem: the database lives on a small tmpfs that gets filled up."""

    async def apply(self) -> None:
        fd = os.open(self.path.parent / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError:
            pass
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):  # the last few blocks, 4 KiB at a time
            fd = os.open(self.path.parent / "filler2", os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            finally:
                os.close(fd)

    async def heal(self) -> None:
        for name in ("filler", "filler2"):
            with contextlib.suppress(FileNotFoundError):
                (self.path.parent / name).unlink()


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@pytest.mark.parametrize("kind", [PageLimit, Immutable, FullDisk])
async def test_disk_failure_retries_then_lands_everything(
        tmp_path: Path, kind: type[Fault]) -> None:
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(tmpfs(tmp_path / "disk", "8m")) if kind is FullDisk \
            else tmp_path
        path = base / "ledger.db"
        db = await sqlite.open_store(path)
        wdb = await open_writer_db(path)
        try:
            await run_fault_scenario(db, wdb, kind(path, wdb))
        finally:
            await wdb.close()
            await db.close()


async def run_fault_scenario(db: aiosqlite.Connection, wdb: SqliteDatabase,
                             fault: Fault) -> None:
    billing, writer = make_writer(wdb, max_backlog_rows=3000)
    accounts = [await add_account(db, 10**12) for _ in range(4)]
    for a in accounts:
        await billing.load(a)
    writer.start()
    writer.record(row("before", accounts[0], 1))
    assert await writer.sync(5)
    await fault.apply()
    try:
        for i in range(2000):
            writer.record(row(f"f{i}-{'x' * 40}", accounts[i % 4], 10 + i))
        t0 = time.monotonic()
        while writer.consecutive_errors < 3:
            assert time.monotonic() - t0 < 20, "the writer never hit the fault"
            await asyncio.sleep(0.02)
        # Unready, backlog visible, nothing dropped, balances still exact in memory.
        assert writer.stalled and not writer.ready()
        assert writer.backlog == 2000 and writer.flush_errors >= 3
        assert writer.last_error is not None
        assert billing.available(accounts[1]) == 10**12 - sum(
            10 + i for i in range(2000) if i % 4 == 1)
        assert not writer.overloaded()
        for i in range(1000):
            writer.record(row(f"g{i}", accounts[i % 4], 1))
        assert writer.overloaded()
        with pytest.raises(ServiceUnavailable) as info:
            writer.refuse_if_overloaded()
        assert info.value.status == 503
    finally:
        await fault.heal()
    assert await writer.sync(30)
    assert writer.backlog == 0 and writer.ready() and not writer.overloaded()
    assert await check_invariant(db) == 3001
    async with db.execute("SELECT SUM(charged_nano) FROM accounts") as cur:
        total = await cur.fetchone()
    assert total is not None and total[0] == 1 + sum(10 + i for i in range(2000)) + 1000
    assert await writer.drain(5) == 0


async def test_drain_that_cannot_finish_logs_every_row(
        ledger: tuple[aiosqlite.Connection, Path], caplog: pytest.LogCaptureFixture) -> None:
    db, path = ledger
    wdb = await open_writer_db(path)
    _, writer = make_writer(wdb)
    account = await add_account(db, 10**9)
    writer.start()
    fault = PageLimit(path, wdb)
    await fault.apply()
    for i in range(300):
        writer.record(row(f"lost-{i}-{'y' * 60}", account, 9))
    with caplog.at_level(logging.ERROR, logger="flintproxy.store.ledger"):
        left = await writer.drain(0.3)
    assert left == 300
    logged = [r.getMessage() for r in caplog.records if "unwritten usage row" in r.getMessage()]
    assert len(logged) == 300 and '"cost_nano":9' in logged[0]
    await wdb.close()


# --- SIGKILL under load ---------------------------------------------------------------------

CHILD = """
import asyncio, sys, time
from pathlib import Path
from flintproxy.gate.billing import Billing
from flintproxy.config import BillingConfig
from flintproxy.store.sqlite import now_ms
from flintproxy.store.ledger import Balances, UsageRow, UsageWriter, open_writer_db

async def main(path, prefix, accounts):
    db = await open_writer_db(Path(path))
    cfg = BillingConfig()
    billing = Billing({}, cfg, Balances(db))
    writer = UsageWriter(db, billing, cfg)
    writer.start()
    i = 0
    while True:  # ~20k rows/s until killed
        for _ in range(200):
            i += 1
            writer.record(UsageRow(f"{prefix}-{i}", 1 + i % accounts, 1, "gpt-4o-mini", "up",
                                   30, 60, 0, 0, 0, 45 + i % 7, 200, "ok", 1, now_ms(), 9, 2))
        if writer.rows_written and i % 2000 == 0:
            print(writer.rows_written, flush=True)
        await asyncio.sleep(0.01)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.slow
async def test_sigkill_under_load_keeps_the_invariant(
        ledger: tuple[aiosqlite.Connection, Path]) -> None:
    db, path = ledger
    for _ in range(20):
        await add_account(db, 10**12)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for run in range(2):  # kill, restart on the same file, kill again
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, str(path), f"run{run}", "20",
            stdout=asyncio.subprocess.PIPE, env=env)
        assert proc.stdout is not None
        for _ in range(3):  # let a few batches commit, then kill mid-stream
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "the writer process died"
        proc.send_signal(signal.SIGKILL)
        killed_ms = sqlite.now_ms()
        await proc.wait()
        n = await check_invariant(db)
        assert n > 0
        async with db.execute("SELECT MAX(started_at) FROM usage WHERE request_id LIKE ?",
                              (f"run{run}-%",)) as cur:
            newest = await cur.fetchone()
        assert newest is not None and newest[0] is not None
        # The rows lost are those of the last flush interval or so (documented window).
        assert killed_ms - newest[0] < 2000
    async with db.execute("PRAGMA integrity_check") as cur:
        assert await cur.fetchone() == ("ok",)


# --- users' rights: list, export, delete ------------------------------------------------------


def make_config(tmp_path: Path, storage: dict[str, Any] | None = None, **billing: Any
                ) -> Config:
    return build_config({
        "storage": storage or {"path": str(tmp_path / "api.db")},
        "upstreams": [{"name": "x", "base_url": "http://127.0.0.1:9/v1",
                       "models": ["gpt-4o-mini"]}],
        "models": {"gpt-4o-mini": {"input_usd_per_mtok": "0.15", "output_usd_per_mtok": "0.60"}},
        "accounts": {"bcrypt_cost": 4},
        "billing": {"flush_interval_s": 0.02, **billing},
    }, {})


class Api:
    """The control plane of a real gateway, with a session whose paths are relative."""

    def __init__(self, client: aiohttp.ClientSession, server: GatewayServer) -> None:
        self.client = client
        self.components = server.components

    @property
    def db(self) -> Database:
        return self.components.accounts.db

    async def login(self, email: str) -> tuple[int, dict[str, str]]:
        repo = self.components.accounts
        account = await repo.create_account(email, None)
        token, session = await repo.create_session(account)
        return account, {"Cookie": f"flint_session={token}", "X-CSRF-Token": session.csrf_token}


@pytest.fixture
async def api(tmp_path: Path, storage: dict[str, Any]) -> AsyncIterator[Api]:
    """Users' rights over their rows, on each store engine."""
    server = GatewayServer(make_config(tmp_path, storage))
    await server.startup("127.0.0.1", 0, console_port=0)
    url = f"http://127.0.0.1:{server.console_addresses[0][1]}"
    try:
        async with aiohttp.ClientSession(base_url=url) as client:
            yield Api(client, server)
    finally:
        await server.shutdown()


async def bulk_rows(conn: aiosqlite.Connection | Database, account: int, n: int,
                    start: int = CLOCK0, model: str = "gpt-4o-mini") -> None:
    db = SqliteDatabase(conn) if isinstance(conn, aiosqlite.Connection) else conn
    async with db.transaction() as tx:
        for i in range(0, n, 50_000):
            await tx.executemany(
            "INSERT INTO usage (request_id, account_id, key_id, model, upstream, prompt_tokens, "
            "completion_tokens, cost_nano, status, outcome, stream, started_at, duration_ms, "
            "ttfb_ms) VALUES (?, ?, 3, ?, 'local', 40, 120, 81, 200, 'ok', 1, ?, 350, 40)",
            [(f"a{account}-{model}-{j:09d}", account, model, start + j)
             for j in range(i, min(n, i + 50_000))])


async def test_list_pages_filters_and_isolation(api: Api) -> None:
    me, headers = await api.login("me@example.com")
    other, _ = await api.login("other@example.com")
    await bulk_rows(api.db, me, 250)
    await bulk_rows(api.db, me, 5, start=CLOCK0 + 10_000, model="gpt-4o")
    await bulk_rows(api.db, other, 50)
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = "/api/usage?limit=100&model=gpt-4o-mini" + (f"&cursor={cursor}" if cursor else "")
        resp = await api.client.get(q, headers=headers)
        assert resp.status == 200
        page = await resp.json()
        seen += page["data"]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert len(seen) == 250 and len({r["request_id"] for r in seen}) == 250
    times = [r["started_at_ms"] for r in seen]
    assert times == sorted(times, reverse=True)  # newest first
    first = seen[-1]
    assert first["request_id"] == f"a{me}-gpt-4o-mini-000000000"
    assert first["started_at"] == "2023-11-14T22:13:20.000Z"
    assert first["cost_nano"] == 81 and first["cost_usd"] == "0.000000081"
    assert first["total_tokens"] == 160 and first["stream"] is True
    assert "account_id" not in first
    resp = await api.client.get(
        f"/api/usage?since={CLOCK0 + 10}&until=2023-11-14T22:13:20.020Z", headers=headers)
    data = (await resp.json())["data"]
    assert [r["started_at_ms"] - CLOCK0 for r in data] == list(range(19, 9, -1))
    assert len((await (await api.client.get("/api/usage", headers=headers)).json())["data"]) == 100
    for bad in ("limit=0", "limit=1001", "cursor=zz", "since=yesterday"):
        resp = await api.client.get(f"/api/usage?{bad}", headers=headers)
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert (await api.client.get("/api/usage")).status == 401


async def test_export_200k_rows_streams_in_constant_memory(api: Api, tmp_path: Path) -> None:
    me, headers = await api.login("big@example.com")
    n = 200_000
    await bulk_rows(api.db, me, n)
    for fmt in ("csv", "json"):
        out = tmp_path / f"export.{fmt}"
        tracemalloc.start()
        try:
            resp = await api.client.get(f"/api/usage/export?format={fmt}", headers=headers)
            assert resp.status == 200
            assert "attachment" in resp.headers["Content-Disposition"]
            with out.open("wb") as f:
                async for chunk in resp.content.iter_chunked(1 << 16):
                    f.write(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # 200k rows held at once would take well over 100 MB; a chunk takes ~1 MB.
        assert peak < 20 * 2**20, f"{fmt} export peaked at {peak / 2**20:.1f} MiB"
        if fmt == "csv":
            with out.open(newline="") as f:
                records = list(csv.DictReader(f))
            assert records[0]["stream"] == "true" and records[0]["ttfb_ms"] == "40"
        else:
            records = orjson.loads(out.read_bytes())
        assert len(records) == n
        assert records[0]["request_id"] == f"a{me}-gpt-4o-mini-000000000"
        assert records[-1]["request_id"] == f"a{me}-gpt-4o-mini-{n - 1:09d}"
    resp = await api.client.get("/api/usage/export?format=xml", headers=headers)
    assert resp.status == 400


async def test_delete_needs_csrf_and_keeps_totals(api: Api) -> None:
    me, headers = await api.login("del@example.com")
    other, _ = await api.login("keep@example.com")
    await api.db.execute("UPDATE accounts SET credited_nano = 10000, balance_nano = 10000")
    await api.db.execute("INSERT INTO credits (account_id, amount_nano, created_at) "
                         "SELECT id, 10000, 0 FROM accounts")
    writer = api.components.usage
    for i in range(12):
        writer.record(row(f"mine-{i}", me, 10))
    writer.record(row("theirs", other, 10))
    assert await writer.sync(5)
    for i in range(3):  # still queued when the delete arrives: deleted too
        writer.record(row(f"late-{i}", me, 10))
    no_csrf = {"Cookie": headers["Cookie"]}
    resp = await api.client.delete("/api/usage", headers=no_csrf)
    assert resp.status == 403
    resp = await api.client.delete("/api/usage", headers=headers)
    assert resp.status == 200 and await resp.json() == {"deleted": 15}
    assert await check_invariant(api.db, rows_deleted=True) == 1
    assert tuple(await api.db.fetchrow(  # type: ignore[arg-type]
        "SELECT charged_nano, balance_nano FROM accounts WHERE id = ?", me)) == (150, 9850)
    resp = await api.client.get("/api/usage", headers=headers)
    assert (await resp.json())["data"] == []


# --- retention ----------------------------------------------------------------------------------


async def test_retention_purges_after_the_configured_days(
        ledger: tuple[aiosqlite.Connection, Path]) -> None:
    db, _ = ledger
    gone = await add_account(db, 0, status="deleted", deleted_at=CLOCK0)
    later = await add_account(db, 0, status="deleted", deleted_at=CLOCK0 + 50 * DAY_MS)
    alive = await add_account(db, 0)
    await bulk_rows(db, gone, PURGE_CHUNK * 2 + 17)
    await bulk_rows(db, later, 10)
    await bulk_rows(db, alive, 10)
    await db.execute("UPDATE accounts SET charged_nano = 5, credited_nano = 5")
    now = CLOCK0 + 90 * DAY_MS - 1
    job = RetentionJob(SqliteDatabase(db), 90, clock=lambda: now)
    assert await job.run_once() == 0
    now += 1
    assert await job.run_once() == PURGE_CHUNK * 2 + 17
    assert await purge(SqliteDatabase(db), 90, CLOCK0 + 139 * DAY_MS) == 0
    assert await purge(SqliteDatabase(db), 30, CLOCK0 + 80 * DAY_MS) == 10  # configurable days
    async with db.execute("SELECT account_id, COUNT(*) FROM usage GROUP BY account_id") as cur:
        assert list(await cur.fetchall()) == [(alive, 10)]
    async with db.execute("SELECT SUM(charged_nano) FROM accounts") as cur:
        assert await cur.fetchone() == (15,)  # totals untouched
    assert job.purged == PURGE_CHUNK * 2 + 17


def test_admin_purge_verb(tmp_path: Path) -> None:
    from flintproxy.tools import admin

    cfg = tmp_path / "flint.toml"
    cfg.write_text(textwrap.dedent(f"""
        [storage]
        path = "{tmp_path / 'admin.db'}"
        [[upstreams]]
        name = "x"
        base_url = "http://127.0.0.1:9/v1"
        models = ["gpt-4o-mini"]
        [models."gpt-4o-mini"]
        input_usd_per_mtok = "0.15"
        output_usd_per_mtok = "0.60"
        [billing]
        retention_days = 1
    """))

    async def setup() -> int:
        db = await sqlite.open_store(tmp_path / "admin.db")
        try:
            old = await add_account(db, 0, status="deleted",
                                    deleted_at=sqlite.now_ms() - 2 * DAY_MS)
            await bulk_rows(db, old, 42)
            fresh = await add_account(db, 0, status="deleted", deleted_at=sqlite.now_ms())
            await bulk_rows(db, fresh, 8)
            return old
        finally:
            await db.close()

    asyncio.run(setup())
    assert admin.main(["--config", str(cfg), "purge"]) == 0

    async def count() -> int:
        db = await sqlite.open_store(tmp_path / "admin.db")
        try:
            async with db.execute("SELECT COUNT(*) FROM usage") as cur:
                got = await cur.fetchone()
            assert got is not None
            return int(got[0])
        finally:
            await db.close()

    assert asyncio.run(count()) == 8


# --- SIGKILL of the real server under load ----------------------------------------------------




class ServerProcess:
    """``python -m flintproxy serve`` as a child process (stderr drained in the background)."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int,
                 drain: asyncio.Task[None]) -> None:
        self.proc, self.port, self._drain = proc, port, drain

    @classmethod
    async def start(cls, config: Path) -> ServerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flintproxy", "serve", "--config", str(config), "--port", "0",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stderr is not None
        port = 0
        while not port:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "the server exited before listening"
            if "listening on http://" in line:
                port = int(line.rsplit(":", 1)[1])

        async def drain(stream: asyncio.StreamReader) -> None:
            while await stream.readline():
                pass

        return cls(proc, port, asyncio.get_running_loop().create_task(drain(proc.stderr)))

    async def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        await self._drain
        return code


async def load(port: int, key: str, stop: asyncio.Event) -> int:
    """32 clients, streams and non-streams, until ``stop`` or the server dies; returns OKs."""
    import aiohttp

    ok = 0

    async def client(i: int, http: aiohttp.ClientSession) -> None:
        nonlocal ok
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                "stream": i % 2 == 0, "max_tokens": 50}
        while not stop.is_set():
            try:
                async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                     headers={"Authorization": f"Bearer {key}",
                                              "x-mock-delay-ms": "1"}) as resp:
                    data = await resp.read()
                    if resp.status == 200 and (b"[DONE]" in data or b'"usage"' in data):
                        ok += 1
            except (TimeoutError, aiohttp.ClientError):
                return

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(i, http) for i in range(32)))
    return ok


@pytest.mark.slow
async def test_server_sigkill_under_load_then_restart(tmp_path: Path,
                                                      mock_upstream: Any) -> None:
    from flintproxy.store.accounts import Accounts
    from tests.conftest import raw_config

    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["billing"] = {"flush_interval_s": 0.2}
    raw["limits"] = {"default_rpm": 10**7, "default_tpm": 10**10, "default_max_concurrent": 1000}
    config = tmp_path / "flintproxy.toml"
    config.write_text(to_toml(raw))
    db = await sqlite.open_store(tmp_path / "flintproxy.db")
    repo = Accounts(SqliteDatabase(db), 4, 3600)
    account = await repo.create_account("load@example.com", None)
    await repo.credit(account, 1000 * 10**9)
    _, key = await repo.create_key(account, "load")

    server = await ServerProcess.start(config)
    stop = asyncio.Event()
    clients = asyncio.get_running_loop().create_task(load(server.port, key, stop))
    await asyncio.sleep(1.5)
    assert await server.stop(signal.SIGKILL) == -signal.SIGKILL
    killed_ms = sqlite.now_ms()
    stop.set()
    before = await clients
    assert before > 50
    rows_at_kill = await check_invariant(db)
    assert 0 < rows_at_kill <= before + 32
    async with db.execute("SELECT MAX(started_at + duration_ms) FROM usage") as cur:
        newest = await cur.fetchone()
    assert newest is not None
    # Only the last flush interval or so of finished requests is lost.
    assert killed_ms - newest[0] < 1500, f"lost window {killed_ms - newest[0]} ms"

    restarted_ms = sqlite.now_ms()
    server = await ServerProcess.start(config)
    stop = asyncio.Event()
    clients = asyncio.get_running_loop().create_task(load(server.port, key, stop))
    await asyncio.sleep(0.7)
    assert await server.stop(signal.SIGTERM) == 0  # graceful: drains the queue
    stop.set()
    after = await clients
    assert after > 10
    total = await check_invariant(db)
    async with db.execute("SELECT COUNT(*) FROM usage WHERE started_at >= ?",
                          (restarted_ms,)) as cur:
        got = await cur.fetchone()
    assert got is not None and got[0] >= after and total == rows_at_kill + got[0]
    async with db.execute("SELECT balance_nano, charged_nano FROM accounts WHERE id = ?",
                          (account,)) as cur:
        bal = await cur.fetchone()
    assert bal is not None and bal[0] == 1000 * 10**9 - bal[1] and bal[1] > 0
    await db.close()


async def test_list_json_and_csv_agree_on_awkward_rows(api: Api) -> None:
    from flintproxy.money import format_usd

    me, headers = await api.login("odd@example.com")
    costs = [0, 1, 10, 150, 100_000_000, 5 * 10**9, 123_456_789_012, 10**18]
    for i, cost in enumerate(costs):
        await api.db.execute(
            "INSERT INTO usage (request_id, account_id, key_id, model, upstream, prompt_tokens, "
            "completion_tokens, cached_tokens, reasoning_tokens, estimated, cost_nano, status, "
            "outcome, stream, started_at, duration_ms, ttfb_ms) "
            "VALUES (?, ?, NULL, ?, NULL, 3, 4, 1, 2, 1, ?, 499, 'client_disconnect', 0, ?, 8, "
            "NULL)", f'id,"{i}"\nx', me, 'mod"el, ünï', cost, CLOCK0 + 999 + i)
    listed = (await (await api.client.get("/api/usage", headers=headers)).json())["data"]
    exported = await (await api.client.get("/api/usage/export?format=json",
                                           headers=headers)).json()
    text = await (await api.client.get("/api/usage/export?format=csv", headers=headers)).text()
    as_csv = list(csv.DictReader(io.StringIO(text, newline="")))
    assert exported == listed[::-1] and len(exported) == len(costs)
    for rec, line, cost in zip(exported, as_csv, costs, strict=True):
        assert rec["cost_usd"] == format_usd(cost) and rec["cost_nano"] == cost
        assert rec["model"] == 'mod"el, ünï' and rec["upstream"] is None
        assert rec["ttfb_ms"] is None and rec["stream"] is False and rec["estimated"] is True
        assert rec["started_at"].startswith("2023-11-14T22:13:20.99") or \
            rec["started_at"].startswith("2023-11-14T22:13:21.00")
        assert line == {k: ("" if v is None else str(v).lower() if isinstance(v, bool)
                            else str(v)) for k, v in rec.items()}


async def test_gateway_keeps_serving_then_refuses_while_the_disk_fails(
        tmp_path: Path, mock_upstream: Any, gateway_factory: Callable[..., Any]) -> None:
    import aiohttp

    from tests.conftest import raw_config

    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["billing"] = {"flush_interval_s": 0.02, "max_backlog_rows": 5}
    gw = await gateway_factory(raw)
    writer = gw.components.usage
    db_path = Path(gw.config.storage.path)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": f"Bearer {gw.key}"}
    async with aiohttp.ClientSession() as http:
        async def chat() -> int:
            async with http.post(gw.base_url + "/chat/completions", json=body,
                                 headers=auth) as resp:
                await resp.read()
                return resp.status

        async def ready() -> int:
            async with http.get(gw.url + "/readyz") as resp:
                return resp.status

        assert await chat() == 200
        assert await writer.sync(5)
        fault = Immutable(db_path)  # a real EPERM on every write, even as root
        await fault.apply()
        try:
            assert [await chat() for _ in range(5)] == [200] * 5  # served from memory
            t0 = time.monotonic()
            while writer.consecutive_errors < 1:
                assert time.monotonic() - t0 < 10
                await asyncio.sleep(0.02)
            assert await ready() == 503
            assert writer.backlog == 5
            assert await chat() == 503  # the bound: refuse rather than risk more charges
        finally:
            await fault.heal()
        assert await writer.sync(30)
        assert await ready() == 200
        assert await chat() == 200
        assert await writer.sync(5)
    db = await sqlite.connect(db_path)
    try:
        assert await check_invariant(db) == 7
    finally:
        await db.close()
