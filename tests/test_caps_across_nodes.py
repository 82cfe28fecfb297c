"""Spend caps exact across nodes, end to end: gateways on one PostgreSQL, the openai SDK.

Each node spends cap leases (gate.capleases) on the key's (key, period) pots beside
its credit leases; whatever the interleaving, the key's charged spend in the day
never passes its cap and equals both its usage rows and ``key_spend.spent_nano``; a
lowered cap applies on every node within a second; a SIGKILLed node's cap lease
expires back to the cap through another node's sweep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from flintproxy.gate.capleases import CapLeaseBook
from flintproxy.store import caps, postgres
from flintproxy.store.db import PgDatabase
from flintproxy.store.entries import reconcile
from tests.conftest import Gateway, MockServer, raw_config
from tests.support import LiveGateway, LiveMock

pytestmark = pytest.mark.timeout(180)

ONE = 20 * 1000  # the mock's 20 completion tokens at 1 USD/Mtok (prompts free)
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def pg(postgres_dsn: str) -> AsyncIterator[PgDatabase]:
    db = await postgres.open_database(postgres_dsn, 4)
    await postgres.migrate(db)
    yield db
    await db.close()


def shared_raw(tmp_path: Path, upstream: str, dsn: str, slice_usd: str = "0.0001"
               ) -> dict[str, Any]:
    raw = raw_config(tmp_path, {"local": upstream})
    raw["storage"] = {"backend": "postgresql", "dsn": dsn}
    raw["models"]["gpt-4o-mini"] = {"input_usd_per_mtok": "0", "output_usd_per_mtok": "1.00"}
    raw.setdefault("limits", {})["default_max_concurrent"] = 1000
    # Small slices (5 requests' worth): a cap spreads over several leases and top-ups.
    raw["billing"] = {"lease_min_usd": slice_usd, "lease_ttl_s": 3, "flush_interval_s": 0.05}
    return raw


async def ask(base_url: str, key: str) -> str:
    """'ok', or '<status> <code>'."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0,
                                  timeout=30) as client:
        try:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
        except openai.APIStatusError as exc:
            body = exc.body
            return f"{exc.status_code} {body.get('code') if isinstance(body, dict) else ''}"
        except openai.APIConnectionError:
            return "connection"
    return "ok"


async def pot(pg: PgDatabase, key_id: int, period: str) -> dict[str, int]:
    row = await pg.pool.fetchrow(
        "SELECT COALESCE((SELECT spent_nano FROM key_spend WHERE key_id = $1 AND period = $2)"
        ", 0), COALESCE((SELECT leased_nano FROM key_spend WHERE key_id = $1 AND period = $2)"
        ", 0), (SELECT COALESCE(SUM(granted_nano - spent_nano), 0) FROM cap_leases "
        "WHERE key_id = $1 AND period = $2), (SELECT COUNT(*) FROM cap_leases "
        "WHERE key_id = $1 AND period = $2), (SELECT COALESCE(SUM(cost_nano), 0) FROM usage "
        "WHERE key_id = $1), (SELECT COUNT(*) FROM usage WHERE key_id = $1)", key_id, period)
    assert row is not None
    names = ("spent", "leased", "unspent", "leases", "rows_cost", "rows")
    return {n: int(v) for n, v in zip(names, row, strict=True)}


async def key_of(pg: PgDatabase, account_id: int) -> int:
    return int(await pg.pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1",
                                      account_id))


def today() -> str:
    return caps.periods(int(time.time() * 1000))[0]


async def test_64_concurrent_requests_over_three_nodes_never_pass_a_keys_daily_cap(
        gateway_factory: Callable[..., Any], tmp_path: Path, mock_upstream: MockServer,
        pg: PgDatabase) -> None:
    raw = shared_raw(tmp_path, mock_upstream.base_url, pg.dsn)
    a: Gateway = await gateway_factory(raw, credit_nano=10**9)
    b: Gateway = await gateway_factory(raw, credit_nano=0)
    c: Gateway = await gateway_factory(raw, credit_nano=0)
    nodes = (a, b, c)
    key_id = await key_of(pg, a.account_id)
    cap = 12 * ONE
    await a.components.accounts.set_key_caps(key_id, None, {"day": cap})
    answers = await asyncio.gather(*[ask(nodes[i % 3].base_url, a.key) for i in range(64)])
    ok = answers.count("ok")
    assert 1 <= ok <= 12, answers
    assert answers.count("402 spend_cap_reached") == 64 - ok, answers
    for node in nodes:
        assert await node.components.usage.sync(10)
    books = await pot(pg, key_id, today())
    assert books["spent"] == books["rows_cost"] <= cap, books
    assert books["rows"] == ok and books["leased"] == books["unspent"], books
    charged = await pg.pool.fetchval("SELECT charged_nano FROM accounts WHERE id = $1",
                                     a.account_id)
    assert charged == books["spent"]
    for node in nodes:
        await node.server.shutdown()
    books = await pot(pg, key_id, today())
    assert (books["leased"], books["leases"]) == (0, 0), books  # all returned at shutdown
    assert books["spent"] == books["rows_cost"] <= cap
    report = await reconcile(pg)  # every account's books and every pot's leases
    assert report.ok, report.mismatches


async def test_a_lowered_cap_takes_effect_on_every_node_within_a_second(
        gateway_factory: Callable[..., Any], tmp_path: Path, mock_upstream: MockServer,
        pg: PgDatabase) -> None:
    # Large slices: node a holds most of a generous cap after its first request.
    raw = shared_raw(tmp_path, mock_upstream.base_url, pg.dsn, slice_usd="0.5")
    a: Gateway = await gateway_factory(raw, credit_nano=10**9)
    b: Gateway = await gateway_factory(raw, credit_nano=0)
    key_id = await key_of(pg, a.account_id)
    await a.components.accounts.set_key_caps(key_id, None, {"day": 10**9})
    assert await ask(a.base_url, a.key) == "ok"
    assert (await pot(pg, key_id, today()))["leased"] > 100 * ONE
    # Lowered to what was spent plus two requests, from node b's control plane.
    assert await a.components.usage.sync(10)
    spent = (await pot(pg, key_id, today()))["spent"]
    await b.components.accounts.set_key_caps(key_id, None, {"day": spent + 2 * ONE})
    deadline = time.monotonic() + 1.0
    while (await pot(pg, key_id, today()))["leased"] > 2 * ONE:
        assert time.monotonic() < deadline, "node a kept its slice of the old cap"
        await asyncio.sleep(0.05)
    # Whichever node leases the two requests' worth first serves them; then both refuse.
    answers = [await ask((a, b)[i % 2].base_url, a.key) for i in range(8)]
    assert answers.count("ok") == 2, answers
    assert answers.count("402 spend_cap_reached") == 6, answers
    assert answers[-2:] == ["402 spend_cap_reached"] * 2, answers
    for node in (a, b):
        assert await node.components.usage.sync(10)
    books = await pot(pg, key_id, today())
    assert books["spent"] == books["rows_cost"] == spent + 2 * ONE, books


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_sigkilled_nodes_cap_lease_expires_back_to_the_cap_and_spend_stays_under_it(
        tmp_path: Path, pg: PgDatabase) -> None:
    (tmp_path / "mock").mkdir()
    mock = LiveMock(tmp_path / "mock").start()
    nodes: list[LiveGateway] = []
    try:
        def node(name: str, credit: str) -> LiveGateway:
            (tmp_path / name).mkdir()
            gw = LiveGateway(tmp_path / name, shared_raw(tmp_path / name, mock.base_url, pg.dsn),
                             credit_usd=credit)
            nodes.append(gw)
            return gw.start()

        a = node("a", "1.00")
        b = node("b", "")
        owner = int(await pg.pool.fetchval("SELECT id FROM accounts WHERE email = $1",
                                           a.email))
        key_id = await key_of(pg, owner)
        cap = 30 * ONE  # six slices of five requests
        await pg.pool.execute("UPDATE api_keys SET cap_day_nano = $1 WHERE id = $2", cap,
                              key_id)
        of_b = "SELECT COUNT(*) FROM cap_leases WHERE node_id LIKE $1"
        b_node = f"%/{b.pid}/%"  # node ids are host/pid/random (gate.leases.new_node_id)
        answers = [await ask(b.base_url, a.key) for _ in range(3)]
        assert answers == ["ok"] * 3, b.stderr[-2000:]
        assert await pg.pool.fetchval(of_b, b_node) == 1  # b holds a cap lease
        assert b.proc is not None
        b.proc.kill()  # SIGKILL: its cap lease (and its unflushed rows) are abandoned
        b.proc.wait(10)
        # The dead node's cap lease expires (TTL 3 s) and node a's sweep returns it.
        deadline = time.monotonic() + 15
        while await pg.pool.fetchval(of_b, b_node):
            assert time.monotonic() < deadline, "the dead node's cap lease was not swept"
            await asyncio.sleep(0.2)
        # Node a may spend what is left of the cap, and no more.
        for _ in range(40):
            answer = await ask(a.base_url, a.key)
            answers.append(answer)
            if answer != "ok":
                break
        assert answers[-1] == "402 spend_cap_reached", answers
        assert a.stop() == 0, a.stderr
        books = await pot(pg, key_id, today())
        print(f"{answers.count('ok')} ok; {books}")
        assert books["spent"] == books["rows_cost"] <= cap, books
        assert books["spent"] >= cap - 5 * ONE, books  # only b's unflushed rows' slice lost
        assert (books["leased"], books["leases"]) == (0, 0), books
    finally:
        for gw in nodes:
            gw.stop()
        mock.stop()


async def test_a_burst_that_finds_the_credit_lease_and_the_cap_lease_short_together_is_served(
        gateway_factory: Callable[..., Any], tmp_path: Path, mock_upstream: MockServer,
        pg: PgDatabase) -> None:
    # Both leases start as the same small slice (5 requests): request 6 on finds both
    # short; it waits for each top-up once, and none is refused (the cap is generous).
    raw = shared_raw(tmp_path, mock_upstream.base_url, pg.dsn)
    a: Gateway = await gateway_factory(raw, credit_nano=10**9)
    key_id = await key_of(pg, a.account_id)
    await a.components.accounts.set_key_caps(key_id, None, {"day": 10**9, "month": 10**9})
    answers = await asyncio.gather(*[ask(a.base_url, a.key) for _ in range(24)])
    assert answers == ["ok"] * 24, answers
    assert await a.components.usage.sync(10)
    books = await pot(pg, key_id, today())
    assert books["spent"] == books["rows_cost"] == 24 * ONE, books


async def test_a_revoked_capped_key_gives_its_cap_leases_back_on_every_node_within_a_second(
        gateway_factory: Callable[..., Any], tmp_path: Path, mock_upstream: MockServer,
        pg: PgDatabase) -> None:
    raw = shared_raw(tmp_path, mock_upstream.base_url, pg.dsn, slice_usd="0.5")
    a: Gateway = await gateway_factory(raw, credit_nano=10**9)
    b: Gateway = await gateway_factory(raw, credit_nano=0)
    key_id = await key_of(pg, a.account_id)
    await a.components.accounts.set_key_caps(key_id, None, {"day": 10**9})
    assert [await ask(n.base_url, a.key) for n in (a, b)] == ["ok", "ok"]
    assert (await pot(pg, key_id, today()))["leases"] == 2  # one slice on each node
    assert await b.components.accounts.revoke_key(key_id)
    deadline = time.monotonic() + 1.0
    while (books := await pot(pg, key_id, today()))["leased"]:
        assert time.monotonic() < deadline, f"a node kept its cap lease: {books}"
        await asyncio.sleep(0.05)
    assert [await ask(n.base_url, a.key) for n in (a, b)] == ["401 invalid_api_key"] * 2
    for node in (a, b):
        assert await node.components.usage.sync(10)
    books = await pot(pg, key_id, today())
    assert books["spent"] == books["rows_cost"] == 2 * ONE, books


async def test_a_cap_lease_in_use_is_renewed_past_its_ttl_and_an_idle_one_is_returned(
        gateway_factory: Callable[..., Any], tmp_path: Path, mock_upstream: MockServer,
        pg: PgDatabase) -> None:
    raw = shared_raw(tmp_path, mock_upstream.base_url, pg.dsn, slice_usd="0.5")
    raw["billing"] |= {"lease_ttl_s": 2, "lease_idle_return_s": 60}
    a: Gateway = await gateway_factory(raw, credit_nano=10**9)
    key_id = await key_of(pg, a.account_id)
    await a.components.accounts.set_key_caps(key_id, None, {"day": 10**9})
    assert await ask(a.base_url, a.key) == "ok"
    first = await pg.pool.fetchval("SELECT id FROM cap_leases WHERE key_id = $1", key_id)
    await asyncio.sleep(3.0)  # past the TTL: renewed (every TTL/4), never swept
    assert await ask(a.base_url, a.key) == "ok"
    assert await pg.pool.fetchval("SELECT id FROM cap_leases WHERE key_id = $1",
                                  key_id) == first
    leases = a.components.leases
    assert leases is not None and leases.store.round_trips["cap_extend"] >= 2
    # Idle: returned by the idle job (run here, with a short idle time), the leased
    # part freed exactly.
    assert isinstance(leases.caps, CapLeaseBook)
    leases.caps.idle_s = 0.1
    assert await a.components.usage.sync(10)
    await leases.return_idle()  # notes what each book looked like
    await asyncio.sleep(0.2)
    await leases.return_idle()  # unchanged for 0.1 s, nothing outstanding: returned
    books = await pot(pg, key_id, today())
    assert (books["leased"], books["leases"]) == (0, 0), books
    assert books["spent"] == books["rows_cost"] == 2 * ONE, books
