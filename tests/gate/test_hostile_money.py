"""Hostile money: a request never costs more than it reserved (issue 12, defect 1).

Against the real gateway, a real SQLite file and the real mock upstream, which stops
at ``max_tokens`` / ``max_completion_tokens`` as providers do. A hostile upstream
that ignores the limit is a real HTTP server too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from flintproxy.gate.bounds import measure, with_limit
from flintproxy.money import NANO_PER_USD
from flintproxy.tools.mock import MockSettings, expected_content
from tests.conftest import Gateway, MockServer, raw_config, start_mock

GatewayFactory = Callable[..., Awaitable[Gateway]]
# 1,000 nano-dollars per completion token, prompts free: costs are easy to read.
PER_TOKEN = {"input_usd_per_mtok": "0", "output_usd_per_mtok": "1.00"}
TOKEN = 1000


@pytest.fixture
async def long_mock() -> AsyncIterator[MockServer]:
    """A mock that answers 16,000 tokens unless the request's limit stops it."""
    server = await start_mock(MockSettings(chunks=16_000))
    yield server
    await server.runner.cleanup()


async def totals(gw: Gateway) -> tuple[int, int, int]:
    """(credited, charged, balance) of the test account, after the ledger caught up."""
    assert await gw.components.usage.sync(10)
    rows = await gw.components.usage_db.fetch(
        "SELECT credited_nano, charged_nano, balance_nano FROM accounts WHERE id = ?",
        gw.account_id)
    (credited, charged, balance), = rows
    return int(credited), int(charged), int(balance)


async def usage_rows(gw: Gateway) -> list[tuple[int, int, str]]:
    rows = await gw.components.usage_db.fetch(
        "SELECT cost_nano, completion_tokens, outcome FROM usage WHERE account_id = ?",
        gw.account_id)
    return [(int(r[0]), int(r[1]), str(r[2])) for r in rows]


def sdk(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0)


async def metric(gw: Gateway, name: str) -> str:
    async with aiohttp.ClientSession() as http, \
            http.get(gw.console_url + "/metrics") as resp:
        text = await resp.text()
    return next(line for line in text.splitlines() if line.startswith(name + " "))


async def test_twenty_concurrent_unlimited_requests_never_overspend(
        tmp_path: Path, long_mock: MockServer, gateway_factory: GatewayFactory) -> None:
    # The reported case: gpt-4o, no max_tokens, each answer 16,000 tokens long, $0.50.
    funded = NANO_PER_USD // 2
    gw = await gateway_factory(raw_config(tmp_path, {"local": long_mock.base_url}),
                               credit_nano=funded)
    default = gw.config.billing.default_max_tokens

    async def ask(i: int) -> str:
        messages = [{"role": "user", "content": f"tell me everything, part {i}"}]
        try:
            if i % 2:
                stream = await client.chat.completions.create(
                    model="gpt-4o", messages=messages, stream=True)  # type: ignore[arg-type]
                finish = [c.choices[0].finish_reason async for c in stream if c.choices]
                return str(finish[-1])
            reply = await client.chat.completions.create(
                model="gpt-4o", messages=messages)  # type: ignore[arg-type]
            return str(reply.choices[0].finish_reason)
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
            return "402"

    async with sdk(gw) as client:
        results = await asyncio.gather(*(ask(i) for i in range(20)))
    # Held to the reserved limit: cut short ("length"), or refused up front.
    assert set(results) == {"length", "402"}
    assert long_mock.stats.last_body["max_tokens"] <= default
    credited, charged, balance = await totals(gw)
    assert credited == funded and balance == funded - charged >= 0
    rows = await usage_rows(gw)
    assert len(rows) == results.count("length") and sum(r[0] for r in rows) == charged
    assert all(tokens <= default and outcome == "ok" for _, tokens, outcome in rows)
    # No upstream ever reported more than its reservation covered.
    assert gw.components.billing.overruns == 0
    assert await metric(gw, "flintproxy_usage_over_reservation_total") \
        == "flintproxy_usage_over_reservation_total 0.0"


async def test_a_max_tokens_larger_than_the_balance_affords_is_lowered_and_ends_in_length(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: GatewayFactory) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["models"]["gpt-4o-mini"] = PER_TOKEN
    gw = await gateway_factory(raw, credit_nano=12 * TOKEN + TOKEN - 1)  # affords 12 tokens
    async with sdk(gw) as client:
        reply = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    assert mock_upstream.stats.last_body["max_tokens"] == 12
    assert reply.choices[0].message.content == expected_content(12)
    assert reply.choices[0].finish_reason == "length"
    assert await totals(gw) == (13 * TOKEN - 1, 12 * TOKEN, TOKEN - 1)


async def test_the_clients_own_limit_parameter_is_the_one_lowered(
        tmp_path: Path, long_mock: MockServer, gateway_factory: GatewayFactory) -> None:
    mock_upstream = long_mock
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["models"]["gpt-4o-mini"] = {**PER_TOKEN, "max_output_tokens": 100}
    gw = await gateway_factory(raw)
    async with sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=5000, stream=True)
        finish = [c.choices[0].finish_reason async for c in stream if c.choices]
        sent = mock_upstream.stats.last_body
        assert (sent["max_completion_tokens"], "max_tokens" in sent) == (100, False)
        assert finish[-1] == "length"
        # Both sent, different: both lowered, so no provider can honour the larger.
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
            max_tokens=15, max_completion_tokens=10)
        sent = mock_upstream.stats.last_body
        assert (sent["max_tokens"], sent["max_completion_tokens"]) == (10, 10)
        # A limit within the reservation leaves the body alone.
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert mock_upstream.stats.last_body["max_tokens"] == 3


async def test_the_models_max_output_tokens_caps_every_request(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: GatewayFactory) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["models"]["gpt-4o"]["max_output_tokens"] = 7
    gw = await gateway_factory(raw)
    async with sdk(gw) as client:
        for limit in (None, 100):
            extra: dict[str, Any] = {} if limit is None else {"max_tokens": limit}
            reply = await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], **extra)
            assert mock_upstream.stats.last_body["max_tokens"] == 7
            assert reply.choices[0].message.content == expected_content(7)
            assert reply.choices[0].finish_reason == "length"
            assert reply.usage is not None and reply.usage.completion_tokens == 7


async def test_n_multiplies_the_reservation(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: GatewayFactory) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["models"]["gpt-4o-mini"] = PER_TOKEN
    # Three choices of 10 tokens cost 30 tokens: one nano-dollar short of that.
    gw = await gateway_factory(raw, credit_nano=30 * TOKEN - 1)
    async with sdk(gw) as client:
        reply = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
            max_tokens=10, n=3)
    assert mock_upstream.stats.last_body["max_tokens"] == 9  # 3 x 9 fit, 3 x 10 do not
    assert reply.usage is not None and reply.usage.completion_tokens == 27
    assert await totals(gw) == (30 * TOKEN - 1, 27 * TOKEN, 3 * TOKEN - 1)


async def test_best_of_and_prompt_arrays_multiply_the_reservation(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: GatewayFactory) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["models"]["gpt-4o-mini"] = PER_TOKEN
    # Two prompts x best_of 3 = six completions; 5 tokens each would cost 30 tokens.
    gw = await gateway_factory(raw, credit_nano=30 * TOKEN - 1)
    async with sdk(gw) as client:
        reply = await client.completions.create(
            model="gpt-4o-mini", prompt=["once", "upon"], max_tokens=5, n=2, best_of=3)
        assert mock_upstream.stats.last_body["max_tokens"] == 4
        assert reply.usage is not None and reply.usage.completion_tokens == 24
        assert reply.choices[0].finish_reason == "length"
        assert await totals(gw) == (30 * TOKEN - 1, 24 * TOKEN, 6 * TOKEN - 1)
        # What is left buys five completions of one token, not seven.
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(
                model="gpt-4o-mini", prompt=["a", "b", "c", "d", "e", "f", "g"], max_tokens=5)
        assert info.value.status_code == 402
        reply = await client.completions.create(
            model="gpt-4o-mini", prompt=[[1, 2], [3], [4], [5], [6]], max_tokens=5)
        assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert (await totals(gw))[2] == TOKEN - 1


async def test_image_parts_are_bounded_by_the_configured_maximum(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: GatewayFactory) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    # Prompt tokens cost 1,000 nano each, completions nothing; an image is <= 1,000 tokens.
    raw["models"]["gpt-4o-mini"] = {"input_usd_per_mtok": "1.00", "output_usd_per_mtok": "0"}
    raw["billing"] = {"max_tokens_per_media_part": 1000}
    short = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    payload = base64.b64encode(bytes(300_000)).decode()  # 400,000 bytes of base64
    inline = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload}}

    def ask(part: dict[str, Any]) -> list[Any]:
        return [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, part]}]

    gw = await gateway_factory(raw, credit_nano=1500 * TOKEN)
    async with sdk(gw) as client:
        # A short URL can cost a thousand tokens: reserved as such (1,000 + the text).
        await client.chat.completions.create(model="gpt-4o-mini", messages=ask(short))
        # A 400 KB inline image is still one part, not 400,000 tokens of text.
        await client.chat.completions.create(model="gpt-4o-mini", messages=ask(inline))
        # Two images need 2,000 tokens of room: more than the balance holds.
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=ask(short) + ask(short))
        assert info.value.status_code == 402
    gw2 = await gateway_factory(raw, credit_nano=900 * TOKEN)
    async with sdk(gw2) as client:
        with pytest.raises(openai.APIStatusError) as info:  # even a tiny URL may cost 1,000
            await client.chat.completions.create(model="gpt-4o-mini", messages=ask(short))
        assert info.value.status_code == 402


async def test_an_embedding_reserves_its_input_bytes_only_and_goes_unchanged(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: GatewayFactory) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["models"]["text-embedding-3-small"] = {"input_usd_per_mtok": "1.00",
                                               "output_usd_per_mtok": "0"}
    # 200 two-byte characters may be 400 tokens: a 4-bytes-a-token estimate says ~115.
    body = orjson.dumps({"model": "text-embedding-3-small", "input": "é" * 200})

    async def post(gw: Gateway) -> int:
        headers = {"Authorization": f"Bearer {gw.key}", "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as http, http.post(
                gw.base_url + "/embeddings", data=body, headers=headers) as resp:
            return resp.status

    gw = await gateway_factory(raw, credit_nano=len(body) * TOKEN)  # the bound: its bytes
    assert await post(gw) == 200
    assert "max_tokens" not in mock_upstream.stats.last_body
    assert "max_completion_tokens" not in mock_upstream.stats.last_body
    gw2 = await gateway_factory(raw, credit_nano=400 * TOKEN)
    assert await post(gw2) == 402


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 0}, "n"), ({"n": "3"}, "n"), ({"n": True}, "n"), ({"n": 1.5}, "n"),
    ({"best_of": -1}, "best_of"), ({"best_of": None, "n": [2]}, "n"),
])
async def test_malformed_multipliers_and_limits_are_400s(
        gateway: Gateway, mock_upstream: MockServer, extra: dict[str, Any],
        param: str) -> None:
    body = {"model": "gpt-4o-mini", "prompt": "x", **extra}
    headers = {"Authorization": f"Bearer {gateway.key}"}
    async with aiohttp.ClientSession() as http, http.post(
            gateway.base_url + "/completions", json=body, headers=headers) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert mock_upstream.stats.requests == 0


@pytest.mark.parametrize("extra", [{"n": 10**12}, {"max_tokens": 100, "n": 2**62},
                                   {"best_of": 2**63 - 1}])
async def test_absurd_multipliers_are_refused_as_unaffordable(
        gateway: Gateway, mock_upstream: MockServer, extra: dict[str, Any]) -> None:
    body = {"model": "gpt-4o-mini", "prompt": "x", **extra}
    headers = {"Authorization": f"Bearer {gateway.key}"}
    async with aiohttp.ClientSession() as http, http.post(
            gateway.base_url + "/completions", json=body, headers=headers) as resp:
        assert resp.status == 402
        assert (await resp.json())["error"]["code"] == "insufficient_quota"
    assert mock_upstream.stats.requests == 0


async def _greedy(request: web.Request) -> web.Response:
    """An upstream that ignores max_tokens and reports 16,000 completion tokens."""
    await request.read()
    return web.json_response({
        "id": "x", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "..."}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 16_000, "total_tokens": 16_010}})


@contextlib.asynccontextmanager
async def upstream(handler: Callable[[web.Request], Awaitable[web.Response]]
                   ) -> AsyncIterator[str]:
    """A one-route upstream of the test's own (a real HTTP server); yields its base URL."""
    app = web.Application(client_max_size=8 << 20)
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def test_an_upstream_reporting_more_than_reserved_is_charged_the_reservation(
        tmp_path: Path, gateway_factory: GatewayFactory) -> None:
    async with upstream(_greedy) as url:
        raw = raw_config(tmp_path, {"greedy": url})
        raw["models"]["gpt-4o-mini"] = PER_TOKEN
        gw = await gateway_factory(raw, credit_nano=50 * TOKEN)
        async with sdk(gw) as client:
            for _ in range(3):
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                    max_tokens=10)
        # Each charged its 10 reserved tokens, not 16,000; counted, never negative.
        assert await totals(gw) == (50 * TOKEN, 30 * TOKEN, 20 * TOKEN)
        assert [r[0] for r in await usage_rows(gw)] == [10 * TOKEN] * 3
        assert gw.components.billing.overruns == 3
        assert await metric(gw, "flintproxy_usage_over_reservation_total") \
            == "flintproxy_usage_over_reservation_total 3.0"


async def _no_usage(request: web.Request) -> web.Response:
    """An upstream that reports no usage: the gateway falls back to its own estimate."""
    await request.read()
    return web.json_response({
        "id": "x", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "a cat"}}]})


async def test_an_estimate_above_the_bound_is_capped_without_blaming_the_upstream(
        tmp_path: Path, gateway_factory: GatewayFactory) -> None:
    # A 400 KB inline image: the 4-bytes-a-token estimate says 100,000 prompt tokens,
    # the bound says one media part (1,000) plus the text.
    payload = base64.b64encode(bytes(300_000)).decode()
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload}}
    async with upstream(_no_usage) as url:
        raw = raw_config(tmp_path, {"blind": url})
        raw["models"]["gpt-4o-mini"] = {"input_usd_per_mtok": "1.00",
                                        "output_usd_per_mtok": "0"}
        raw["billing"] = {"max_tokens_per_media_part": 1000}
        gw = await gateway_factory(raw, credit_nano=2000 * TOKEN)
        async with sdk(gw) as client:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": [part]}])
        _, charged, balance = await totals(gw)
        assert 1000 * TOKEN < charged < 1200 * TOKEN and balance > 0
        assert gw.components.billing.overruns == 0


def test_the_prompt_bound_counts_bytes_and_each_media_part_once() -> None:
    text = {"model": "m", "messages": [{"role": "user", "content": "€" * 1000}]}
    body = orjson.dumps(text)
    bound = measure("chat/completions", text, len(body))
    assert bound.prompt_tokens(1000) == len(body) >= 3000  # UTF-8 bytes, not chars / 4
    url = "data:image/png;base64," + "A" * 10_000
    image = {"model": "m", "n": 2, "max_tokens": 9, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "input_audio", "input_audio": {"data": "B" * 5000, "format": "wav"}}]}]}
    body = orjson.dumps(image)
    bound = measure("chat/completions", image, len(body))
    assert (bound.media_parts, bound.choices, bound.requested) == (2, 2, 9)
    assert bound.text_bytes == len(body) - len(url) - 5000 - len("wav")
    assert bound.prompt_tokens(1000) == bound.text_bytes + 2000


@pytest.mark.parametrize("body", [
    b'{"model":"m","messages":[]}', b'  \n{ "model" : "m" }\n', b'{"max_tokens":null,"model":"m"}',
    b'{"model":"m","max_tokens":900,"max_tokens":90000}',
])
def test_the_limit_written_into_a_body_is_the_only_change(body: bytes) -> None:
    data = orjson.loads(body)
    before = dict(data)
    bound = measure("chat/completions", data, len(body))
    names = bound.params or ("max_tokens",)
    sent = with_limit(data, body, (names, 77))
    assert orjson.loads(sent) == {**before, "max_tokens": 77} == data
    assert with_limit(data, body, None) is body


async def test_a_body_too_deep_to_rewrite_is_a_400_and_holds_nothing(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: GatewayFactory) -> None:
    # Parsed at 300 levels, but orjson encodes at most 255: the lowered limit cannot
    # be written back. A clear 400, and the reservation is released.
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["models"]["gpt-4o-mini"]["max_output_tokens"] = 100
    gateway = await gateway_factory(raw)
    deep = b"[" * 300 + b"]" * 300
    body = b'{"model":"gpt-4o-mini","prompt":"x","max_tokens":99999,"x":' + deep + b"}"
    headers = {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(gateway.base_url + "/completions", data=body,
                                 headers=headers) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert mock_upstream.stats.requests == 0
    balance, _, reserved = gateway.components.billing.snapshot(gateway.account_id)
    assert balance is not None and reserved == 0
