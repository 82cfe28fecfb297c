"""Shared fixtures: real servers on ephemeral loopback ports, real SQLite files.

``mock_upstream`` is the project's own mock (a real HTTP server); ``gateway`` is
flintproxy itself, started exactly as ``flintproxy serve`` starts it, against a
config built for the test.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from flintproxy.app.root import Components
from flintproxy.app.runner import Server as GatewayServer
from flintproxy.config import Config, build_config
from flintproxy.store import postgres
from flintproxy.store.db import Database, SqliteDatabase
from flintproxy.tools.mock import MOCK_STATS, MockSettings, MockStats, create_mock_app
from tests.engines import PostgresServer, RedisServer

TEST_EMAIL = "owner-{}@example.com"  # one account per gateway started
TEST_CREDIT_NANO = 1_000 * 1_000_000_000  # $1,000: tests are never short of funds
MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]


@dataclass
class MockServer:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def port(self) -> int:
        return int(self.runner.addresses[0][1])

    @property
    def stats(self) -> MockStats:
        return self.app[MOCK_STATS]

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@dataclass
class Gateway:
    """A started gateway: ``url`` is the data plane (/v1, health), ``console_url`` the
    control plane (/api, /metrics)."""

    server: GatewayServer
    config: Config
    key: str
    account_id: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.addresses[0][1]}"

    @property
    def port(self) -> int:
        return int(self.server.addresses[0][1])

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.server.console_addresses[0][1]}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def components(self) -> Components:
        return self.server.components


async def start_mock(settings: MockSettings | None = None) -> MockServer:
    """The mock upstream in this process, on an ephemeral loopback port."""
    app = create_mock_app(settings or MockSettings())
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return MockServer(url=f"http://127.0.0.1:{port}", app=app, runner=runner)


def raw_config(tmp_path: Path, upstream_urls: Mapping[str, str]) -> dict[str, Any]:
    """A TOML-shaped dict for a test gateway; tests tweak it before building."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "heartbeat_interval_s": 5.0},
        "console": {"host": "127.0.0.1", "port": 0},
        "storage": {"path": str(tmp_path / "flintproxy.db")},
        "upstreams": [
            {"name": name, "base_url": url, "models": list(MODELS),
             "failure_threshold": 3, "cooldown_s": 30.0, "forward_headers": ["x-mock-*"]}
            for name, url in upstream_urls.items()
        ],
        "models": {
            "gpt-4o-mini": {"input_usd_per_mtok": "0.15", "output_usd_per_mtok": "0.60"},
            "gpt-4o": {"input_usd_per_mtok": "2.50", "output_usd_per_mtok": "10.00"},
            "text-embedding-3-small": {"input_usd_per_mtok": "0.02",
                                       "output_usd_per_mtok": "0"},
        },
        "accounts": {"bcrypt_cost": 4, "change_poll_s": 0.05},
    }


async def start_gateway(raw: Mapping[str, Any], env: Mapping[str, str] | None = None,
                        credit_nano: int = TEST_CREDIT_NANO) -> Gateway:
    """Start a gateway and give it a funded account with one API key (``Gateway.key``)."""
    config = build_config(copy.deepcopy(dict(raw)), env or {})
    server = GatewayServer(config)
    await server.startup("127.0.0.1", 0, console_port=0)
    repo = server.components.accounts
    account_id = await repo.create_account(TEST_EMAIL.format(secrets.token_hex(4)), None)
    if credit_nano:
        await repo.credit(account_id, credit_nano)
    _, key = await repo.create_key(account_id, "test")
    return Gateway(server=server, config=config, key=key, account_id=account_id)


@pytest.fixture
async def mock_upstream() -> AsyncIterator[MockServer]:
    server = await start_mock()
    yield server
    await server.runner.cleanup()


@pytest.fixture
async def gateway_factory() -> AsyncIterator[Callable[..., Any]]:
    """Start gateways with custom configs; all are stopped after the test."""
    started: list[Gateway] = []

    async def factory(raw: Mapping[str, Any], env: Mapping[str, str] | None = None,
                      **kwargs: Any) -> Gateway:
        gw = await start_gateway(raw, env, **kwargs)
        started.append(gw)
        return gw

    yield factory
    for gw in reversed(started):
        await gw.server.shutdown()


@pytest.fixture
async def gateway(tmp_path: Path, mock_upstream: MockServer) -> AsyncIterator[Gateway]:
    gw = await start_gateway(raw_config(tmp_path, {"local": mock_upstream.base_url}))
    yield gw
    await gw.server.shutdown()


# The store engines the backend-neutral suites run against (``backend`` fixture).
BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each store-facing test that asks for it runs once per engine."""
    return str(request.param)


async def migrated_dsn(request: pytest.FixtureRequest) -> str:
    """A fresh PostgreSQL database with the schema applied (``admin migrate``)."""
    dsn = str(request.getfixturevalue("postgres_dsn"))
    db = await postgres.open_database(dsn, 1)
    try:
        await postgres.migrate(db)
    finally:
        await db.close()
    return dsn


@pytest.fixture
async def storage(backend: str, tmp_path: Path, request: pytest.FixtureRequest
                  ) -> dict[str, Any]:
    """The ``[storage]`` table of a gateway config on ``backend`` (PG: migrated)."""
    if backend == "sqlite":
        return {"path": str(tmp_path / "flintproxy.db")}
    return {"backend": "postgresql", "dsn": await migrated_dsn(request)}


@pytest.fixture
async def store_db(backend: str, tmp_path: Path, request: pytest.FixtureRequest
                   ) -> AsyncIterator[Database]:
    """A migrated, empty store on ``backend``, closed after the test."""
    db: Database
    if backend == "sqlite":
        db = await SqliteDatabase.open(tmp_path / "flint.db")
    else:
        db = await postgres.open_database(await migrated_dsn(request), 4)
    yield db
    await db.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the session, started on first use."""
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A fresh, empty database for this test."""
    return postgres_server.new_database()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One throwaway redis-server for the session, started on first use."""
    server = RedisServer.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A Redis database number no other test uses."""
    return redis_server.new_url()
