"""Limits across nodes, end to end: several gateways, one Redis, the openai SDK.

Most nodes here are in-process gateways sharing one SQLite file (accounts and keys)
and one Redis database (limits): what the shared limiter does is the same whichever
store holds the accounts. The last test runs two ``flintproxy serve`` processes on
PostgreSQL + Redis; tests/test_supervisor.py runs ``--workers``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Gateway, MockServer, migrated_dsn, raw_config
from tests.engines import RedisServer, free_port
from tests.support import LiveGateway

MESSAGES = [{"role": "user", "content": "hi"}]


def client(gw: Gateway, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key or gw.key, max_retries=0,
                              timeout=20)


async def nodes_of(factory: Callable[..., Any], raw: dict[str, Any], n: int) -> list[Gateway]:
    return [await factory(raw) for _ in range(n)]


async def key_id_of(gw: Gateway) -> int:
    (info,) = await gw.components.accounts.list_keys(gw.account_id)
    return int(info.id)


async def wait_until(check: Callable[[], Any], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture
def shared_raw(tmp_path: Path, mock_upstream: MockServer, redis_url: str) -> dict[str, Any]:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["cluster"] = {"redis_url": redis_url, "nodes": 3, "redis_timeout_s": 5.0}
    return raw


async def test_a_key_limited_to_10_requests_a_minute_gets_exactly_10_across_three_nodes(
        gateway_factory: Callable[..., Any], shared_raw: dict[str, Any]) -> None:
    a, b, c = await nodes_of(gateway_factory, shared_raw, 3)
    await a.components.accounts.set_limits(a.account_id, await key_id_of(a), 10, None, None)
    # The change reaches every node through the change feed (polled every 50 ms here).
    await asyncio.sleep(0.5)
    ok: list[int] = []
    refused: list[openai.RateLimitError] = []
    for i in range(24):
        node = (a, b, c)[i % 3]
        async with client(node, a.key) as cl:
            try:
                raw = await cl.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
            except openai.RateLimitError as exc:
                refused.append(exc)
                continue
            assert raw.headers["x-ratelimit-limit-requests"] == "10"
            ok.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert ok == list(range(9, -1, -1))  # counting down across the nodes
    assert len(refused) == 14
    for exc in refused:
        assert exc.status_code == 429
        assert exc.code == "rate_limit_requests"
        assert exc.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(exc.response.headers["retry-after"]) <= 6  # one back every 6 s
        reset = exc.response.headers["x-ratelimit-reset-requests"]
        assert reset.endswith("s") and not reset.startswith("0")


async def test_the_concurrency_limit_holds_across_nodes(
        gateway_factory: Callable[..., Any], shared_raw: dict[str, Any]) -> None:
    a, b, c = await nodes_of(gateway_factory, shared_raw, 3)
    await a.components.accounts.set_limits(a.account_id, await key_id_of(a), None, None, 2)
    await asyncio.sleep(0.5)
    slow = {"x-mock-first-delay-ms": "1500"}

    async def call(node: Gateway) -> str:
        async with client(node, a.key) as cl:
            try:
                await cl.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                                 extra_headers=slow)
            except openai.RateLimitError as exc:
                return str(exc.code)
            return "ok"

    first = [asyncio.create_task(call(a)), asyncio.create_task(call(b))]
    await asyncio.sleep(0.5)  # both admitted and waiting on the upstream
    assert await call(c) == "rate_limit_concurrency"
    assert await call(a) == "rate_limit_concurrency"
    assert await asyncio.gather(*first) == ["ok", "ok"]
    await asyncio.sleep(0.1)  # the releases are flushed within a few ms
    assert await call(c) == "ok"


async def test_redis_unreachable_is_a_clear_503_and_readyz_says_why(
        gateway_factory: Callable[..., Any], tmp_path: Path, mock_upstream: MockServer) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["cluster"] = {"redis_url": f"redis://:s3cret@127.0.0.1:{free_port()}/0"}
    gw = await gateway_factory(raw)
    async with client(gw) as cl:
        with pytest.raises(openai.InternalServerError) as exc:
            await cl.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert exc.value.status_code == 503
    body = exc.value.response.json()
    assert body["error"]["type"] == "server_error"
    assert body["error"]["code"] == "rate_limiter_unavailable"
    assert "s3cret" not in exc.value.response.text
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/readyz") as r:
            assert r.status == 503
            ready = await r.json()
        async with http.get(gw.console_url + "/metrics") as r:
            text = await r.text()
    assert ready["checks"]["rate_limiter"]["ok"] is False
    assert ready["checks"]["rate_limiter"]["redis"] == "down"
    assert "s3cret" not in str(ready)
    assert "flintproxy_redis_up 0.0" in text


async def test_redis_down_fails_open_to_the_nodes_share_when_configured(
        gateway_factory: Callable[..., Any], tmp_path: Path, mock_upstream: MockServer) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["cluster"] = {"redis_url": f"redis://127.0.0.1:{free_port()}/0",
                      "on_redis_down": "open", "nodes": 2}
    raw["limits"] = {"default_rpm": 8}
    gw = await gateway_factory(raw)
    codes = []
    async with client(gw) as cl:
        for _ in range(6):
            try:
                await cl.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
                codes.append(200)
            except openai.RateLimitError:
                codes.append(429)
    assert codes == [200] * 4 + [429] * 2  # 8 / 2 nodes
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/readyz") as r:
        assert r.status == 200
        check = (await r.json())["checks"]["rate_limiter"]
    assert check["ok"] is True and check["redis"] == "down"


@pytest.fixture
def own_redis() -> Any:
    server = RedisServer.start()
    yield server
    server.stop()


@pytest.mark.timeout(90)
async def test_a_redis_restart_is_503_while_down_and_served_again_once_back(
        gateway_factory: Callable[..., Any], tmp_path: Path, mock_upstream: MockServer,
        own_redis: RedisServer) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["cluster"] = {"redis_url": own_redis.url(0)}
    gw = await gateway_factory(raw)

    async def status() -> int:
        async with client(gw) as cl:
            try:
                await cl.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
            except openai.APIStatusError as exc:
                return exc.status_code
            return 200

    assert await status() == 200
    own_redis.kill()
    assert await status() == 503
    assert await status() == 503
    own_redis.restart()

    async def served() -> bool:
        return await status() == 200

    await wait_until(served, 10.0)  # the reconnect backoff is at most 5 s
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/readyz") as r:
        assert r.status == 200


async def test_releases_cost_no_round_trip_per_request(
        gateway_factory: Callable[..., Any], shared_raw: dict[str, Any]) -> None:
    shared_raw["limits"] = {"default_tpm": 10**9}
    gw = await gateway_factory(shared_raw)
    limits = gw.components.limits
    assert limits is not None
    await asyncio.sleep(0.1)
    trips, calls = limits.link.round_trips, limits.link.calls
    async with client(gw) as cl:
        await asyncio.gather(*[
            cl.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
            for _ in range(50)])
    await asyncio.sleep(0.05)
    calls = limits.link.calls - calls
    trips = limits.link.round_trips - trips
    # 50 admissions and a few batched release flushes: far below 2 commands per
    # request; concurrent admissions share round trips.
    assert 50 < calls < 60, calls
    assert trips <= calls


@pytest.fixture
async def silent_redis() -> AsyncIterator[int]:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(1 << 16):  # read everything, answer nothing
            pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for w in held:
        w.close()
    server.close()
    await server.wait_closed()


async def test_a_redis_that_hangs_costs_each_request_its_timeout_then_nothing(
        gateway_factory: Callable[..., Any], tmp_path: Path, mock_upstream: MockServer,
        silent_redis: int) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["cluster"] = {"redis_url": f"redis://127.0.0.1:{silent_redis}/0",
                      "redis_timeout_s": 0.2}
    gw = await gateway_factory(raw)
    async with client(gw) as cl:
        started = time.monotonic()
        results = await asyncio.gather(*[
            cl.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
            for _ in range(20)], return_exceptions=True)
        assert time.monotonic() - started < 3.0
    assert all(isinstance(r, openai.InternalServerError) and r.status_code == 503
               for r in results)
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/healthz") as r:
        assert r.status == 200  # the server keeps serving


@pytest.mark.timeout(120)
async def test_two_serve_processes_on_postgresql_and_redis_admit_exactly_ten_a_minute(
        tmp_path: Path, mock_upstream: MockServer, redis_url: str,
        request: pytest.FixtureRequest) -> None:
    dsn = await migrated_dsn(request)
    nodes: list[LiveGateway] = []
    try:
        for name in ("a", "b"):
            raw = raw_config(tmp_path / name, {"local": mock_upstream.base_url})
            raw["storage"] = {"backend": "postgresql", "dsn": dsn}
            raw["cluster"] = {"redis_url": redis_url, "nodes": 2}
            (tmp_path / name).mkdir()
            nodes.append(await asyncio.to_thread(LiveGateway(tmp_path / name, raw).start))
        a = nodes[0]
        a.admin("set-limits", a.email, "--rpm", "10")
        await asyncio.sleep(1.5)  # every node hears of it within 1 s (LISTEN/NOTIFY)
        remaining: list[int] = []
        refused = 0
        for i in range(24):
            node = nodes[i % 2]
            async with openai.AsyncOpenAI(base_url=node.base_url, api_key=a.key,
                                          max_retries=0) as cl:
                try:
                    raw_response = await cl.chat.completions.with_raw_response.create(
                        model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
                except openai.RateLimitError as exc:
                    refused += 1
                    assert exc.code == "rate_limit_requests"
                    assert exc.response.headers["x-ratelimit-remaining-requests"] == "0"
                    assert 1 <= int(exc.response.headers["retry-after"]) <= 6
                    continue
                remaining.append(int(raw_response.headers["x-ratelimit-remaining-requests"]))
        assert remaining == list(range(9, -1, -1))
        assert refused == 14
        assert [n.stop(30) for n in nodes] == [0, 0]
    finally:
        for n in nodes:
            n.stop()
