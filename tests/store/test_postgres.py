"""The shared store on a real PostgreSQL: schema parity with SQLite, migrations, the
ledger's idempotent batches, outages, the change feed across nodes, and the copy of an
embedded install."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import pytest

from flintproxy.config import BillingConfig
from flintproxy.errors import Conflict, SchemaBehind, ServiceUnavailable, StoreUnavailable
from flintproxy.gate.billing import Billing
from flintproxy.store import postgres, sqlite
from flintproxy.store.accounts import Accounts
from flintproxy.store.db import Database, PgDatabase, SqliteDatabase, pg_sql
from flintproxy.store.ledger import Balances, UsageRow, UsageWriter
from flintproxy.tools import admin
from tests.conftest import Gateway, MockServer, migrated_dsn, raw_config, start_gateway
from tests.engines import free_port
from tests.support import to_toml

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
    first = dict(await postgres.commit_usage(pg, sql, batch, [a, b]))
    # The same batch again, as the writer retries it when the COMMIT's answer was lost.
    again = dict(await postgres.commit_usage(pg, sql, batch, [a, b]))
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


@pytest.mark.timeout(90)
async def test_a_key_revoked_on_node_a_is_refused_on_node_b_within_a_second(
        tmp_path: Path, mock_upstream: MockServer, request: pytest.FixtureRequest,
        gateway_factory: Callable[..., Awaitable[Gateway]]) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["storage"] = {"backend": "postgresql", "dsn": await migrated_dsn(request)}
    # A poll far slower than a second: only the NOTIFY can make the deadline.
    raw["accounts"] = {"bcrypt_cost": 4, "change_poll_s": 30.0}
    node_a = await gateway_factory(raw)
    node_b = await gateway_factory(raw)
    for node in (node_a, node_b):  # both listening
        deadline = time.monotonic() + 10
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                async with http.get(node.url + "/readyz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
    messages = [{"role": "user", "content": "hi"}]
    async with openai.AsyncOpenAI(base_url=node_b.base_url, api_key=node_a.key,
                                  max_retries=0) as on_b:
        assert (await on_b.chat.completions.create(model="gpt-4o-mini",
                                                   messages=messages)).choices
        keys = await node_a.components.accounts.list_keys(node_a.account_id)
        await asyncio.sleep(0.3)  # the LISTEN connections are up by now
        t0 = time.monotonic()
        assert await node_a.components.accounts.revoke_key(keys[0].id)  # on node A
        refused_after = None
        while time.monotonic() - t0 < 3:
            try:
                await on_b.chat.completions.create(model="gpt-4o-mini", messages=messages)
            except openai.AuthenticationError:
                refused_after = time.monotonic() - t0
                break
            await asyncio.sleep(0.02)
    assert refused_after is not None and refused_after < 1.0
    assert node_b.components.watcher.notified >= 1


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
