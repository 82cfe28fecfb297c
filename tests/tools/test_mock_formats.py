"""The mock's Anthropic Messages and OpenAI Responses APIs, driven directly by the
official SDKs and by raw HTTP: the published event order, limits, usage and faults."""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from flintproxy.tools.mock import MockSettings, expected_content
from tests.conftest import MockServer, start_mock

CLAUDE = "claude-sonnet-4-5"
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


def event_names(text: str) -> list[str]:
    return [line[7:] for line in text.splitlines() if line.startswith("event: ")]


async def test_the_messages_stream_follows_anthropics_published_event_order(
        mock_upstream: MockServer) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            mock_upstream.base_url + "/messages", headers={"x-mock-chunks": "3"},
            json={"model": CLAUDE, "max_tokens": 10, "stream": True,
                  "messages": MESSAGES}) as resp:
        text = await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert event_names(text) == [
        "message_start", "content_block_start", "ping", "content_block_delta",
        "content_block_delta", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop"]
    async with anthropic.AsyncAnthropic(base_url=mock_upstream.url, api_key="x",
                                        max_retries=0) as client:
        msg = await client.messages.create(model=CLAUDE, max_tokens=4, messages=MESSAGES,
                                           extra_headers={"x-mock-cache": "7,9"})
        counted = await client.messages.count_tokens(model=CLAUDE, messages=MESSAGES)
    assert msg.content[0].type == "text" and msg.content[0].text == expected_content(4)
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 4
    assert (msg.usage.cache_creation_input_tokens, msg.usage.cache_read_input_tokens) == (7, 9)
    assert counted.input_tokens == msg.usage.input_tokens


async def test_the_responses_stream_follows_openais_published_event_order(
        mock_upstream: MockServer) -> None:
    async with openai.AsyncOpenAI(base_url=mock_upstream.base_url, api_key="x",
                                  max_retries=0) as client:
        stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True,
                                               extra_headers={"x-mock-chunks": "2"})
        kinds = [e.type async for e in stream]
        resp = await client.responses.create(model="gpt-4o-mini", input="a longer input",
                                             max_output_tokens=3,
                                             extra_headers={"x-mock-cache": "0,2"})
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta",
                     "response.output_text.delta", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert resp.output_text == expected_content(3) and resp.status == "incomplete"
    assert resp.usage is not None and resp.usage.input_tokens_details.cached_tokens == 2


@pytest.mark.parametrize(("path", "body"), [
    ("/messages", {"model": CLAUDE, "max_tokens": 5, "messages": MESSAGES}),
    ("/responses", {"model": "gpt-4o-mini", "input": "hi"}),
])
async def test_the_new_formats_have_the_mocks_fault_modes(
        mock_upstream: MockServer, path: str, body: dict[str, Any]) -> None:
    url = mock_upstream.base_url + path
    anthropic_shape = path == "/messages"
    async with aiohttp.ClientSession() as http:
        for fault, status in (("http500", 500), ("http429", 429)):
            async with http.post(url, json=body, headers={"x-mock-fault": fault}) as resp:
                error = await resp.json()
                assert resp.status == status
                assert (error.get("type") == "error") is anthropic_shape and error["error"]
        async with http.post(url, json=body, headers={"x-mock-fault": "malformed"}) as resp:
            assert resp.status == 200
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(await resp.read())
        async with http.post(url, json={**body, "stream": True},
                             headers={"x-mock-fault": "reset:2"}) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        async with http.post(url, json={**body, "stream": True},
                             headers={"x-mock-fault": "huge_event:70000"}) as resp:
            assert max(len(e) for e in (await resp.read()).split(b"\n\n")) >= 69_000
        async with http.post(url, json=body, headers={"x-mock-fault": "bogus"}) as resp:
            assert resp.status == 400
    assert mock_upstream.stats.requests == 6


async def test_the_mock_records_what_it_received_when_asked() -> None:
    server = await start_mock(MockSettings(record=True))
    try:
        async with aiohttp.ClientSession() as http, http.post(
                server.base_url + "/responses",
                json={"model": "gpt-4o-mini", "input": "x", "store": False}) as resp:
            assert resp.status == 200
        assert orjson.loads(server.stats.received[-1].body)["store"] is False
    finally:
        await server.runner.cleanup()


async def test_the_mock_checks_what_anthropic_requires(mock_upstream: MockServer) -> None:
    async with aiohttp.ClientSession() as http:
        for body in ({"model": CLAUDE, "messages": MESSAGES},  # no max_tokens
                     {"model": CLAUDE, "max_tokens": 5},  # no messages
                     {"model": CLAUDE, "max_tokens": True, "messages": MESSAGES}):
            async with http.post(mock_upstream.base_url + "/messages", json=body) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["type"] == "invalid_request_error"
