"""Money exact across nodes, end to end: gateways on one PostgreSQL, the openai SDK.

Each node spends credit leases (gate.leases) on the shared account; whatever the
interleaving, the balance never goes below zero and the usage rows sum to exactly
credited - balance. The first test runs three in-process nodes; the second real
``flintproxy serve`` processes, one of them SIGKILLed under load and restarted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from flintproxy.store import postgres
from flintproxy.store.db import PgDatabase
from tests.conftest import Gateway, MockServer, raw_config
from tests.support import LiveGateway, LiveMock

pytestmark = pytest.mark.timeout(180)

MESSAGES = [{"role": "user", "content": "hi"}]
# 100 completion tokens at $0.60/Mtok: 60,000 nano, plus a few prompt tokens; the
# reservation adds the prompt's upper bound (its bytes).
FULL = {"x-mock-chunks": "100"}
CREDIT_NANO = 650_000  # affords 10 such requests


@pytest.fixture
async def pg(postgres_dsn: str) -> AsyncIterator[PgDatabase]:
    db = await postgres.open_database(postgres_dsn, 4)
    await postgres.migrate(db)  # flintproxy admin migrate
    yield db
    await db.close()


def shared_raw(tmp_path: Path, upstream: str, dsn: str) -> dict[str, Any]:
    raw = raw_config(tmp_path, {"local": upstream})
    raw["storage"] = {"backend": "postgresql", "dsn": dsn}
    # Small slices: the account's credit spreads over several leases and top-ups.
    raw["billing"] = {"lease_min_usd": "0.0001", "lease_ttl_s": 3,
                      "flush_interval_s": 0.05}
    return raw


async def ledger(pg: PgDatabase, account_id: int) -> dict[str, int]:
    row = await pg.pool.fetchrow(
        "SELECT credited_nano, balance_nano, leased_nano, charged_nano, "
        "(SELECT COALESCE(SUM(cost_nano), 0) FROM usage WHERE account_id = $1), "
        "(SELECT COUNT(*) FROM usage WHERE account_id = $1), "
        "(SELECT COUNT(DISTINCT request_id) FROM usage WHERE account_id = $1), "
        "(SELECT COALESCE(SUM(granted_nano - spent_nano), 0) FROM credit_leases "
        " WHERE account_id = $1), "
        "(SELECT COUNT(*) FROM credit_leases WHERE account_id = $1) "
        "FROM accounts WHERE id = $1", account_id)
    assert row is not None
    names = ("credited", "balance", "leased", "charged", "rows_cost", "rows", "ids",
             "unspent", "leases")
    return {n: int(v) for n, v in zip(names, row, strict=True)}


def assert_exact(books: dict[str, int]) -> None:
    assert books["balance"] >= 0, books
    assert books["rows_cost"] == books["credited"] - books["balance"], books
    assert books["charged"] == books["rows_cost"], books
    assert books["rows"] == books["ids"], books  # no row twice
    assert books["leased"] == books["unspent"] <= books["balance"], books


async def ask(base_url: str, key: str) -> str:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0,
                                  timeout=30) as client:
        try:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, max_tokens=100,  # type: ignore[arg-type]
                extra_headers=FULL)
        except openai.APIStatusError as exc:
            return str(exc.status_code)
        except openai.APIConnectionError:
            return "connection"
    return "ok"


async def test_64_concurrent_requests_over_three_nodes_never_overdraw_an_account_worth_10(
        gateway_factory: Callable[..., Any], tmp_path: Path, mock_upstream: MockServer,
        pg: PgDatabase) -> None:
    raw = shared_raw(tmp_path, mock_upstream.base_url, pg.dsn)
    a: Gateway = await gateway_factory(raw, credit_nano=CREDIT_NANO)
    b: Gateway = await gateway_factory(raw, credit_nano=0)
    c: Gateway = await gateway_factory(raw, credit_nano=0)
    nodes = (a, b, c)
    answers = await asyncio.gather(*[ask(nodes[i % 3].base_url, a.key) for i in range(64)])
    ok = answers.count("ok")
    # About 10 full ones; the last may be granted a lowered max_tokens (what the
    # balance still affords) instead of a 402, as in the embedded mode.
    assert 5 <= ok <= 20 and answers.count("402") == 64 - ok, answers
    for node in nodes:
        assert await node.components.usage.sync(10)
    books = await ledger(pg, a.account_id)
    assert_exact(books)
    assert books["rows"] == ok  # a refused request leaves no row
    # Money round trips for the whole burst, all nodes together (the rare path
    # dominates here: an account worth 10 requests is short on every node).
    trips = 0
    for node in nodes:
        leases = node.components.leases
        assert leases is not None
        trips += sum(n for op, n in leases.store.round_trips.items() if op != "debit")
    print(f"money round trips: {trips} for 64 requests over 3 nodes; {ok} ok; {books}")
    for node in nodes:
        await node.server.shutdown()
    books = await ledger(pg, a.account_id)
    assert_exact(books)
    assert (books["leased"], books["leases"]) == (0, 0)  # every lease returned at shutdown


async def test_a_credit_on_one_node_is_spendable_on_another_at_once(
        gateway_factory: Callable[..., Any], tmp_path: Path, mock_upstream: MockServer,
        pg: PgDatabase) -> None:
    raw = shared_raw(tmp_path, mock_upstream.base_url, pg.dsn)
    a: Gateway = await gateway_factory(raw, credit_nano=0)
    b: Gateway = await gateway_factory(raw, credit_nano=0)
    assert await ask(b.base_url, a.key) == "402"
    await a.components.accounts.credit(a.account_id, 200_000)
    deadline = time.monotonic() + 1.0
    while await ask(b.base_url, a.key) != "ok":
        assert time.monotonic() < deadline, "the credit did not reach node b within 1 s"
        await asyncio.sleep(0.05)
    # Disabled on a: b returns the unreserved part of its lease within a second.
    await a.components.accounts.set_status(a.account_id, "disabled")
    deadline = time.monotonic() + 1.0
    while (await ledger(pg, a.account_id))["leased"]:
        assert time.monotonic() < deadline, "node b kept its lease of a disabled account"
        await asyncio.sleep(0.05)
    assert_exact(await ledger(pg, a.account_id))


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_node_sigkilled_under_load_loses_no_money_and_its_lease_expires_back(
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
        live = [a, b]
        stop = asyncio.Event()
        answers: list[str] = []

        async def client(i: int) -> None:
            while not stop.is_set():
                answers.append(await ask(live[i % len(live)].base_url, a.key))

        load = [asyncio.create_task(client(i)) for i in range(8)]
        await asyncio.sleep(2.0)
        # Node ids are host/pid/random (gate.leases.new_node_id).
        of_b = "SELECT COUNT(*) FROM credit_leases WHERE node_id LIKE $1"
        b_node = f"%/{b.pid}/%"
        assert await pg.pool.fetchval(of_b, b_node) >= 1  # b spends a lease of its own
        assert b.proc is not None
        b.proc.kill()  # SIGKILL mid-load: its queued rows and its lease are abandoned
        b.proc.wait(10)
        live.remove(b)
        await asyncio.sleep(1.0)
        live.append(node("b-restarted", ""))  # the same role, a new process and node id
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*load)
        assert answers.count("ok") > 20, answers
        # The dead node's lease expires (TTL 3 s) and a live node's sweep returns it.
        deadline = time.monotonic() + 15
        while await pg.pool.fetchval(of_b, b_node):
            assert time.monotonic() < deadline, "the dead node's lease was not swept"
            await asyncio.sleep(0.2)
        for gw in nodes:
            if gw.alive():
                assert gw.stop() == 0, gw.stderr
        books = await ledger(pg, owner)
        print(f"{answers.count('ok')} ok of {len(answers)}; {books}")
        assert_exact(books)
        assert (books["leased"], books["leases"]) == (0, 0)
        # Lost: at most the rows the killed node had not flushed (50 ms here).
        assert answers.count("ok") - 16 <= books["rows"] <= answers.count("ok"), books
    finally:
        for gw in nodes:
            gw.stop()
        mock.stop()
