"""The shared store on a real PostgreSQL: schema parity with SQLite, migrations, the
ledger's idempotent batches, outages, the change feed across nodes, and the copy of an
embedded install."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from flintproxy.config import BillingConfig
from flintproxy.errors import Conflict, SchemaBehind, ServiceUnavailable, StoreUnavailable
from flintproxy.gate.billing import Billing
from flintproxy.store import postgres, sqlite
from flintproxy.store.accounts import Accounts
from flintproxy.store.changes import ChangeWatcher
from flintproxy.store.db import Database, Dialect, PgDatabase, SqliteDatabase, pg_sql
from flintproxy.store.ledger import Balances, UsageRow, UsageWriter
from flintproxy.store.retention import DAY_MS, RetentionJob
from flintproxy.tools import admin
from flintproxy.web.usage_api import ROW_SQL
from tests.conftest import Gateway, MockServer, migrated_dsn, raw_config, start_gateway
from tests.engines import free_port
from tests.support import to_toml
from tests.web.test_api import Browser

# --- the schema ---------------------------------------------------------------------------


async def test_both_engines_end_with_the_same_tables_and_columns(
        tmp_path: Path, postgres_dsn: str) -> None:
    """A migration added to one engine and not the other fails here."""
    conn = await sqlite.open_store(tmp_path / "s.db")
    try:
        lite: dict[str, set[str]] = {}
        for (table,) in await conn.execute_fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%'"):
            lite[table] = {str(r[1]) for r in await conn.execute_fetchall(
                f"PRAGMA table_info({table})")}
    finally:
        await conn.close()
    pg = await postgres.open_database(postgres_dsn, 1)
    try:
        await postgres.migrate(pg)
        shared: dict[str, set[str]] = {}
        for table, column in await pg.fetch(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = 'public'"):
            shared.setdefault(table, set()).add(column)
        assert await postgres.schema_version(pg) == len(postgres.MIGRATIONS)
    finally:
        await pg.close()
    assert shared == lite
    assert len(postgres.MIGRATIONS) == len(sqlite.MIGRATIONS)


def test_placeholders_become_numbered_outside_quoted_text() -> None:
    assert pg_sql("SELECT ? , '?', \"a?\" FROM t WHERE a = ? -- ?\nAND b IN (?, ?)") == (
        "SELECT $1 , '?', \"a?\" FROM t WHERE a = $2 -- ?\nAND b IN ($3, $4)")
    assert pg_sql("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', $1"
    assert pg_sql("SELECT 1") is pg_sql("SELECT 1")  # translated once, cached


async def test_concurrent_migrations_apply_each_version_once(postgres_dsn: str) -> None:
    dbs = [await postgres.open_database(postgres_dsn, 1) for _ in range(4)]
    try:
        results = await asyncio.gather(*(postgres.migrate(db) for db in dbs))
        assert sorted(r[1] for r in results) == [len(postgres.MIGRATIONS)] * 4
        assert sum(after - before for before, after in results) == len(postgres.MIGRATIONS)
        assert await dbs[0].fetchval("SELECT COUNT(*) FROM schema_version") == len(
            postgres.MIGRATIONS)
    finally:
        for db in dbs:
            await db.close()


async def test_serve_refuses_a_schema_behind_and_admin_migrate_fixes_it(
        tmp_path: Path, postgres_dsn: str, mock_upstream: MockServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["storage"] = {"backend": "postgresql", "dsn_env": "TEST_FLINT_DSN"}
    env = {"TEST_FLINT_DSN": postgres_dsn}
    with pytest.raises(SchemaBehind, match="run: flintproxy admin migrate"):
        await start_gateway(raw, env)
    config = tmp_path / "flint.toml"
    config.write_text(to_toml(raw))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEST_FLINT_DSN", postgres_dsn)
        code = await asyncio.to_thread(admin.main, ["--config", str(config), "create-account",
                                                    "x@example.com"])
        assert code == 1
        assert "run: flintproxy admin migrate" in capsys.readouterr().err
        assert await asyncio.to_thread(admin.main, ["--config", str(config), "migrate"]) == 0
        out = capsys.readouterr().out
        assert f"version {len(postgres.MIGRATIONS)}" in out
        assert "postgres@" in out  # the DSN shown, masked where it has a password
        assert await asyncio.to_thread(admin.main, ["--config", str(config), "migrate"]) == 0
        assert "up to date" in capsys.readouterr().out
    gw = await start_gateway(raw, env)
    try:
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key,
                                      max_retries=0) as client:
            reply = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert reply.usage is not None
        assert await gw.components.usage.sync(10)
        assert await gw.components.usage_db.fetchval(
            "SELECT COUNT(*) FROM usage WHERE account_id = ?", gw.account_id) == 1
    finally:
        await gw.server.shutdown()


async def test_driver_errors_become_the_house_errors(postgres_dsn: str) -> None:
    db = await postgres.open_database(postgres_dsn, 1)
    try:
        await postgres.migrate(db)
        await db.execute("INSERT INTO accounts (email, created_at) VALUES ('a@b.cc', 0)")
        with pytest.raises(Conflict):
            await db.execute("INSERT INTO accounts (email, created_at) VALUES ('a@b.cc', 0)")
    finally:
        await db.close()
    dead = await postgres.open_database(
        f"postgresql://postgres@127.0.0.1:{free_port()}/x", 1, min_size=0)
    try:
        with pytest.raises(StoreUnavailable):
            await dead.fetchval("SELECT 1")
    finally:
        await dead.close()


# --- the ledger -----------------------------------------------------------------------


def usage(request_id: str, account_id: int, cost: int) -> UsageRow:
    return UsageRow(request_id, account_id, 1, "gpt-4o-mini", "local", 10, 20, 0, 0, 0, cost,
                    200, "ok", 1, sqlite.now_ms(), 5, 1)


async def add_account(db: Database, credit: int) -> int:
    return int(await db.fetchval(
        "INSERT INTO accounts (email, created_at, credited_nano, balance_nano) "
        "VALUES (?, 0, ?, ?) RETURNING id", f"{time.time_ns()}@x", credit, credit))


async def books_balance(db: Database) -> int:
    """Checks balance = credited - charged and charged = sum(costs); returns the rows."""
    assert await db.fetch(
        "SELECT id FROM accounts WHERE balance_nano != credited_nano - charged_nano") == []
    assert await db.fetch(
        "SELECT a.id FROM accounts a LEFT JOIN (SELECT account_id, SUM(cost_nano) AS t "
        "FROM usage GROUP BY account_id) u ON u.account_id = a.id "
        "WHERE a.charged_nano != COALESCE(u.t, 0)") == []
    assert await db.fetch(
        "SELECT request_id FROM usage GROUP BY request_id HAVING COUNT(*) > 1") == []
    return int(await db.fetchval("SELECT COUNT(*) FROM usage"))


@pytest.fixture
async def pg(request: pytest.FixtureRequest) -> AsyncIterator[PgDatabase]:
    db = await postgres.open_database(await migrated_dsn(request), 4)
    yield db
    await db.close()


async def test_a_batch_retried_after_an_ambiguous_commit_charges_once(pg: PgDatabase) -> None:
    a, b = await add_account(pg, 10_000), await add_account(pg, 10_000)
    batch = [tuple(usage(f"r{i}", a if i % 2 else b, 10 + i)) for i in range(50)]
    sql = postgres.batch_sql(UsageRow._fields)
    first = dict(await postgres.commit_usage(pg, sql, batch, [a, b], UsageRow._fields))
    # The same batch again, as the writer retries it when the COMMIT's answer was lost.
    again = dict(await postgres.commit_usage(pg, sql, batch, [a, b], UsageRow._fields))
    assert first == again  # the balances as stored, nothing debited twice
    assert await books_balance(pg) == 50
    charged = sum(10 + i for i in range(50))
    assert await pg.fetchval("SELECT SUM(charged_nano) FROM accounts") == charged
    assert first[a] + first[b] == 20_000 - charged


async def test_the_writer_on_postgresql_batches_rows_and_debits_exactly(pg: PgDatabase) -> None:
    cfg = BillingConfig(flush_interval_s=0.02, flush_batch_rows=500)
    billing = Billing({}, cfg, Balances(pg))
    writer = UsageWriter(pg, billing, cfg)
    writer.start()
    accounts = [await add_account(pg, 10**9) for _ in range(5)]
    for a in accounts:
        await billing.load(a)
    for i in range(3000):
        writer.record(usage(f"w{i}", accounts[i % 5], 7 + i % 3))
    assert await writer.sync(20)
    assert await books_balance(pg) == 3000
    for a in accounts:
        stored = await pg.fetchval("SELECT balance_nano FROM accounts WHERE id = ?", a)
        assert billing.snapshot(a) == (stored, 0, 0)
    assert await writer.drain(5) == 0


class Proxy:
    """A TCP relay in front of PostgreSQL that the test can cut (connections dropped,
    new ones refused: a dead server) and restore on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self.writers -= {writer, up_w}

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()

    def dsn(self, dsn: str) -> str:
        host = dsn.rpartition("@")[2].partition("/")[0]
        return dsn.replace(f"@{host}/", f"@127.0.0.1:{self.port}/")


@pytest.mark.timeout(120)
async def test_postgresql_down_bounds_the_backlog_then_lands_everything_once(
        pg: PgDatabase) -> None:
    proxy = Proxy(int(pg.dsn.rpartition(":")[2].partition("/")[0]))
    await proxy.start()
    db = await postgres.open_database(proxy.dsn(pg.dsn), 2, min_size=0)
    cfg = BillingConfig(flush_interval_s=0.02, flush_batch_rows=100, max_backlog_rows=400)
    billing = Billing({}, cfg, Balances(db))
    writer = UsageWriter(db, billing, cfg)
    writer.start()
    account = await add_account(pg, 10**9)
    try:
        for i in range(150):
            writer.record(usage(f"before{i}", account, 3))
        assert await writer.sync(10)
        assert writer.ready()
        await proxy.cut()  # connections dropped mid-life, new ones refused
        for i in range(450):
            writer.record(usage(f"during{i}", account, 5))
        for _ in range(500):  # 10 s at most
            if writer.stalled:
                break
            await asyncio.sleep(0.02)
        assert writer.stalled and not writer.ready()
        assert writer.overloaded()
        with pytest.raises(ServiceUnavailable):
            writer.refuse_if_overloaded()  # /v1 refused past the backlog
        assert writer.backlog == 450 and writer.last_error is not None
        assert "StoreUnavailable" in writer.last_error
        await proxy.start()  # the server is back, on the same address
        assert await writer.sync(30)
        assert writer.ready() and writer.backlog == 0
    finally:
        await writer.drain(10)
        await db.close()
        await proxy.cut()
    assert await books_balance(pg) == 600
    assert await pg.fetchval("SELECT charged_nano FROM accounts WHERE id = ?",
                             account) == 150 * 3 + 450 * 5


async def test_terminated_backends_lose_and_double_nothing(pg: PgDatabase) -> None:
    cfg = BillingConfig(flush_interval_s=0.005, flush_batch_rows=50)
    billing = Billing({}, cfg, Balances(pg))
    writer = UsageWriter(pg, billing, cfg)
    writer.start()
    account = await add_account(pg, 10**9)
    killer = await postgres.open_database(pg.dsn, 1)
    try:
        for round_ in range(20):
            for i in range(100):
                writer.record(usage(f"k{round_}-{i}", account, 1 + i % 4))
            await asyncio.sleep(0.003)
            await killer.fetch("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert await writer.sync(30)
    finally:
        await writer.drain(10)
        await killer.close()
    assert await books_balance(pg) == 2000


# --- many nodes ---------------------------------------------------------------------------


async def two_nodes(tmp_path: Path, mock_upstream: MockServer, request: pytest.FixtureRequest,
                    gateway_factory: Callable[..., Awaitable[Gateway]]
                    ) -> tuple[Gateway, Gateway, dict[str, Any]]:
    """Two gateways on one PostgreSQL database, both listening for changes."""
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["storage"] = {"backend": "postgresql", "dsn": await migrated_dsn(request)}
    # A poll far slower than a second: only the NOTIFY can make the deadline.
    raw["accounts"] = {"bcrypt_cost": 4, "change_poll_s": 30.0}
    nodes = (await gateway_factory(raw), await gateway_factory(raw))
    for node in nodes:  # the LISTEN connections are up
        for _ in range(200):
            if node.components.watcher.listening:
                break
            await asyncio.sleep(0.02)
        assert node.components.watcher.listening
    return nodes[0], nodes[1], raw


async def refused_after(client: openai.AsyncOpenAI, t0: float,
                        error: type[openai.APIStatusError]) -> float | None:
    """Seconds from ``t0`` until ``client`` is refused with ``error`` (None: not in 3 s)."""
    while time.monotonic() - t0 < 3:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        except error:
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    return None


MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.mark.timeout(90)
async def test_a_key_revoked_on_node_a_is_refused_on_node_b_within_a_second(
        tmp_path: Path, mock_upstream: MockServer, request: pytest.FixtureRequest,
        gateway_factory: Callable[..., Awaitable[Gateway]]) -> None:
    node_a, node_b, _ = await two_nodes(tmp_path, mock_upstream, request, gateway_factory)
    user = Browser(node_a)  # a user of node A's console
    try:
        await user.signup("multi@example.com")
        key_id, key = await user.new_key(name="ci")
        async with openai.AsyncOpenAI(base_url=node_b.base_url, api_key=key,
                                      max_retries=0) as on_b:
            assert (await on_b.chat.completions.create(model="gpt-4o-mini",
                                                       messages=MESSAGES)).choices
            t0 = time.monotonic()
            status, _, _ = await user.call("DELETE", f"/api/keys/{key_id}")
            assert status in (200, 204)
            after = await refused_after(on_b, t0, openai.AuthenticationError)
    finally:
        await user.http.close()
    assert after is not None and after < 1.0
    assert node_b.components.watcher.notified >= 1


@pytest.mark.timeout(90)
async def test_admin_disable_and_credit_reach_every_node_within_a_second(
        tmp_path: Path, mock_upstream: MockServer, request: pytest.FixtureRequest,
        gateway_factory: Callable[..., Awaitable[Gateway]]) -> None:
    node_a, node_b, raw = await two_nodes(tmp_path, mock_upstream, request, gateway_factory)
    config = tmp_path / "flint.toml"
    config.write_text(to_toml(raw))
    email = (await node_a.components.accounts.get(node_a.account_id)).email
    assert email is not None
    # Credit: an account with nothing is refused on node B (its lease book then knows
    # the account is exhausted and stops asking), until the admin's credit makes the
    # money leasable there: the credit event clears that at once (gate.leases).
    repo = node_a.components.accounts
    broke = await repo.create_account("broke@example.com", None)
    _, broke_key = await repo.create_key(broke, "ci")
    async with openai.AsyncOpenAI(base_url=node_b.base_url, api_key=broke_key,
                                  max_retries=0) as broke_on_b:
        with pytest.raises(openai.APIStatusError) as refused:
            await broke_on_b.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert refused.value.status_code == 402
        t0 = time.monotonic()
        assert await asyncio.to_thread(admin.main, ["--config", str(config), "credit",
                                                    "broke@example.com", "2.50"]) == 0
        while True:
            try:
                await broke_on_b.chat.completions.create(model="gpt-4o-mini",
                                                         messages=MESSAGES)
                break
            except openai.APIStatusError as exc:
                assert exc.status_code == 402
            assert time.monotonic() - t0 < 1.0 + 1.0  # the admin process's start included
            await asyncio.sleep(0.01)
    async with openai.AsyncOpenAI(base_url=node_b.base_url, api_key=node_a.key,
                                  max_retries=0) as on_b:
        assert (await on_b.chat.completions.create(model="gpt-4o-mini",
                                                   messages=MESSAGES)).choices
        done = asyncio.ensure_future(asyncio.to_thread(
            admin.main, ["--config", str(config), "disable-account", email]))
        t0 = time.monotonic()
        after = await refused_after(on_b, t0, openai.PermissionDeniedError)
        assert await done == 0
    assert after is not None and after < 1.0 + 1.0


# --- copy-to-postgres -----------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_copy_to_postgres_moves_an_embedded_install_without_loss(
        tmp_path: Path, postgres_dsn: str, mock_upstream: MockServer,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    gw = await start_gateway(raw)
    try:
        repo = gw.components.accounts
        other = await repo.create_account("second@example.com", None)
        await repo.credit(other, 123_456_789)
        await repo.create_session(other)
        revoked, _ = await repo.create_key(other, "old")
        await repo.revoke_key(revoked.id)
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key,
                                      max_retries=0) as client:
            for _ in range(5):
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert await gw.components.usage.sync(10)
    finally:
        await gw.server.shutdown()
    src = SqliteDatabase(await sqlite.connect(tmp_path / "flintproxy.db"))
    try:
        want = {t: await src.fetchval(f"SELECT COUNT(*) FROM {t}")
                for t in ("accounts", "credits", "api_keys", "sessions", "usage", "events")}
        balances = [tuple(r) for r in await src.fetch(
            "SELECT id, credited_nano, charged_nano, balance_nano FROM accounts ORDER BY id")]
        top_event = await src.fetchval("SELECT MAX(id) FROM events")
    finally:
        await src.close()
    assert want["usage"] == 5 and want["sessions"] == 1

    config = tmp_path / "flint.toml"
    config.write_text(to_toml(raw))
    monkeypatch.setenv("TEST_COPY_DSN", postgres_dsn)
    args = ["--config", str(config), "copy-to-postgres", "--dsn-env", "TEST_COPY_DSN"]
    assert await asyncio.to_thread(admin.main, args) == 0
    out = capsys.readouterr().out
    assert "usage: 5 rows" in out and "equal on both sides" in out and "each equal" in out

    pg = await postgres.open_database(postgres_dsn, 2)
    try:
        for table, n in want.items():
            assert await pg.fetchval(f"SELECT COUNT(*) FROM {table}") == n
        assert [tuple(r) for r in await pg.fetch(
            "SELECT id, credited_nano, charged_nano, balance_nano FROM accounts ORDER BY id"
        )] == balances
        # New rows take ids past the copied ones (the events high-water mark included).
        repo = Accounts(pg, 4, 60)
        new_id = await repo.create_account("after@example.com", None)
        assert new_id > max(b[0] for b in balances)
        assert await pg.fetchval("SELECT MAX(id) FROM events") > top_event
    finally:
        await pg.close()
    # A second copy would mix two installs: refused.
    assert await asyncio.to_thread(admin.main, args) == 1
    assert "not empty" in capsys.readouterr().err
    # The copied key serves on the PostgreSQL backend.
    raw["storage"] = {"backend": "postgresql", "dsn": postgres_dsn}
    node = await start_gateway(raw)
    try:
        async with openai.AsyncOpenAI(base_url=node.base_url, api_key=gw.key,
                                      max_retries=0) as client:
            assert (await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])).choices
    finally:
        await node.server.shutdown()


def test_no_dsn_password_in_config_errors_or_reprs() -> None:
    from flintproxy.config import ConfigError, build_config, mask_dsn

    raw = raw_config(Path("/tmp"), {"u": "http://127.0.0.1:1/v1"})
    raw["storage"] = {"backend": "postgresql", "dsn": "mysql://u:s3cret@h/db"}
    with pytest.raises(ConfigError) as err:
        build_config(raw, {})
    assert "s3cret" not in str(err.value) and "storage.dsn" in str(err.value)
    raw["storage"] = {"backend": "postgresql", "dsn": "postgresql://u:s3cret@h/db"}
    cfg = build_config(raw, {})
    assert "s3cret" not in repr(cfg) and "s3cret" not in cfg.storage.safe_dsn
    assert mask_dsn("postgresql://h/db?password=s3cret") == "postgresql://h/db?password=***"
    raw["storage"] = {"backend": "postgresql"}
    with pytest.raises(ConfigError, match="dsn_env"):
        build_config(raw, {})
    raw["storage"] = {"backend": "mongodb"}
    with pytest.raises(ConfigError, match=r"storage\.backend = 'mongodb'"):
        build_config(raw, {})
    raw["storage"] = {"backend": "postgresql", "dsn_env": "NOPE_DSN"}
    with pytest.raises(ConfigError, match="NOPE_DSN is not set"):
        build_config(raw, {})


# --- the usage API's row formats -----------------------------------------------------------


async def test_both_engines_format_usage_rows_identically_for_export(
        tmp_path: Path, pg: PgDatabase) -> None:
    """The list/export SQL is spelled per engine; the bytes users get must not differ."""
    awkward = [
        UsageRow('r"1,\n', 1, None, 'm,"x"', None, 0, 0, 0, 0, 1, 0, 499, "client_disconnect",
                 0, 0, 0, None),
        UsageRow("r2", 1, 7, "gpt-4o-mini", "local", 12, 34, 5, 6, 0, 1_234_567_891, 200, "ok",
                 1, 1_700_000_000_123, 350, 40),
        UsageRow("r3", 1, 7, "gpt-4o-mini", "up", 1, 1, 0, 0, 0, 10, 200, "ok", 1,
                 253_402_300_799_999, 1, 0),
        UsageRow("r4", 1, 7, "é 中", "up", 1, 1, 0, 0, 0, 2**53, 200, "ok", 1, 5, 1, 1),
    ]
    lite = await SqliteDatabase.open(tmp_path / "fmt.db")
    out: dict[Dialect, list[tuple[str, str]]] = {}
    try:
        for db in (lite, pg):
            await add_account(db, 0)
            cols = ", ".join(UsageRow._fields)
            marks = ", ".join("?" * len(UsageRow._fields))
            await db.executemany(f"INSERT INTO usage ({cols}) VALUES ({marks})",
                                 [tuple(r) for r in awkward])
            json_sql, csv_sql = ROW_SQL[db.dialect]
            out[db.dialect] = [(str(r[0]), str(r[1])) for r in await db.fetch(
                f"SELECT {json_sql}, {csv_sql} FROM usage ORDER BY id")]
    finally:
        await lite.close()
    lite_rows, pg_rows = out[Dialect.SQLITE], out[Dialect.POSTGRESQL]
    assert [orjson.loads(j) for j, _ in pg_rows] == [orjson.loads(j) for j, _ in lite_rows]
    assert [c for _, c in pg_rows] == [c for _, c in lite_rows]
    first = orjson.loads(lite_rows[1][0])
    assert first["cost_usd"] == "1.234567891" and first["started_at"] == "2023-11-14T22:13:20.123Z"
    assert first["stream"] is True and first["estimated"] is False


# --- the change feed -----------------------------------------------------------------------


async def test_events_committed_out_of_id_order_are_all_dispatched(pg: PgDatabase) -> None:
    watcher = ChangeWatcher(pg, 0.05)
    await watcher.start()
    seen: list[int | None] = []
    watcher.subscribe(lambda kind, account_id, key_id: seen.append(account_id))
    insert = "INSERT INTO events (kind, account_id, created_at) VALUES ('credit', ?, 0)"
    async with pg.transaction() as slow:
        await slow.execute(insert, 1)  # takes the lower id, commits last
        await pg.execute(insert, 2)
        await watcher.poll()
        assert seen == [2]
    await watcher.poll()
    assert seen == [2, 1]
    await watcher.poll()
    assert seen == [2, 1]  # each once


@pytest.mark.timeout(60)
async def test_the_listen_connection_comes_back_after_it_is_killed(pg: PgDatabase) -> None:
    watcher = ChangeWatcher(pg, 60.0)  # no periodic poll here: only NOTIFY wakes it
    await watcher.start()
    seen: list[int | None] = []
    watcher.subscribe(lambda kind, account_id, key_id: seen.append(account_id))
    listening = asyncio.ensure_future(watcher.listen(pg.dsn, postgres.CHANNEL))
    repo = Accounts(pg, 4, 60)
    try:
        for _ in range(100):
            if await pg.fetchval("SELECT COUNT(*) FROM pg_stat_activity WHERE query LIKE "
                                 "'LISTEN%' AND pid <> pg_backend_pid()"):
                break
            await asyncio.sleep(0.05)
        first = await repo.create_account("one@example.com", None)
        for _ in range(100):
            if first in seen:
                break
            await asyncio.sleep(0.01)
        assert first in seen and watcher.notified == 1
        await pg.fetch("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()")
        second = await repo.create_account("two@example.com", None)  # while it is down
        for _ in range(400):
            if second in seen:
                break
            await asyncio.sleep(0.01)
        assert second in seen  # caught up on reconnect
        third = await repo.create_account("three@example.com", None)
        for _ in range(200):
            if third in seen:
                break
            await asyncio.sleep(0.01)
        assert third in seen and watcher.notified >= 2
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening


@pytest.mark.timeout(90)
async def test_postgresql_unreachable_makes_readyz_unready_and_v1_refuse_past_the_backlog(
        tmp_path: Path, pg: PgDatabase, mock_upstream: MockServer) -> None:
    proxy = Proxy(int(pg.dsn.rpartition(":")[2].partition("/")[0]))
    await proxy.start()
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["storage"] = {"backend": "postgresql", "dsn": proxy.dsn(pg.dsn)}
    raw["billing"] = {"max_backlog_rows": 5, "flush_interval_s": 0.02}
    gw = await start_gateway(raw)

    async def ready() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as http, http.get(gw.url + "/readyz") as resp:
            return resp.status, await resp.json()

    served = 0
    try:
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key,
                                      max_retries=0) as client:
            assert (await client.chat.completions.create(model="gpt-4o-mini",
                                                         messages=MESSAGES)).choices
            served += 1
            assert await gw.components.usage.sync(10)
            assert (await ready())[0] == 200
            await proxy.cut()
            status, body = 200, {}
            for _ in range(60):
                status, body = await ready()
                if status == 503:
                    break
                await asyncio.sleep(0.1)
            assert status == 503 and body["checks"]["database"]["ok"] is False
            assert "127.0.0.1" not in str(body)  # names the error, not the server
            # The key and balance are in memory: /v1 serves until the backlog is full.
            refused = None
            for _ in range(20):
                try:
                    await client.chat.completions.create(model="gpt-4o-mini",
                                                         messages=MESSAGES)
                    served += 1
                except openai.APIStatusError as exc:
                    refused = exc
                    break
            assert refused is not None and refused.status_code == 503
            assert served == 1 + 5  # exactly the backlog's bound
            await proxy.start()
            for _ in range(60):
                status, body = await ready()
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert status == 200
            assert await gw.components.usage.sync(10)
    finally:
        await gw.server.shutdown()
        await proxy.cut()
    assert await books_balance(pg) == served  # every served request landed, once


async def test_retention_purges_a_deleted_accounts_rows_on_postgresql(pg: PgDatabase) -> None:
    gone, kept = await add_account(pg, 0), await add_account(pg, 0)
    await pg.execute("UPDATE accounts SET status = 'deleted', email = NULL, deleted_at = 0 "
                     "WHERE id = ?", gone)
    await pg.executemany(
        "INSERT INTO usage (request_id, account_id, model, prompt_tokens, completion_tokens, "
        "cost_nano, status, outcome, stream, started_at, duration_ms) "
        "VALUES (?, ?, 'm', 1, 1, 0, 200, 'ok', 0, 0, 1)",
        [(f"p{i}", gone if i % 2 else kept) for i in range(10)])
    assert await RetentionJob(pg, 90, clock=lambda: 90 * DAY_MS - 1).run_once() == 0
    assert await RetentionJob(pg, 90, clock=lambda: 90 * DAY_MS).run_once() == 5
    assert await pg.fetchval("SELECT COUNT(*) FROM usage WHERE account_id = ?", kept) == 5


def test_serve_on_a_database_behind_exits_1_naming_the_fix(tmp_path: Path,
                                                           postgres_dsn: str) -> None:
    raw = raw_config(tmp_path, {"local": "http://127.0.0.1:9/v1"})
    raw["storage"] = {"backend": "postgresql", "dsn_env": "FLINT_TEST_DSN"}
    config = tmp_path / "flint.toml"
    config.write_text(to_toml(raw))
    env = {"PATH": "/usr/bin:/bin", "FLINT_TEST_DSN": postgres_dsn}
    done = subprocess.run([sys.executable, "-m", "flintproxy", "serve", "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "run: flintproxy admin migrate" in done.stderr
    dead = f"postgresql://flint:s3cret@127.0.0.1:{free_port()}/x"
    done = subprocess.run([sys.executable, "-m", "flintproxy", "serve", "--config", str(config)],
                          env={**env, "FLINT_TEST_DSN": dead}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert "database is unavailable" in done.stderr and "flint:***@" in done.stderr
    assert "s3cret" not in done.stderr + done.stdout
