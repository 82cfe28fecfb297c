"""Across kinds: the anthropic SDK to an OpenAI-compatible upstream, and the openai SDK's
chat completions to an Anthropic upstream (relay.translate), with the mock on each side."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flintproxy.errors import BadRequest
from flintproxy.gate.billing import cost_nano
from flintproxy.relay.via_chat import MessagesViaChat
from flintproxy.relay.via_messages import ChatViaMessages
from flintproxy.tools.mock import MockSettings, expected_content
from tests.conftest import Gateway, MockServer, start_mock
from tests.relay.test_messages import CLAUDE, MESSAGES, TOOLS, anthropic_config, rows
from tests.support import LeakScanner

CHAT_TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "lookup", "description": "Look a thing up",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]


@pytest.fixture
async def recording() -> AsyncIterator[MockServer]:
    server = await start_mock(MockSettings(record=True))
    yield server
    await server.runner.cleanup()


@pytest.fixture
async def gw(tmp_path: Path, recording: MockServer, gateway_factory: Any) -> Gateway:
    """gpt-4o-mini on an OpenAI-compatible upstream, CLAUDE on an Anthropic one."""
    gateway: Gateway = await gateway_factory(anthropic_config(tmp_path, recording),
                                             {"CLAUDE_KEY": "sk-ant"})
    return gateway


def claude_sdk(gw: Gateway) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=gw.key, max_retries=0)


def openai_sdk(gw: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0)


def sent(mock: MockServer, back: int = 1) -> tuple[dict[str, str], dict[str, Any]]:
    """The headers and body of the upstream's ``back``-th last request."""
    last = mock.stats.received[-back]
    return {k.lower(): v for k, v in last.headers}, orjson.loads(last.body)


async def test_a_messages_client_reaches_an_openai_upstream(
        gw: Gateway, recording: MockServer) -> None:
    async with claude_sdk(gw) as client:
        msg = await client.messages.create(model="gpt-4o-mini", max_tokens=6,
                                           system="Be brief.", messages=MESSAGES)
        async with client.messages.stream(model="gpt-4o-mini", max_tokens=1000,
                                          messages=MESSAGES) as stream:
            kinds = [e.type async for e in stream]
            final = await stream.get_final_message()
    assert msg.content[0].type == "text" and msg.content[0].text == expected_content(6)
    assert msg.stop_reason == "max_tokens" and msg.model == "gpt-4o-mini"
    assert final.content[0].type == "text" and final.content[0].text == expected_content(20)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 20
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    headers, body = sent(recording, 2)
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Say hello"}]
    assert body["max_tokens"] == 6 and "anthropic-version" not in headers
    assert sent(recording)[1]["stream_options"] == {"include_usage": True}
    one, two = await rows(gw)
    price = gw.config.models["gpt-4o-mini"]
    for row, completion, usage in ((one, 6, msg.usage), (two, 20, final.usage)):
        assert (row["endpoint"], row["upstream"], row["completion_tokens"], row["outcome"],
                row["estimated"]) == ("messages", "local", completion, "ok", 0)
        assert row["prompt_tokens"] == usage.input_tokens
        assert row["cost_nano"] == cost_nano(price, row["prompt_tokens"], completion, 0)


async def test_a_messages_clients_tools_reach_an_openai_upstream_and_come_back(
        gw: Gateway, recording: MockServer) -> None:
    async with claude_sdk(gw) as client:
        msg = await client.messages.create(model="gpt-4o-mini", max_tokens=100,
                                           messages=MESSAGES, tools=TOOLS,
                                           tool_choice={"type": "any"})
        async with client.messages.stream(model="gpt-4o-mini", max_tokens=100,
                                          messages=MESSAGES, tools=TOOLS,
                                          tool_choice={"type": "tool", "name": "lookup"}
                                          ) as stream:
            final = await stream.get_final_message()
        body = sent(recording)[1]
        assert body["tools"][0]["function"]["name"] == "lookup"
        assert body["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
        # The tool's result goes back as a chat "tool" message.
        block = final.content[0]
        assert block.type == "tool_use"
        await client.messages.create(model="gpt-4o-mini", max_tokens=10, messages=[
            *MESSAGES, {"role": "assistant", "content": [block.model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id,
                                          "content": "found"}]}])
    body = sent(recording)[1]
    assert body["messages"][1]["tool_calls"][0]["id"] == block.id
    assert body["messages"][2] == {"role": "tool", "tool_call_id": block.id, "content": "found"}
    for message in (msg, final):
        use = message.content[0]
        assert use.type == "tool_use" and use.name == "lookup"
        assert use.input == {"query": expected_content(20)}
        assert message.stop_reason == "tool_use"


async def test_a_chat_client_reaches_an_anthropic_upstream(
        gw: Gateway, recording: MockServer) -> None:
    async with openai_sdk(gw) as client:
        resp = await client.chat.completions.create(
            model=CLAUDE, max_tokens=4, messages=[{"role": "system", "content": "Be brief."},
                                                  *MESSAGES])
        stream = await client.chat.completions.create(
            model=CLAUDE, messages=MESSAGES, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    assert resp.choices[0].message.content == expected_content(4)
    assert resp.choices[0].finish_reason == "length" and resp.model == CLAUDE
    headers, body = sent(recording, 2)
    assert body["system"] == "Be brief." and body["max_tokens"] == 4
    assert body["messages"] == [{"role": "user", "content": [{"type": "text",
                                                              "text": "Say hello"}]}]
    assert headers["x-api-key"] == "sk-ant" and headers["anthropic-version"] == "2023-06-01"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_content(20)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    one, two = await rows(gw)
    assert resp.usage is not None
    assert (one["endpoint"], one["upstream"], one["prompt_tokens"], one["completion_tokens"]
            ) == ("chat/completions", "claude", resp.usage.prompt_tokens, 4)
    assert (two["completion_tokens"], two["outcome"], two["estimated"]) == (20, "ok", 0)
    price = gw.config.models[CLAUDE]
    assert two["cost_nano"] == cost_nano(price, two["prompt_tokens"], 20, 0)


async def test_a_chat_clients_tool_calls_reach_an_anthropic_upstream_and_come_back(
        gw: Gateway, recording: MockServer) -> None:
    async with openai_sdk(gw) as client:
        resp = await client.chat.completions.create(model=CLAUDE, messages=MESSAGES,
                                                    tools=CHAT_TOOLS, tool_choice="required")
        stream = await client.chat.completions.create(
            model=CLAUDE, messages=MESSAGES, tools=CHAT_TOOLS, stream=True,
            tool_choice={"type": "function", "function": {"name": "lookup"}})
        chunks = [c async for c in stream]
        call = resp.choices[0].message.tool_calls[0]  # type: ignore[index]
        await client.chat.completions.create(model=CLAUDE, messages=[
            *MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function", "function": {
                    "name": "lookup", "arguments": call.function.arguments}}]},  # type: ignore[union-attr]
            {"role": "tool", "tool_call_id": call.id, "content": "found"}])
    body = sent(recording)[1]
    assert body["messages"][1]["content"][0]["type"] == "tool_use"
    assert body["messages"][2]["content"][0] == {"type": "tool_result",
                                                 "tool_use_id": call.id, "content": "found"}
    assert call.function.name == "lookup"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"query": expected_content(20)}  # type: ignore[union-attr]
    assert resp.choices[0].finish_reason == "tool_calls"
    pieces = [tc.function.arguments for c in chunks if c.choices
              for tc in c.choices[0].delta.tool_calls or () if tc.function]
    assert json.loads("".join(p or "" for p in pieces)) == {"query": expected_content(20)}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


async def test_errors_cross_formats_in_the_clients_shape(gw: Gateway) -> None:
    async with claude_sdk(gw) as client:
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model="gpt-4o-mini", max_tokens=10, messages=MESSAGES,
                                         extra_headers={"x-mock-fault": "http429"})
        assert limited.value.body["error"]["type"] == "rate_limit_error"
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model="gpt-4o-mini", max_tokens=10,
                                         messages="not a list")  # type: ignore[arg-type]
        with pytest.raises(anthropic.BadRequestError) as dropped:  # never silently lost
            await client.messages.create(model="gpt-4o-mini", max_tokens=10, messages=[
                {"role": "user", "content": [{"type": "document", "source": {
                    "type": "text", "media_type": "text/plain", "data": "a pdf"}}]}])
        assert "'document'" in dropped.value.message
    async with openai_sdk(gw) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=CLAUDE, messages=MESSAGES,
                                                 extra_headers={"x-mock-fault": "http429"})
        assert caught.value.type == "rate_limit_error"
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=CLAUDE, messages=MESSAGES, n=2)
        with pytest.raises(openai.BadRequestError) as dropped:
            await client.chat.completions.create(model=CLAUDE, messages=[
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {
                    "data": "AAAA", "format": "wav"}}]}])
        assert "'input_audio'" in dropped.value.message
        with pytest.raises(openai.BadRequestError) as unserved:
            await client.responses.create(model=CLAUDE, input="x")
        assert unserved.value.code == "unsupported_endpoint"


async def test_malformed_and_broken_upstream_streams_end_cleanly_in_the_clients_format(
        gw: Gateway) -> None:
    auth = {"Authorization": f"Bearer {gw.key}"}
    async with aiohttp.ClientSession() as http:
        for fault in ("malformed", "reset:3"):
            async with http.post(gw.base_url + "/messages", headers={**auth,
                                 "x-mock-fault": fault},
                                 json={"model": "gpt-4o-mini", "max_tokens": 50,
                                       "stream": True, "messages": MESSAGES}) as r:
                text = await r.text()
            assert "event: error" in text or "event: message_stop" in text, fault
            async with http.post(gw.base_url + "/chat/completions", headers={**auth,
                                 "x-mock-fault": fault},
                                 json={"model": CLAUDE, "stream": True,
                                       "messages": MESSAGES}) as r:
                text = await r.text()
            assert '"error"' in text or "[DONE]" in text, fault
    async with claude_sdk(gw) as client:
        msg = await client.messages.create(model="gpt-4o-mini", max_tokens=3,
                                           messages=MESSAGES)
    assert msg.content[0].type == "text"


async def test_no_content_crosses_to_disk_in_either_direction(
        tmp_path: Path, gw: Gateway) -> None:
    scan = LeakScanner()
    marker = "secret-marker-7f3a9"
    scan.add(marker, gw.key)
    async with claude_sdk(gw) as client:
        await client.messages.create(model="gpt-4o-mini", max_tokens=5,
                                     messages=[{"role": "user", "content": marker}])
        await client.messages.create(model=CLAUDE, max_tokens=5,
                                     messages=[{"role": "user", "content": marker}])
    async with openai_sdk(gw) as client:
        await client.chat.completions.create(model=CLAUDE,
                                             messages=[{"role": "user", "content": marker}])
        await client.responses.create(model="gpt-4o-mini", input=marker)
    assert len(await rows(gw)) == 4
    scan.assert_clean(data_dirs=[tmp_path])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)
    | st.sampled_from(["text", "tool_use", "image", "tool_result", "message_start",
                       "content_block_start", "content_block_delta", "message_delta",
                       "message_stop", "text_delta", "input_json_delta", "assistant", "user",
                       "tool", "system", "function", "error", "index"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "index", "delta", "content", "content_block", "choices",
                         "tool_calls", "function", "arguments", "name", "id", "role",
                         "messages", "usage", "message", "text", "partial_json", "source",
                         "finish_reason", "stop_reason", "error", "tools", "tool_choice",
                         "system", "input", "n", "stop", "url", "max_tokens"]),
        inner, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(events=st.lists(JSON, max_size=6))
def test_any_json_from_either_side_is_translated_or_refused_never_raised(
        events: list[Any]) -> None:
    for conv in (MessagesViaChat("m"), ChatViaMessages("m", wants_usage=True)):
        for event in events:
            with contextlib.suppress(BadRequest):  # a client's body: a 400, nothing else
                conv.request(event if isinstance(event, dict) else {"messages": event}, "m")
            body = orjson.dumps(event)
            conv.response(body)
            conv.error(400, body)
        block = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
        assert (conv.stream(block) + conv.finish()).endswith(b"\n\n")


def test_translations_survive_hostile_upstream_events() -> None:
    for conv in (MessagesViaChat("m"), ChatViaMessages("m", wants_usage=True)):
        out = conv.stream(b"data: {not json\n\ndata: [1,2]\n\ndata: \"x\"\n\n"
                          b'data: {"choices": "no", "type": 5, "delta": []}\n\n'
                          b'data: {"choices": [{"delta": {"tool_calls": [7, {"index": "x"}]}}]}'
                          b"\n\n" b'data: {"type": "content_block_delta", "delta": 3}\n\n')
        out += conv.finish()
        assert out.endswith(b"\n\n")
        assert conv.response(b"[]") is None and conv.response(b"{bad") is None
        assert conv.error(500, b"\x00garbage")
