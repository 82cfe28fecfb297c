"""The mock upstream, driven over real loopback sockets by the official openai SDK."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import struct
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from flintproxy.tools.mock import (
    IDLE_COLLECT_S,
    MOCK_STATS,
    MockSettings,
    MockStats,
    _collect_when_idle,
    create_mock_app,
    embedding_vector,
    expected_content,
    prompt_tokens_for,
    run_mock,
)

MESSAGES: list[Any] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "say something deterministic please"},
]


@dataclass
class Mock:
    url: str  # http://127.0.0.1:PORT
    stats: MockStats

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, **kw: Any) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.base_url, api_key="x", max_retries=0, **kw)

    async def until(self, pred: Callable[[MockStats], bool], within: float = 2.0) -> None:
        deadline = time.monotonic() + within
        while not pred(self.stats):
            assert time.monotonic() < deadline, self.stats.snapshot()
            await asyncio.sleep(0.01)


Start = Callable[..., Awaitable[Mock]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def _start(
        settings: MockSettings | None = None, *, handler_cancellation: bool = True
    ) -> Mock:
        app = create_mock_app(settings or MockSettings())
        runner = web.AppRunner(
            app, handler_cancellation=handler_cancellation, access_log=None, shutdown_timeout=0.1
        )
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        return Mock(f"http://127.0.0.1:{port}", app[MOCK_STATS])

    yield _start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def mock(start: Start) -> Mock:
    return await start()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sse_events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[6:] for e in events]


async def test_expected_content() -> None:
    assert expected_content(3) == "tok0 tok1 tok2 "
    assert expected_content(0) == ""


async def test_chat_non_stream(mock: Mock) -> None:
    async with mock.client() as client:
        resp = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert resp.id.startswith("chatcmpl-mock-")
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-4o"
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_content(20)
    assert choice.finish_reason == "stop"
    assert resp.usage is not None
    prompt = prompt_tokens_for({"messages": MESSAGES})
    assert prompt == len("be brief") // 4 + 1 + len(MESSAGES[1]["content"]) // 4 + 1
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt, 20)
    assert resp.usage.total_tokens == prompt + 20
    assert resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    assert resp.usage.completion_tokens_details is not None
    assert resp.usage.completion_tokens_details.reasoning_tokens == 0
    assert mock.stats.requests == 1
    assert mock.stats.last_body["messages"] == MESSAGES
    assert mock.stats.last_headers["authorization"] == "Bearer x"


@pytest.mark.parametrize("include_usage", [False, True])
async def test_chat_stream(mock: Mock, include_usage: bool) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with mock.client() as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-mock-chunks": "7"},
            **extra,
        )
        chunks = [chunk async for chunk in stream]
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert with_choices[0].choices[0].delta.content == ""
    assert with_choices[0].choices[0].finish_reason is None
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == expected_content(7)
    assert len(with_choices) == 1 + 7 + 1
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert all(c.model == "gpt-4o-mini" and c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    if include_usage:
        assert all(c.usage is None for c in with_choices)
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None
        assert last.usage.completion_tokens == 7
        assert last.usage.prompt_tokens == prompt_tokens_for({"messages": MESSAGES})
    else:
        assert len(chunks) == len(with_choices)
        assert all(c.usage is None for c in chunks)
    await mock.until(lambda s: s.completed_streams == 1 and s.active_streams == 0)


async def test_stream_events_are_exact_sse(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    async with http.post(f"{mock.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = sse_events(await resp.read())
    assert events[-1] == b"[DONE]"
    assert len(events) == 1 + 20 + 1 + 1
    parsed = [orjson.loads(e) for e in events[:-1]]
    assert parsed[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all("usage" not in p for p in parsed)


async def test_completions(mock: Mock) -> None:
    async with mock.client() as client:
        resp = await client.completions.create(model="gpt-4o-mini", prompt="hello there")
        stream = await client.completions.create(
            model="gpt-4o-mini",
            prompt="hello there",
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-mock-chunks": "4"},
        )
        chunks = [chunk async for chunk in stream]
    assert resp.id.startswith("cmpl-mock-") and resp.object == "text_completion"
    assert resp.choices[0].text == expected_content(20)
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len("hello there") // 4 + 1
    assert resp.usage.completion_tokens == 20
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_content(4)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def vector(embedding: list[float] | str) -> list[float]:
    if isinstance(embedding, str):  # base64 asked for explicitly: the SDK passes it through
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return embedding


@pytest.mark.parametrize("encoding", ["float", "base64", None])  # None: the SDK's base64
async def test_embeddings(mock: Mock, encoding: Any) -> None:
    kw: dict[str, Any] = {"encoding_format": encoding} if encoding else {}
    async with mock.client() as client:
        one = await client.embeddings.create(model="text-embedding-3-small", input="abc", **kw)
        many = await client.embeddings.create(
            model="text-embedding-3-small", input=["abc", "defgh"], dimensions=4, **kw
        )
    assert one.model == "text-embedding-3-small"
    assert vector(one.data[0].embedding) == embedding_vector("abc")
    assert len(embedding_vector("abc")) == 8
    assert [vector(d.embedding) for d in many.data] == [
        embedding_vector("abc", 4),
        embedding_vector("defgh", 4),
    ]
    assert [d.index for d in many.data] == [0, 1]
    assert many.usage.prompt_tokens == many.usage.total_tokens == 1 + 2
    assert embedding_vector("abc") != embedding_vector("abd")


async def test_models(mock: Mock) -> None:
    async with mock.client() as client:
        models = [m.id async for m in client.models.list()]
    assert models == list(MockSettings().models)


async def test_validation_errors(mock: Mock, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{mock.base_url}/chat/completions", data=b"{nope") as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    async with mock.client() as client:
        with pytest.raises(openai.NotFoundError) as nf:
            await client.chat.completions.create(model="gpt-9", messages=MESSAGES)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-chunks": "-1"}
            )
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-fault": "lava"}
            )
    assert nf.value.code == "model_not_found"
    assert mock.stats.requests == 4


async def test_http_faults(mock: Mock) -> None:
    async with mock.client() as client:
        with pytest.raises(openai.InternalServerError) as e500:
            await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-fault": "http500"}
            )
        with pytest.raises(openai.RateLimitError) as e429:
            await client.embeddings.create(
                model="gpt-4o", input="x", extra_headers={"x-mock-fault": "http429"}
            )
    assert e500.value.status_code == 500 and e500.value.type == "server_error"
    assert e429.value.code == "rate_limit_exceeded"
    assert e429.value.response.headers["retry-after"] == "1"


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_hang_is_observed_when_the_client_leaves(
    start: Start, http: aiohttp.ClientSession, handler_cancellation: bool
) -> None:
    mock = await start(handler_cancellation=handler_cancellation)
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    timeout = aiohttp.ClientTimeout(total=0.15)
    headers = {"x-mock-fault": "hang"}
    with pytest.raises(asyncio.TimeoutError):
        await http.post(
            f"{mock.base_url}/chat/completions", json=body, headers=headers, timeout=timeout
        )
    await mock.until(lambda s: s.disconnects == 1)
    assert mock.stats.completed_streams == 0


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_client_disconnect_mid_stream_is_observed(
    start: Start, handler_cancellation: bool
) -> None:
    mock = await start(MockSettings(delay_ms=30), handler_cancellation=handler_cancellation)
    async with mock.client() as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        assert mock.stats.active_streams == 1
        await stream.close()
        await mock.until(lambda s: s.disconnects == 1 and s.active_streams == 0)
    assert mock.stats.completed_streams == 0


async def test_reset_aborts_mid_stream(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    got = b""
    url = f"{mock.base_url}/chat/completions"
    async with http.post(url, json=body, headers={"x-mock-fault": "reset:2"}) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for data in resp.content.iter_any():
                got += data
    events = [orjson.loads(e) for e in sse_events(got)]
    assert len(events) == 1 + 2  # the role chunk, then two content chunks
    assert mock.stats.completed_streams == 0 and mock.stats.disconnects == 0


async def test_reset_non_stream_truncates(mock: Mock) -> None:
    async with mock.client() as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-fault": "reset:0"}
            )


async def test_malformed(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    url = f"{mock.base_url}/chat/completions"
    async with http.post(url, json=body, headers={"x-mock-fault": "malformed"}) as resp:
        assert resp.status == 200
        events = sse_events(await resp.read())
    assert events[-1] == b"[DONE]"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(events[0])
    del body["stream"]
    async with http.post(url, json=body, headers={"x-mock-fault": "malformed"}) as resp:
        assert resp.status == 200
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(await resp.read())


async def test_endless_stream(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    headers = {"x-mock-fault": "endless", "x-mock-chunks": "2"}
    got = b""
    url = f"{mock.base_url}/chat/completions"
    async with http.post(url, json=body, headers=headers) as resp:
        while got.count(b"\n\n") < 30:  # far more than the 2 chunks asked for
            got += await resp.content.readany()
        resp.close()
    assert b"tok25 " in got and b"[DONE]" not in got
    await mock.until(lambda s: s.disconnects == 1 and s.active_streams == 0)


async def test_delays(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    headers = {"x-mock-first-delay-ms": "150", "x-mock-delay-ms": "10", "x-mock-chunks": "5"}
    t0 = time.monotonic()
    async with http.post(f"{mock.base_url}/chat/completions", json=body, headers=headers) as resp:
        headers_at = time.monotonic() - t0
        await resp.content.readany()
        first_at = time.monotonic() - t0
        rest = await resp.read()
    assert headers_at < 0.12 <= 0.15 <= first_at
    assert rest.endswith(b"data: [DONE]\n\n")
    t0 = time.monotonic()
    async with mock.client() as client:
        await client.models.list(extra_headers={"x-mock-first-delay-ms": "100"})
    assert time.monotonic() - t0 >= 0.1


async def test_stats_endpoint_and_reset(mock: Mock, http: aiohttp.ClientSession) -> None:
    async with mock.client() as client:
        await client.embeddings.create(model="gpt-4o", input="x", extra_headers={"X-Trace": "t1"})
    async with http.get(f"{mock.url}/_mock/stats") as resp:
        stats = await resp.json()
    assert stats["requests"] == 1
    assert stats["last_headers"]["x-trace"] == "t1"
    assert stats["last_body"]["input"] == "x"
    async with http.post(f"{mock.url}/_mock/reset") as resp:
        assert resp.status == 204
    assert mock.stats.requests == 0 and mock.stats.last_headers == {}


async def test_run_mock_prints_its_url(capsys: pytest.CaptureFixture[str]) -> None:
    task = asyncio.create_task(run_mock("127.0.0.1", 0, MockSettings(chunks=2)))
    try:
        for _ in range(200):
            out = capsys.readouterr().out
            if out:
                break
            await asyncio.sleep(0.01)
        assert out.startswith("mock upstream listening on http://127.0.0.1:")
        url = out.strip().rsplit(" ", 1)[1]
        assert url.endswith("/v1") and not url.endswith(":0/v1")
        async with AsyncOpenAI(base_url=url, api_key="x") as client:
            resp = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert resp.choices[0].message.content == expected_content(2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_served_mock_collects_garbage_only_while_no_stream_is_open() -> None:
    class Node:
        ref: object = None

    def garbage_cycle() -> asyncio.Event:
        node = Node()
        node.ref = node  # only the cyclic collector frees it
        freed = asyncio.Event()
        weakref.finalize(node, freed.set)
        return freed

    stats = MockStats(active_streams=1)
    task = asyncio.get_running_loop().create_task(_collect_when_idle(stats))
    try:
        await asyncio.sleep(0)
        assert not gc.isenabled()
        freed = garbage_cycle()
        await asyncio.sleep(IDLE_COLLECT_S * 1.5)
        assert not freed.is_set()  # a stream is open: no collection
        stats.active_streams = 0
        await asyncio.wait_for(freed.wait(), IDLE_COLLECT_S * 3)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert gc.isenabled()
