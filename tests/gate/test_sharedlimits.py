"""The Redis-backed limiter against a real redis-server: exact across "nodes".

Each ``SharedLimiter`` here is one node's (its own link, its own pool), all on one
Redis database; the assertions are on what the nodes admit together.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from flintproxy.config import Config, build_config
from flintproxy.errors import LimitNeverFits, RateLimited, RateLimiterUnavailable
from flintproxy.gate.gate import Principal
from flintproxy.gate.limiter import Limiter
from flintproxy.gate.sharedlimits import SharedLimiter, SharedTicket
from flintproxy.store.redislink import RedisLink
from flintproxy.tasks import TaskGroup
from tests.conftest import raw_config
from tests.engines import free_port

Factory = Callable[..., SharedLimiter]


def config(tmp_path: Path, **cluster: Any) -> Config:
    raw = raw_config(tmp_path, {"local": "http://127.0.0.1:9/v1"})
    # A loaded CI machine can stall a process for a second; the tests of a hanging
    # Redis set their own.
    raw["cluster"] = {"redis_timeout_s": 5.0} | cluster
    raw["limits"] = {"default_rpm": 600, "default_tpm": 10**9}
    return build_config(raw, {})


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[Factory]:
    """Each node as the composition root makes it: its link's sender task running."""
    made: list[SharedLimiter] = []
    tasks = TaskGroup()

    def make(url: str, **cluster: Any) -> SharedLimiter:
        cfg = config(tmp_path, redis_url=url, **cluster)
        link = RedisLink(cfg.cluster)
        tasks.spawn("redis pipeline", link.pipeline())
        lim = SharedLimiter(cfg, link)
        made.append(lim)
        return lim

    yield make
    await tasks.close()
    for lim in made:
        await lim.close()
        await lim.link.close()


def key(rpm: int | None = None, tpm: int | None = None, conc: int | None = None,
        key_id: int = 1, account_id: int = 1) -> Principal:
    return Principal(key_id=key_id, account_id=account_id, rpm=rpm, tpm=tpm,
                     max_concurrent=conc)


async def test_ten_requests_a_minute_are_exactly_ten_across_three_nodes(
        nodes: Factory, redis_url: str) -> None:
    a, b, c = nodes(redis_url), nodes(redis_url), nodes(redis_url)
    p = key(rpm=10)
    admitted: list[dict[str, str]] = []
    refused: list[RateLimited] = []
    for i in range(30):
        node = (a, b, c)[i % 3]
        try:
            t = await node.admit(p, 1)
        except RateLimited as exc:
            refused.append(exc)
            continue
        admitted.append(node.headers(t))
        node.release(t, 1)
    assert len(admitted) == 10
    # The remaining count goes down by one per admission, whichever node admitted.
    assert [int(h["x-ratelimit-remaining-requests"]) for h in admitted] == list(range(9, -1, -1))
    assert all(h["x-ratelimit-limit-requests"] == "10" for h in admitted)
    assert len(refused) == 20
    for exc in refused:
        assert exc.code == "rate_limit_requests"
        assert exc.headers["x-ratelimit-remaining-requests"] == "0"
        # One request comes back every 6 s: the wait is at most that.
        assert 1 <= int(exc.headers["Retry-After"]) <= 6
        assert "Limit 10, Used 10, Requested 1" in exc.message


async def test_concurrent_admissions_on_two_nodes_never_exceed_the_limit(
        nodes: Factory, redis_url: str) -> None:
    a, b = nodes(redis_url), nodes(redis_url)
    p = key(rpm=25)
    results = await asyncio.gather(*[(a if i % 2 else b).admit(p, 1) for i in range(200)],
                                   return_exceptions=True)
    assert sum(isinstance(r, SharedTicket) for r in results) == 25
    assert all(isinstance(r, SharedTicket | RateLimited) for r in results)
    # Batched: far fewer round trips than admissions.
    assert a.link.round_trips + b.link.round_trips < 100
    assert a.link.calls + b.link.calls == 200


async def test_an_admission_cancelled_in_flight_gives_back_what_redis_took(
        nodes: Factory, redis_url: str) -> None:
    a = nodes(redis_url)
    p = key(conc=1, rpm=100)
    for _ in range(20):
        task = asyncio.ensure_future(a.admit(p, 1))
        await asyncio.sleep(0)  # queued; the batch goes out while we cancel
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RateLimited):
            t = await task
            a.release(t, 1)
        await asyncio.sleep(0.01)
        await a.flush()
    # Every slot came back: the one allowed in flight is free.
    a.release(await a.admit(p, 1), 1)


async def test_the_concurrency_limit_holds_across_nodes_and_frees_on_release(
        nodes: Factory, redis_url: str) -> None:
    a, b = nodes(redis_url), nodes(redis_url)
    p = key(conc=3)
    held = [await a.admit(p, 1), await b.admit(p, 1), await a.admit(p, 1)]
    with pytest.raises(RateLimited) as exc:
        await b.admit(p, 1)
    assert exc.value.code == "rate_limit_concurrency"
    assert "Limit 3, In flight 3" in exc.value.message
    a.release(held[0], 1)
    with pytest.raises(RateLimited):  # queued, not yet flushed
        await b.admit(p, 1)
    await a.flush()
    b.release(await b.admit(p, 1), 1)


async def test_a_crashed_nodes_slots_come_back_after_their_ttl(
        nodes: Factory, redis_url: str) -> None:
    crashed, alive = nodes(redis_url, slot_ttl_s=0.3), nodes(redis_url, slot_ttl_s=0.3)
    p = key(conc=1)
    await crashed.admit(p, 1)  # never released, never renewed: the node "died"
    with pytest.raises(RateLimited):
        await alive.admit(p, 1)
    await asyncio.sleep(0.4)
    alive.release(await alive.admit(p, 1), 1)


async def test_renewal_keeps_a_long_requests_slot(nodes: Factory, redis_url: str) -> None:
    a, b = nodes(redis_url, slot_ttl_s=0.3), nodes(redis_url, slot_ttl_s=0.3)
    p = key(conc=1)
    held = await a.admit(p, 1)
    for _ in range(4):
        await asyncio.sleep(0.1)
        await a.renew()
    with pytest.raises(RateLimited):
        await b.admit(p, 1)
    a.release(held, 1)
    await a.flush()
    b.release(await b.admit(p, 1), 1)


async def test_nothing_is_taken_when_the_account_scope_refuses(
        nodes: Factory, redis_url: str) -> None:
    a, b = nodes(redis_url), nodes(redis_url)
    for node in (a, b):
        node.set_account_limits(7, rpm=2)
    k1, k2 = key(rpm=100, key_id=1, account_id=7), key(rpm=100, key_id=2, account_id=7)
    first = await a.admit(k1, 1)
    await b.admit(k2, 1)
    with pytest.raises(RateLimited) as exc:
        await a.admit(k1, 1)
    assert exc.value.message.startswith("Rate limit reached for requests per min (RPM) on this "
                                        "account: Limit 2")
    # The account's refusal shows the tighter trio: the account's.
    assert exc.value.headers["x-ratelimit-limit-requests"] == "2"
    # Key 1 spent only what was admitted: 98 left of its own 100 (the headers show the
    # tighter account: 0 left of 2).
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    other = nodes(redis_url)  # a node without the account override sees the key alone
    h = other.headers(await other.admit(k1, 1))
    assert h["x-ratelimit-remaining-requests"] == "98"


async def test_tokens_are_trued_up_in_one_batched_round_trip(
        nodes: Factory, redis_url: str) -> None:
    a = nodes(redis_url)
    p = key(tpm=1000, rpm=1000)
    tickets = [await a.admit(p, 100) for _ in range(8)]
    with pytest.raises(RateLimited) as exc:
        await a.admit(p, 300)
    assert exc.value.code == "rate_limit_tokens"
    before = a.link.round_trips
    for t in tickets:
        a.release(t, 10)  # each used 10 of its 100
    assert a.link.round_trips == before  # release never goes to Redis itself
    await a.flush()
    assert a.link.round_trips == before + 1
    h = a.headers(await a.admit(p, 100))
    assert int(h["x-ratelimit-remaining-tokens"]) == pytest.approx(1000 - 80 - 100, abs=2)


async def test_a_request_larger_than_the_tpm_can_never_fit(
        nodes: Factory, redis_url: str) -> None:
    a = nodes(redis_url)
    with pytest.raises(LimitNeverFits) as exc:
        await a.admit(key(tpm=100), 101)
    assert "Retry-After" not in exc.value.headers
    assert exc.value.headers["x-should-retry"] == "false"


async def test_the_remaining_counts_match_the_in_memory_limiter(
        nodes: Factory, redis_url: str, tmp_path: Path) -> None:
    shared = nodes(redis_url)
    local = Limiter(config(tmp_path).limits)
    shared.set_account_limits(3, tpm=5000)
    local.set_account_limits(3, tpm=5000)
    p = key(rpm=7, tpm=100_000, account_id=3)
    for tokens in (10, 900, 3000, 50, 1, 900, 200):
        try:
            lt = local.acquire(p, tokens)
        except RateLimited as exc:
            with pytest.raises(RateLimited) as sexc:
                await shared.admit(p, tokens)
            assert sexc.value.code == exc.code
            continue
        st = await shared.admit(p, tokens)
        lh, sh = local.headers(lt), shared.headers(st)
        for name in ("limit-requests", "remaining-requests", "limit-tokens"):
            assert sh[f"x-ratelimit-{name}"] == lh[f"x-ratelimit-{name}"], name
        # Both refill in real time (83 tokens/s here): the two clocks are read a few
        # ms apart.
        assert abs(int(sh["x-ratelimit-remaining-tokens"])
                   - int(lh["x-ratelimit-remaining-tokens"])) <= 2


async def test_a_flushed_script_cache_is_reloaded_once(nodes: Factory, redis_url: str) -> None:
    a = nodes(redis_url)
    await a.admit(key(), 1)
    client = aioredis.Redis.from_url(redis_url)
    await client.script_flush()
    await client.aclose()
    before = a.link.round_trips
    await a.admit(key(), 1)
    # The refused EVALSHA, SCRIPT LOAD, the EVALSHA again.
    assert a.link.round_trips == before + 3
    await a.admit(key(), 1)
    assert a.link.round_trips == before + 4


async def test_a_dead_redis_fails_closed_with_a_clear_503(nodes: Factory) -> None:
    a = nodes(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RateLimiterUnavailable) as exc:
        await a.admit(key(), 1)
    assert exc.value.status == 503
    assert exc.value.payload()["error"]["type"] == "server_error"
    assert exc.value.payload()["error"]["code"] == "rate_limiter_unavailable"
    assert not a.link.up
    trips = a.link.round_trips
    with pytest.raises(RateLimiterUnavailable):  # while down: no new attempt per request
        await a.admit(key(), 1)
    assert a.link.round_trips == trips


async def test_a_dead_redis_fails_open_to_the_nodes_share_of_the_limit(
        nodes: Factory) -> None:
    a = nodes(f"redis://127.0.0.1:{free_port()}/0", on_redis_down="open", nodes=2)
    p = key(rpm=10)
    admitted = 0
    for _ in range(10):
        try:
            a.release(await a.admit(p, 1), 1)
            admitted += 1
        except RateLimited:
            pass
    assert admitted == 5
    assert a.local_admissions == 10


async def test_a_redis_that_never_answers_fails_within_the_timeout(
        nodes: Factory) -> None:
    # A hostile peer: accepts connections, reads, never writes a byte.
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(1 << 16):  # read everything, answer nothing
            pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        a = nodes(f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.2)
        started = time.monotonic()
        with pytest.raises(RateLimiterUnavailable):
            await a.admit(key(), 1)
        assert time.monotonic() - started < 2.0
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_the_link_reconnects_once_redis_answers_again(nodes: Factory,
                                                            redis_url: str) -> None:
    a = nodes(redis_url)
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    a.link.up = False  # as after a failure
    await a.link.reconnect()
    assert a.link.up
    with socket.socket() as s:  # the real server is there: admissions work again
        s.connect(("127.0.0.1", port))
    await a.admit(key(), 1)
