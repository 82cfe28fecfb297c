"""POST /v1/messages and /v1/messages/count_tokens: the official anthropic SDK through the
gateway to the mock's Anthropic API (an upstream of kind "anthropic")."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest

from flintproxy.gate.billing import cost_nano
from flintproxy.tools.mock import MockSettings, expected_content
from tests.conftest import Gateway, MockServer, raw_config, start_mock

CLAUDE = "claude-sonnet-4-5"
UPSTREAM_KEY = "sk-ant-upstream-secret"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
TOOLS: list[Any] = [{"name": "lookup", "description": "Look a thing up",
                     "input_schema": {"type": "object",
                                      "properties": {"query": {"type": "string"}}}}]


@pytest.fixture
async def recording() -> AsyncIterator[MockServer]:
    server = await start_mock(MockSettings(record=True))
    yield server
    await server.runner.cleanup()


def anthropic_config(tmp_path: Path, mock: MockServer) -> dict[str, Any]:
    raw = raw_config(tmp_path, {"local": mock.base_url})
    raw["upstreams"].append({"name": "claude", "kind": "anthropic", "base_url": mock.base_url,
                             "models": [CLAUDE], "api_key_env": "CLAUDE_KEY",
                             "forward_headers": ["x-mock-*"]})
    raw["models"][CLAUDE] = {"input_usd_per_mtok": "3.00", "output_usd_per_mtok": "15.00",
                             "cached_input_usd_per_mtok": "0.30",
                             "cache_write_usd_per_mtok": "3.75"}
    return raw


@pytest.fixture
async def gw(tmp_path: Path, recording: MockServer, gateway_factory: Any) -> Gateway:
    gateway: Gateway = await gateway_factory(anthropic_config(tmp_path, recording),
                                             {"CLAUDE_KEY": UPSTREAM_KEY})
    return gateway


def sdk(gw: Gateway, key: str | None = None, **headers: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=key or gw.key, max_retries=0,
                                    default_headers=headers or None)


async def rows(gw: Gateway) -> list[dict[str, Any]]:
    assert await gw.components.usage.sync(10)
    names = [
        "endpoint", "upstream", "prompt_tokens", "completion_tokens", "cached_tokens",
        "cost_nano", "outcome", "estimated",
    ]
    found = await gw.components.usage_db.fetch(
        f"SELECT {', '.join(names)} FROM usage WHERE account_id = ? ORDER BY id",
        gw.account_id)
    return [dict(zip(names, r, strict=True)) for r in found]


def received(mock: MockServer) -> tuple[dict[str, str], dict[str, Any]]:
    last = mock.stats.received[-1]
    return {k.lower(): v for k, v in last.headers}, orjson.loads(last.body)


async def test_messages_create_relays_the_upstreams_message_and_bills_cache_tokens_exactly(
        gw: Gateway, recording: MockServer) -> None:
    async with sdk(gw, **{"x-mock-cache": "40,25"}) as client:
        msg = await client.messages.create(model=CLAUDE, max_tokens=1000, messages=MESSAGES)
    assert msg.content[0].type == "text" and msg.content[0].text == expected_content(20)
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.cache_creation_input_tokens, msg.usage.cache_read_input_tokens) == (40, 25)
    prompt = msg.usage.input_tokens + 40 + 25
    (row,) = await rows(gw)
    price = gw.config.models[CLAUDE]
    expected = cost_nano(price, prompt, 20, 25, 40)
    # By hand: input at $3, cache writes at $3.75, reads at $0.30, output at $15 per Mtok.
    assert expected == -(-(msg.usage.input_tokens * 3_000_000_000 + 40 * 3_750_000_000
                           + 25 * 300_000_000 + 20 * 15_000_000_000) // 1_000_000)
    assert row == {"endpoint": "messages", "upstream": "claude", "prompt_tokens": prompt,
                   "completion_tokens": 20, "cached_tokens": 25, "cost_nano": expected,
                   "outcome": "ok", "estimated": 0}
    headers, body = received(recording)
    assert headers["x-api-key"] == UPSTREAM_KEY and gw.key not in str(headers)
    assert headers["anthropic-version"]  # the SDK's own, passed through
    assert "authorization" not in headers
    assert body["max_tokens"] == 1000


async def test_messages_stream_yields_the_upstreams_events_in_order_and_bills_them(
        gw: Gateway) -> None:
    async with sdk(gw) as client:
        async with client.messages.stream(model=CLAUDE, max_tokens=5,
                                          messages=MESSAGES) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == expected_content(5)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds
    (row,) = await rows(gw)
    assert (row["endpoint"], row["completion_tokens"], row["outcome"], row["estimated"]) == (
        "messages", 5, "ok", 0)
    assert row["prompt_tokens"] == final.usage.input_tokens


async def test_tool_use_is_relayed_with_its_streamed_arguments(gw: Gateway) -> None:
    async with sdk(gw) as client:
        msg = await client.messages.create(model=CLAUDE, max_tokens=100, messages=MESSAGES,
                                           tools=TOOLS, tool_choice={"type": "any"})
        async with client.messages.stream(model=CLAUDE, max_tokens=100, messages=MESSAGES,
                                          tools=TOOLS,
                                          tool_choice={"type": "tool", "name": "lookup"}
                                          ) as stream:
            final = await stream.get_final_message()
    for message in (msg, final):
        block = message.content[0]
        assert block.type == "tool_use" and block.name == "lookup"
        assert block.input == {"query": expected_content(20)}
        assert message.stop_reason == "tool_use"


async def test_count_tokens_is_relayed_and_not_billed(gw: Gateway) -> None:
    async with sdk(gw) as client:
        counted = await client.messages.count_tokens(model=CLAUDE, messages=MESSAGES)
    assert counted.input_tokens > 0
    (row,) = await rows(gw)
    assert (row["endpoint"], row["cost_nano"], row["prompt_tokens"]) == (
        "messages/count_tokens", 0, 0)


async def test_the_anthropic_sdk_lists_and_retrieves_models_in_its_own_shape(
        gw: Gateway) -> None:
    async with sdk(gw) as client:
        listed = await client.models.list()
        one = await client.models.retrieve(CLAUDE)
        with pytest.raises(anthropic.NotFoundError):
            await client.models.retrieve("no-such-model")
    names = [m.id for m in listed.data]
    assert CLAUDE in names and all(m.type == "model" for m in listed.data)
    assert (listed.has_more, listed.first_id, listed.last_id) == (False, names[0], names[-1])
    assert (one.id, one.type, one.display_name) == (CLAUDE, "model", CLAUDE)
    # Without anthropic-version the same routes answer in OpenAI's shape.
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {gw.key}"}) as http:
        async with http.get(f"{gw.url}/v1/models") as r:
            assert (await r.json())["object"] == "list"


async def test_errors_come_in_anthropics_shape_and_raise_the_sdks_types(
        gw: Gateway, tmp_path: Path, recording: MockServer, gateway_factory: Any) -> None:
    async with sdk(gw, key="sk-wrong") as client:
        with pytest.raises(anthropic.AuthenticationError) as auth:
            await client.messages.create(model=CLAUDE, max_tokens=10, messages=MESSAGES)
    assert auth.value.body == {"type": "error", "error": {
        "type": "authentication_error", "message": auth.value.body["error"]["message"]}}
    async with sdk(gw) as client:
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(model="no-such-model", max_tokens=10,
                                         messages=MESSAGES)
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model=CLAUDE, max_tokens=-1, messages=MESSAGES)
        with pytest.raises(anthropic.RateLimitError):  # the upstream's 429, passed through
            await client.messages.create(model=CLAUDE, max_tokens=10, messages=MESSAGES,
                                         extra_headers={"x-mock-fault": "http429"})
        with pytest.raises(anthropic.InternalServerError) as caught:  # its 529: a 502
            await client.messages.create(model=CLAUDE, max_tokens=10, messages=MESSAGES,
                                         extra_headers={"x-mock-fault": "http529"})
        assert caught.value.status_code == 502
    raw = anthropic_config(tmp_path, recording)
    raw["limits"] = {"default_rpm": 1}
    limited = await gateway_factory(raw, {"CLAUDE_KEY": UPSTREAM_KEY})
    async with sdk(limited) as client:
        await client.messages.count_tokens(model=CLAUDE, messages=MESSAGES)
        with pytest.raises(anthropic.RateLimitError) as ours:  # count_tokens counts
            await client.messages.create(model=CLAUDE, max_tokens=10, messages=MESSAGES)
    assert ours.value.body["error"]["type"] == "rate_limit_error"


async def test_bearer_auth_works_and_x_api_key_never_reaches_the_upstream(
        gw: Gateway, recording: MockServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.base_url + "/messages",
                             headers={"Authorization": f"Bearer {gw.key}"},
                             json={"model": CLAUDE, "max_tokens": 3, "messages": MESSAGES}) as r:
            assert r.status == 200
            assert (await r.json())["content"][0]["text"] == expected_content(3)
        headers, _ = received(recording)
        assert headers["anthropic-version"] == "2023-06-01"  # ours, the client sent none
        assert headers["x-api-key"] == UPSTREAM_KEY
        async with http.post(gw.base_url + "/messages", headers={"x-api-key": gw.key},
                             json={"model": "gpt-4o-mini", "max_tokens": 3,
                                   "messages": MESSAGES}) as r:
            assert r.status == 200  # to the OpenAI upstream, translated
        headers, _ = received(recording)
        assert gw.key not in str(headers)
        assert "x-api-key" not in headers and "authorization" not in headers


async def test_a_client_leaving_a_messages_stream_is_billed_for_what_was_relayed(
        gw: Gateway, recording: MockServer) -> None:
    headers = {"x-api-key": gw.key, "anthropic-version": "2023-06-01", "x-mock-chunks": "1000",
               "x-mock-delay-ms": "5"}
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.base_url + "/messages", headers=headers,
                             json={"model": CLAUDE, "max_tokens": 4000, "stream": True,
                                   "messages": MESSAGES}) as r:
            seen = 0
            async for line in r.content:
                seen += line.startswith(b"data:")
                if seen >= 30:
                    break
    for _ in range(100):
        if recording.stats.disconnects:
            break
        await asyncio.sleep(0.05)
    (row,) = await rows(gw)
    assert row["outcome"] == "client_disconnect" and row["estimated"] == 1
    assert row["prompt_tokens"] > 0  # from message_start: the upstream's own count
    assert 26 <= row["completion_tokens"] < 1000


async def test_hostile_bodies_and_upstream_events_on_the_messages_routes(
        gw: Gateway) -> None:
    auth = {"x-api-key": gw.key, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for path in ("/messages", "/messages/count_tokens"):
            for body, status in ((b'{"model": "' + CLAUDE.encode() + b'", "max_tokens": "9"}',
                                  400), (b'[1]', 400), (b'{"model": 5}', 400), (b'{', 400),
                                 (b'{"model": "x", "m": "' + b"a" * (5 << 20) + b'"}', 413)):
                async with http.post(gw.base_url + path, data=io.BytesIO(body),
                                     headers=auth) as r:
                    assert r.status == status, (path, body[:60])
                    error = await r.json()
                    assert error["type"] == "error" and error["error"]["message"]
        for fault in ("malformed", "reset:3"):
            async with http.post(gw.base_url + "/messages", headers={**auth,
                                 "x-mock-fault": fault},
                                 json={"model": CLAUDE, "max_tokens": 50, "stream": True,
                                       "messages": MESSAGES}) as r:
                await r.read()
            async with http.post(gw.base_url + "/messages", headers={**auth,
                                 "x-mock-fault": fault},
                                 json={"model": CLAUDE, "max_tokens": 50,
                                       "messages": MESSAGES}) as r:
                assert r.status == 502
                assert (await r.json())["error"]["type"] == "api_error"
    async with sdk(gw) as client:
        msg = await client.messages.create(model=CLAUDE, max_tokens=10, messages=MESSAGES)
    assert msg.content[0].type == "text"


async def test_metrics_count_requests_by_endpoint(gw: Gateway) -> None:
    async with sdk(gw) as client:
        await client.messages.create(model=CLAUDE, max_tokens=3, messages=MESSAGES)
        await client.messages.count_tokens(model=CLAUDE, messages=MESSAGES)
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(model="nope", max_tokens=3, messages=MESSAGES)
    async with aiohttp.ClientSession() as http, \
            http.get(gw.console_url + "/metrics") as resp:
        text = await resp.text()
    for line in ('flintproxy_endpoint_requests_total{endpoint="messages",status="2xx"} 1.0',
                 'flintproxy_endpoint_requests_total{endpoint="messages",status="4xx"} 1.0',
                 'flintproxy_endpoint_requests_total{endpoint="messages/count_tokens",'
                 'status="2xx"} 1.0'):
        assert line in text.splitlines(), line


async def test_an_unreachable_upstream_fails_over_before_the_first_byte_even_across_kinds(
        tmp_path: Path, recording: MockServer, gateway_factory: Any) -> None:
    raw = anthropic_config(tmp_path, recording)
    dead = "http://127.0.0.1:9/v1"  # discard: nothing listens
    raw["upstreams"][1].update(base_url=dead, priority=0)
    raw["upstreams"].append({"name": "claude-2", "kind": "anthropic", "priority": 1,
                             "base_url": recording.base_url, "models": [CLAUDE]})
    raw["upstreams"].append({"name": "openai-3", "priority": 2, "base_url": recording.base_url,
                             "models": [CLAUDE]})
    gw = await gateway_factory(raw)
    async with sdk(gw) as client:
        async with client.messages.stream(model=CLAUDE, max_tokens=4,
                                          messages=MESSAGES) as stream:
            final = await stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == expected_content(4)
    raw["upstreams"][2]["base_url"] = dead  # both Anthropic upstreams down: the chat one
    gw = await gateway_factory(raw)
    async with sdk(gw) as client:
        msg = await client.messages.create(model=CLAUDE, max_tokens=4, messages=MESSAGES)
    assert msg.content[0].type == "text" and msg.content[0].text == expected_content(4)
    assert [r["upstream"] for r in await rows(gw)] == ["openai-3"]


async def test_a_slow_first_token_gets_heartbeats_and_an_oversized_event_ends_the_stream(
        tmp_path: Path, recording: MockServer, gateway_factory: Any) -> None:
    raw = anthropic_config(tmp_path, recording)
    raw["server"].update(heartbeat_interval_s=0.05, max_sse_event_bytes=65536)
    gw = await gateway_factory(raw, {"CLAUDE_KEY": UPSTREAM_KEY})
    async with sdk(gw, **{"x-mock-first-delay-ms": "300"}) as client:
        async with client.messages.stream(model=CLAUDE, max_tokens=5,
                                          messages=MESSAGES) as stream:
            final = await stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == expected_content(5)
    async with aiohttp.ClientSession() as http, http.post(
            gw.base_url + "/messages", json={"model": CLAUDE, "max_tokens": 2, "stream": True,
                                             "messages": MESSAGES},
            headers={"x-api-key": gw.key, "x-mock-first-delay-ms": "300"}) as r:
        raw_stream = await r.text()
    assert raw_stream.startswith(": keep-alive\n\n") and "event: message_stop" in raw_stream
    headers = {"x-api-key": gw.key, "x-mock-fault": "huge_event:200000"}
    async with aiohttp.ClientSession() as http:
        for path, body in (("/messages", {"model": CLAUDE, "max_tokens": 5, "stream": True,
                                          "messages": MESSAGES}),
                           ("/responses", {"model": "gpt-4o-mini", "input": "x",
                                           "stream": True})):
            async with http.post(gw.base_url + path, headers=headers, json=body) as r:
                text = await r.text()
            assert r.status in (200, 502) and len(text) < 100_000, path
            assert "error" in text, path
    assert [r["outcome"] for r in (await rows(gw))[2:]] == ["upstream_error"] * 2
