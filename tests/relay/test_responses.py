"""POST /v1/responses: the openai SDK's ``responses.create`` through the gateway to the
mock's Responses API, billed from ``response.completed``, stored nowhere."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from flintproxy.gate.billing import cost_nano
from flintproxy.tools.mock import MockSettings, expected_content
from tests.conftest import Gateway, MockServer, raw_config, start_mock


@pytest.fixture
async def recording() -> AsyncIterator[MockServer]:
    server = await start_mock(MockSettings(record=True))
    yield server
    await server.runner.cleanup()


async def start(tmp_path: Path, mock: MockServer, factory: Any, **model: Any) -> Gateway:
    raw = raw_config(tmp_path, {"local": mock.base_url})
    raw["models"]["gpt-4o-mini"].update(cached_input_usd_per_mtok="0.075", **model)
    gw: Gateway = await factory(raw)
    return gw


def sdk(gw: Gateway, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0,
                              default_headers=headers or None)


async def rows(gw: Gateway) -> list[dict[str, Any]]:
    assert await gw.components.usage.sync(10)
    names = [
        "endpoint", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_nano",
        "outcome", "estimated",
    ]
    found = await gw.components.usage_db.fetch(
        f"SELECT {', '.join(names)} FROM usage WHERE account_id = ? ORDER BY id",
        gw.account_id)
    return [dict(zip(names, r, strict=True)) for r in found]


def sent(mock: MockServer) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(mock.stats.received[-1].body)
    return body


async def test_responses_create_returns_the_upstreams_text_and_bills_its_usage_exactly(
        tmp_path: Path, recording: MockServer, gateway_factory: Any) -> None:
    gw = await start(tmp_path, recording, gateway_factory)
    async with sdk(gw, **{"x-mock-cache": "0,3"}) as client:
        resp = await client.responses.create(model="gpt-4o-mini", input="Say hello, please")
    assert resp.output_text == expected_content(20)
    assert resp.usage is not None and resp.usage.output_tokens == 20
    prompt = resp.usage.input_tokens
    (row,) = await rows(gw)
    price = gw.config.models["gpt-4o-mini"]
    assert row == {"endpoint": "responses", "prompt_tokens": prompt, "completion_tokens": 20,
                   "cached_tokens": 3, "cost_nano": cost_nano(price, prompt, 20, 3),
                   "outcome": "ok", "estimated": 0}
    body = sent(recording)
    assert body["store"] is False, "the provider must be told not to store it"
    assert body["max_output_tokens"] == gw.config.billing.default_max_tokens


async def test_a_streamed_response_is_relayed_event_for_event_and_billed_from_completed(
        tmp_path: Path, recording: MockServer, gateway_factory: Any) -> None:
    gw = await start(tmp_path, recording, gateway_factory)
    async with sdk(gw) as client:
        stream = await client.responses.create(model="gpt-4o-mini", input="Hi",
                                               max_output_tokens=7, stream=True)
        events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-1] == "response.incomplete"  # the mock honours max_output_tokens
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == expected_content(7)
    (row,) = await rows(gw)
    assert (row["endpoint"], row["completion_tokens"], row["outcome"], row["estimated"]) == (
        "responses", 7, "ok", 0)
    assert sent(recording)["store"] is False


async def test_stored_state_is_refused_with_a_400_that_says_why(
        tmp_path: Path, recording: MockServer, gateway_factory: Any) -> None:
    gw = await start(tmp_path, recording, gateway_factory)
    async with sdk(gw) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(model="gpt-4o-mini", input="more",
                                          previous_response_id="resp_123")
        assert caught.value.code == "provider_storage_disabled"
        assert "ephemeral" in caught.value.message
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.retrieve("resp_123")
        assert "store: false" in caught.value.message
        # The client's own store: true is overridden, as for chat's store parameter.
        await client.responses.create(model="gpt-4o-mini", input="x", store=True)
        assert sent(recording)["store"] is False
        await client.chat.completions.create(model="gpt-4o-mini", store=True,
                                             messages=[{"role": "user", "content": "x"}])
        assert sent(recording)["store"] is False
    assert len(recording.stats.received) == 2, "refused requests never reach the upstream"


async def test_an_operator_may_allow_provider_storage_per_model(
        tmp_path: Path, recording: MockServer, gateway_factory: Any) -> None:
    gw = await start(tmp_path, recording, gateway_factory, allow_provider_storage=True)
    async with sdk(gw) as client:
        await client.responses.create(model="gpt-4o-mini", input="x", store=True,
                                      previous_response_id="resp_1")
        assert sent(recording)["store"] is True
        assert sent(recording)["previous_response_id"] == "resp_1"
        await client.responses.create(model="gpt-4o", input="x")
        assert sent(recording)["store"] is False  # another model keeps the default


async def test_a_client_leaving_mid_stream_is_billed_for_what_was_relayed(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any) -> None:
    gw = await start(tmp_path, mock_upstream, gateway_factory)
    headers = {"Authorization": f"Bearer {gw.key}", "x-mock-chunks": "1000",
               "x-mock-delay-ms": "5"}
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.base_url + "/responses", headers=headers,
                             json={"model": "gpt-4o-mini", "input": "hi", "stream": True}) as r:
            seen = 0
            async for line in r.content:
                seen += line.startswith(b"data:")
                if seen >= 30:
                    break
    for _ in range(100):
        if mock_upstream.stats.disconnects:
            break
        await asyncio.sleep(0.05)
    (row,) = await rows(gw)
    assert row["outcome"] == "client_disconnect" and row["estimated"] == 1
    assert 26 <= row["completion_tokens"] < 1000
    assert row["cost_nano"] > 0


async def test_hostile_bodies_and_upstream_events_on_the_responses_route(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any) -> None:
    gw = await start(tmp_path, mock_upstream, gateway_factory)
    auth = {"Authorization": f"Bearer {gw.key}"}
    async with aiohttp.ClientSession() as http:
        for body, status in ((b'{"model": "gpt-4o-mini", "input": "x", "max_output_tokens": "9"}',
                              400),
                             (b'{"model": "gpt-4o-mini", "input": "x", "stream": "yes"}', 400),
                             (b'[1, 2]', 400), (b'{"model": 5}', 400), (b'{"input": "x"', 400),
                             (b'{"model": "gpt-4o-mini", "input": "' + b"a" * (5 << 20) + b'"}',
                              413)):
            async with http.post(gw.base_url + "/responses", data=io.BytesIO(body),
                                 headers={**auth, "Content-Type": "application/json"}) as r:
                assert r.status == status, body[:80]
                assert "error" in await r.json()
        # A stream whose upstream sends garbage, or resets, ends and the gateway serves on.
        for fault in ("malformed", "reset:3"):
            async with http.post(gw.base_url + "/responses",
                                 json={"model": "gpt-4o-mini", "input": "x", "stream": True},
                                 headers={**auth, "x-mock-fault": fault}) as r:
                await r.read()
        async with http.post(gw.base_url + "/responses", headers={**auth,
                             "x-mock-fault": "malformed"},
                             json={"model": "gpt-4o-mini", "input": "x"}) as r:
            assert r.status == 502
    async with sdk(gw) as client:
        resp = await client.responses.create(model="gpt-4o-mini", input="still here")
    assert resp.output_text == expected_content(20)


async def test_max_output_tokens_is_lowered_to_what_the_balance_affords(
        tmp_path: Path, recording: MockServer, gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": recording.base_url})
    gw: Gateway = await gateway_factory(raw, credit_nano=12_000)
    async with sdk(gw) as client:
        resp = await client.responses.create(model="gpt-4o-mini", input="Hi",
                                             max_output_tokens=500)
    granted = sent(recording)["max_output_tokens"]
    assert 0 < granted < 20 and resp.status == "incomplete"
    assert resp.usage is not None and resp.usage.output_tokens == granted
    (row,) = await rows(gw)
    assert 0 < row["cost_nano"] <= 12_000
