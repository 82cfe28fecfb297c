"""A fast, deterministic OpenAI-compatible upstream for tests, `make run` and the bench.

Content is predictable (chunk i is ``f"tok{i} "``, one token each), usage is computed
from the request, and ``x-mock-*`` request headers tune or break single responses:
``x-mock-chunks``, ``x-mock-delay-ms``, ``x-mock-first-delay-ms`` and ``x-mock-fault``:

- ``http500``, ``http429``, ``hang``, ``reset:N``, ``malformed``, ``endless``: the
  upstream fails, slowly or at once;
- ``shapeless``: a 200 whose JSON is not a completion;
- ``http400_lines``: after ``x-mock-first-delay-ms``, a 400 whose body has blank lines
  and an SSE event in it;
- ``leaky_headers``: a proxy's internals in the response headers (x-litellm-*,
  the upstream's org, rate limits, cookie, server);
- ``huge_head:N``, ``huge_body:N``, ``huge_event:N``: a response header, a
  non-streaming body or one SSE event of N bytes;
- ``usage_in_content``: the stream's usage rides on its last content chunk (choices
  not empty), as LiteLLM sends it;
- ``linger:MS``: after ``data: [DONE]`` the stream stays open MS milliseconds, then
  sends a comment and ends.

Like a real provider, it honours ``max_tokens`` / ``max_completion_tokens``: a
completion stops at the limit with ``finish_reason: "length"``. It returns one
choice, but bills (reports usage for) every completion the request asks for:
``n``, and on /v1/completions ``best_of`` and each prompt of a prompt array.

It speaks Anthropic's Messages (``/v1/messages``, ``/v1/messages/count_tokens``:
tools.mock_anthropic) and OpenAI's Responses API (``/v1/responses``:
tools.mock_responses) too, with the same faults and limits, and answers chat requests
that force a tool with a tool call (tools.mock_chat_tools).

Why one module of this size: it is a tool, read as one description of an upstream
(its routes, its faults, its CLI); each fault is a few lines in the one response path.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gc
import itertools
import math
import struct
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from flintproxy.tools import mock_anthropic, mock_chat_tools, mock_responses

# How often a long sleep checks that the client is still there. Only needed when
# the runner does not cancel handlers (run_mock does): slow enough that thousands of
# open streams do not turn into a storm of wake-ups (the bench's slow-stream rows).
_POLL_S = 0.5
_MAX_CHUNKS = 1_000_000
IDLE_COLLECT_S = 1.0
_CACHE_MAX = 512  # bound on cached (kind, model, chunks) shapes, as headers vary chunks
_FAULTS = frozenset({"http500", "http429", "hang", "malformed", "endless", "shapeless",
                     "leaky_headers", "usage_in_content", "http400_lines"})
# An error body that would forge a stream event if relayed with its line breaks.
LINES_BODY = (b'{"error": {"message": "bad", "type": "invalid_request_error"}}'
              b'\n\ndata: {"forged": 1}\n\n')

# Faults that take a number: x-mock-fault: NAME:N.
_ARG_FAULTS = frozenset({"reset", "huge_head", "huge_body", "huge_event", "linger"})
_MAX_FAULT_BYTES = 1 << 30
# What a LiteLLM proxy (and a provider) put in response headers that clients must not see.
LEAKY_HEADERS = {
    "x-litellm-api-base": "https://secret-upstream.internal/v1",
    "x-litellm-key-spend": "12.3456",
    "x-litellm-model-id": "mock-deployment-7",
    "openai-organization": "org-operator-secret",
    "x-ratelimit-remaining-requests": "4999",
    "set-cookie": "upstream_session=s3cr3t; Path=/",
    "x-mock-leak": "leaked",
}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    404: web.HTTPNotFound,
    429: web.HTTPTooManyRequests,
    500: web.HTTPInternalServerError,
}


@dataclass(frozen=True, slots=True)
class MockSettings:
    """Defaults for every response; ``x-mock-*`` headers override them per request."""

    chunks: int = 20
    delay_ms: float = 0.0
    first_chunk_delay_ms: float = 0.0
    models: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small",
                               "claude-sonnet-4-5")
    # Keep every request's headers and body in ``MockStats.received`` (the leak
    # scanner reads them); off by default, so the bench pays nothing for it.
    record: bool = False


class Received(NamedTuple):
    """One request as the upstream received it (``MockSettings.record``)."""

    headers: list[tuple[str, str]]
    body: bytes


@dataclass(slots=True, eq=False)
class MockStats:
    """Counters the tests read, in-process or as JSON from ``GET /_mock/stats``."""

    requests: int = 0
    completed_streams: int = 0
    disconnects: int = 0  # responses whose client left before their end (streams, hangs)
    active_streams: int = 0
    last_body: dict[str, Any] = field(default_factory=dict)
    # The last request's own immutable header proxy, copied only when read: the bench's
    # hot path pays nothing for it.
    _headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The last request's connection (its peer is read only when asked for).
    _transport: Any = field(default=None, repr=False)
    # With ``MockSettings.record``: each /v1 request's raw headers and body, in order.
    received: list[Received] = field(default_factory=list, repr=False)

    @property
    def last_peer(self) -> tuple[str, int] | None:
        """The (host, port) the most recent /v1 request came from: the same for two
        requests on one kept-alive connection."""
        t = self._transport
        peer = None if t is None else t.get_extra_info("peername")
        return None if peer is None else (peer[0], peer[1])

    @property
    def last_headers(self) -> dict[str, str]:
        """Headers of the most recent /v1 request, names lower-cased."""
        return {k.lower(): v for k, v in self._headers.items()}

    def reset(self) -> None:
        """Zero the counters (``active_streams`` is live state, so it is kept)."""
        self.requests = self.completed_streams = self.disconnects = 0
        self.last_body, self._headers = {}, {}
        self.received.clear()

    def snapshot(self) -> dict[str, Any]:
        """Everything above as a JSON-ready dict."""
        names = ("requests", "completed_streams", "disconnects", "active_streams", "last_body")
        return {n: getattr(self, n) for n in names} | {"last_headers": self.last_headers}


MOCK_STATS: web.AppKey[MockStats] = web.AppKey("mock_stats", MockStats)


def expected_content(chunks: int) -> str:
    """The exact assistant text of a completion made of ``chunks`` content chunks."""
    return "".join(f"tok{i} " for i in range(chunks))


def embedding_vector(text: str, dims: int = 8) -> list[float]:
    """The embedding of one input; exact in float32, so base64 round-trips losslessly."""
    crc = zlib.crc32(text.encode())
    return [(((crc >> (j % 24)) + 31 * j) & 0xFF) / 128 - 1.0 for j in range(dims)]


def _tokens(value: object) -> int:
    if isinstance(value, str):
        return len(value) // 4 + 1
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # already token ids
        return sum(_tokens(v) for v in value)
    return _tokens(value.get("text", "")) if isinstance(value, dict) else 0


def completion_limit(body: Mapping[str, Any]) -> int | None:
    """The per-choice output limit a provider applies: the least one sent, if any."""
    sent = [v for v in (body.get("max_tokens"), body.get("max_completion_tokens"))
            if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(sent, default=None)


def choices_billed(kind: str, body: Mapping[str, Any]) -> int:
    """Completions generated (and billed) for a body: ``n``, ``best_of``, prompt arrays."""
    def count(name: str) -> int:
        v = body.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1

    if kind == "chat":
        return count("n")
    prompt = body.get("prompt")
    batch = 1  # a string, or one token-id list
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        batch = len(prompt)  # strings or token-id lists: one set of choices each
    return max(count("n"), count("best_of")) * batch


def prompt_tokens_for(body: Mapping[str, Any]) -> int:
    """The prompt_tokens the mock reports for a chat, completions or embeddings body.

    ``len(text)//4 + 1`` per message (content parts counted alike), per prompt string
    or per input string; a token-id list counts its length.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(_tokens(m.get("content")) for m in messages if isinstance(m, dict))
    return _tokens(body.get("prompt", body.get("input", "")))


@functools.lru_cache(maxsize=4096)
def _usage_json(prompt: int, completion: int) -> bytes:
    return orjson.dumps(
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
    )


def _error(
    status: int,
    message: str,
    err_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.HTTPException:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    text = orjson.dumps(body).decode()
    return _ERRORS[status](text=text, content_type="application/json", headers=headers)


def _after_id(obj: Mapping[str, Any], end: bytes) -> bytes:
    # Responses are spliced as b'{"id":"' + id + this: the id is the only part that
    # varies per request, so the rest is encoded once and cached.
    return b'",' + orjson.dumps(obj)[1:-1] + end


class _Gone(web.HTTPException):
    """The answer to a client that already left (nginx's 499); it is never delivered."""

    status_code = 499


class _Overrides(NamedTuple):
    chunks: int
    delay: float  # seconds
    first: float  # seconds
    fault: str | None
    arg: int  # the N of reset:N, huge_*:N, linger:MS


class _Stream(NamedTuple):
    tails: tuple[bytes, ...]  # every event before the usage chunk, after its id
    start: int  # index in tails of the first content chunk
    usage_prefix: bytes  # the usage-only chunk, after its id, up to the usage value


async def _pause(request: web.BaseRequest, seconds: float) -> None:
    """Sleep, noticing a vanished client even when the runner does not cancel handlers."""
    if seconds <= _POLL_S:
        if seconds > 0:
            await asyncio.sleep(seconds)
        return  # a write follows, and it fails if the client has gone
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        await asyncio.sleep(min(left, _POLL_S))
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError("client went away")


def _ms_header(request: web.BaseRequest, name: str, default: float) -> float:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise _error(400, f"invalid {name} header", param=name)
    return value / 1000


def _abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.abort()  # RST, no chunked terminator: a truly broken response


class _Watch:
    """Counts a client that goes away: a failed write or poll, or (with the runner's
    handler_cancellation) the handler's cancellation, which must keep propagating."""

    __slots__ = ("stats", "stream")

    def __init__(self, stats: MockStats, stream: bool = False) -> None:
        self.stats, self.stream = stats, stream
        stats.active_streams += stream

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        self.stats.active_streams -= self.stream
        if kind is None or not issubclass(kind, ConnectionResetError | asyncio.CancelledError):
            return False
        self.stats.disconnects += 1
        return issubclass(kind, ConnectionResetError)  # swallowed; a cancellation propagates


class _Mock:
    def __init__(self, settings: MockSettings) -> None:
        self.stats = MockStats()
        self.models = frozenset(settings.models)
        self.created = int(time.time())
        self.ids = itertools.count(1)
        delay, first = settings.delay_ms / 1000, settings.first_chunk_delay_ms / 1000
        self.default = _Overrides(settings.chunks, delay, first, None, 0)
        self.record = settings.record
        self.streams: dict[tuple[str, str, int, bool, str], _Stream] = {}
        self.bodies: dict[tuple[str, str, int, str], bytes] = {}
        listing = [
            {"id": m, "object": "model", "created": self.created, "owned_by": "flintproxy-mock"}
            for m in settings.models
        ]
        self.models_body = orjson.dumps({"object": "list", "data": listing})

    def _overrides(self, request: web.BaseRequest) -> _Overrides:
        h = request.headers
        chunks_raw, fault = h.get("x-mock-chunks"), h.get("x-mock-fault")
        timed = "x-mock-delay-ms" in h or "x-mock-first-delay-ms" in h
        if chunks_raw is None and fault is None and not timed:
            return self.default  # the bench's path: no parsing at all
        chunks, arg = self.default.chunks, 0
        if chunks_raw is not None:
            if not (chunks_raw.isdigit() and int(chunks_raw) <= _MAX_CHUNKS):
                raise _error(400, "invalid x-mock-chunks header", param="x-mock-chunks")
            chunks = int(chunks_raw)
        if fault is not None:
            name, _, number = fault.partition(":")
            if name in _ARG_FAULTS and number.isdigit() and int(number) <= _MAX_FAULT_BYTES:
                fault, arg = name, int(number)
            elif fault not in _FAULTS:
                raise _error(400, f"unknown x-mock-fault {fault!r}", param="x-mock-fault")
        delay = _ms_header(request, "x-mock-delay-ms", self.default.delay)
        first = _ms_header(request, "x-mock-first-delay-ms", self.default.first)
        return _Overrides(chunks, delay, first, fault, arg)

    async def _intake(self, request: web.Request) -> tuple[dict[str, Any], _Overrides]:
        """Count and record the request, validate it, apply the faults that need no body."""
        stats = self.stats
        stats.requests += 1
        stats._headers = request.headers
        stats._transport = request.transport
        if self.record:
            raw_headers = [(k.decode("latin-1"), v.decode("latin-1"))
                           for k, v in request.raw_headers]
            stats.received.append(Received(raw_headers, await request.read()))
        ov = self._overrides(request)
        body: dict[str, Any] = {}
        if request.method == "POST":
            try:
                parsed = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise _error(400, "We could not parse the JSON body of your request.") from None
            if not isinstance(parsed, dict):
                raise _error(400, "The request body must be a JSON object.")
            body = stats.last_body = parsed
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise _error(400, "you must provide a model parameter", param="model")
            if model not in self.models:
                msg = f"The model `{model}` does not exist or you do not have access to it."
                raise _error(404, msg, code="model_not_found")
        if ov.fault == "http500":
            msg = "The server had an error while processing your request."
            raise _error(500, msg, "server_error")
        if ov.fault == "http429":
            msg = "Rate limit reached for requests (mock)."
            retry = {"Retry-After": "1"}
            raise _error(429, msg, "requests", "rate_limit_exceeded", headers=retry)
        if ov.fault == "hang":
            await self._wait(request, math.inf)
            raise _Gone()
        if ov.fault == "http400_lines":
            if not await self._wait(request, ov.first):
                raise _Gone()
            raise web.HTTPBadRequest(text=LINES_BODY.decode(), content_type="application/json")
        return body, ov

    async def _wait(self, request: web.BaseRequest, seconds: float) -> bool:
        """Pause before answering; False (and counted) if the client went away."""
        with _Watch(self.stats):
            await _pause(request, seconds)
            return True
        return False

    def _head(self, kind: str, model: str, stream: bool) -> dict[str, Any]:
        obj = "text_completion" if kind != "chat" else "chat.completion" + ".chunk" * stream
        return {"object": obj, "created": self.created, "model": model, "system_fingerprint": None}

    def _chunk(
        self, kind: str, model: str, text: str | None, usage: bool, role: bool = False,
        finish: str = "stop",
    ) -> bytes:
        choice: dict[str, Any]
        if kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", "content": "", "refusal": None}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"text": text or "", "index": 0}
        choice |= {"logprobs": None, "finish_reason": None if text is not None or role else finish}
        event = self._head(kind, model, True) | {"choices": [choice]}
        return _after_id(event | {"usage": None} if usage else event, b"}\n\n")

    def _stream(self, kind: str, model: str, chunks: int, usage: bool,
                finish: str = "stop") -> _Stream:
        key = (kind, model, chunks, usage, finish)
        if (cached := self.streams.get(key)) is not None:
            return cached
        tails = [self._chunk(kind, model, None, usage, role=True)] if kind == "chat" else []
        start = len(tails)
        tails += [self._chunk(kind, model, f"tok{i} ", usage) for i in range(chunks)]
        tails.append(self._chunk(kind, model, None, usage, finish=finish))
        prefix = _after_id(self._head(kind, model, True) | {"choices": []}, b',"usage":')
        plan = _Stream(tuple(tails), start, prefix)
        if len(self.streams) < _CACHE_MAX:
            self.streams[key] = plan
        return plan

    def _body_tail(self, kind: str, model: str, chunks: int, finish: str = "stop") -> bytes:
        key = (kind, model, chunks, finish)
        if (cached := self.bodies.get(key)) is not None:
            return cached
        text = expected_content(chunks)
        choice: dict[str, Any] = {"index": 0}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            choice["message"]["annotations"] = []
        else:
            choice["text"] = text
        choice |= {"logprobs": None, "finish_reason": finish}
        tail = _after_id(self._head(kind, model, False) | {"choices": [choice]}, b',"usage":')
        if len(self.bodies) < _CACHE_MAX:
            self.bodies[key] = tail
        return tail

    async def generate(self, kind: str, request: web.Request) -> web.StreamResponse:
        body, ov = await self._intake(request)
        model: str = body["model"]
        prompt = prompt_tokens_for(body)
        idb = (b"chatcmpl-mock-%d" if kind == "chat" else b"cmpl-mock-%d") % next(self.ids)
        limit = completion_limit(body)
        finish = "stop"
        if limit is not None and limit < ov.chunks:
            ov, finish = ov._replace(chunks=limit), "length"
        billed = ov.chunks * choices_billed(kind, body)
        tool = mock_chat_tools.forced_tool(body) if kind == "chat" else None
        if tool is not None:
            return await mock_chat_tools.tool_call(
                self, request, body, ov, tool, ov.chunks, finish,
                orjson.loads(_usage_json(prompt, billed)))
        if body.get("stream"):
            opts = body.get("stream_options")
            usage = isinstance(opts, dict) and opts.get("include_usage") is True
            return await self._stream_out(request, kind, model, idb, ov, usage, prompt,
                                          finish, billed)
        wait = ov.first + ov.delay * ov.chunks  # as long as the stream would have taken
        if wait and not await self._wait(request, wait):
            raise _Gone()
        parts = (b'{"id":"', idb, self._body_tail(kind, model, ov.chunks, finish))
        return await self._plain(
            request, b"".join((*parts, _usage_json(prompt, billed), b"}")), ov
        )

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, ov = await self._intake(request)
        if ov.first and not await self._wait(request, ov.first):
            raise _Gone()
        inputs = body.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and all(isinstance(v, int) for v in inputs)
        ):
            inputs = [inputs]  # one text, or one pre-tokenized text
        if not (isinstance(inputs, list) and inputs):
            raise _error(400, "'input' must be a string or a non-empty array", param="input")
        dims = body.get("dimensions")
        dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else 8
        b64 = body.get("encoding_format") == "base64"  # the openai SDK's default
        data = []
        for i, item in enumerate(inputs):
            vec = embedding_vector(item if isinstance(item, str) else str(item), dims)
            emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = prompt_tokens_for({"input": inputs})
        usage = {"prompt_tokens": n, "total_tokens": n}
        out = {"object": "list", "data": data, "model": body["model"], "usage": usage}
        return await self._plain(request, orjson.dumps(out), ov)

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        _, ov = await self._intake(request)
        if ov.first and not await self._wait(request, ov.first):
            raise _Gone()
        return await self._plain(request, self.models_body, ov)

    # --- what the other formats use (tools.mock_events.MockCore) ---------------------

    async def intake(self, request: web.Request) -> tuple[dict[str, Any], _Overrides]:
        return await self._intake(request)

    async def wait(self, request: web.BaseRequest, seconds: float) -> bool:
        return await self._wait(request, seconds)

    async def pause(self, request: web.BaseRequest, seconds: float) -> None:
        await _pause(request, seconds)

    def watch(self, stream: bool) -> _Watch:
        return _Watch(self.stats, stream)

    def abort(self, request: web.BaseRequest) -> None:
        _abort(request)

    def gone(self) -> web.HTTPException:
        return _Gone()

    def completed(self) -> None:
        self.stats.completed_streams += 1

    async def plain(self, request: web.Request, data: bytes, ov: _Overrides
                    ) -> web.StreamResponse:
        return await self._plain(request, data, ov)

    def fault_headers(self, ov: _Overrides) -> dict[str, str]:
        return _fault_headers(ov)

    async def stats_view(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot(), dumps=lambda o: orjson.dumps(o).decode())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.Response(status=204)

    async def _plain(self, request: web.Request, data: bytes, ov: _Overrides) -> web.StreamResponse:
        """A complete JSON body, or its broken variant when a fault asks for one."""
        if ov.fault is None:
            return web.Response(body=data, content_type="application/json")
        if ov.fault == "malformed":
            return web.Response(body=b'{"id": not json', content_type="application/json")
        if ov.fault == "shapeless":
            return web.Response(body=b'{"object": "nothing", "usage": {"prompt_tokens": 1}}',
                                content_type="application/json")
        if ov.fault in ("leaky_headers", "huge_head"):
            return web.Response(body=data, content_type="application/json",
                                headers=_fault_headers(ov))
        if ov.fault == "huge_body":
            return await _huge_body(request, ov.arg)
        if ov.fault not in ("reset", "endless"):  # the stream-only faults
            return web.Response(body=data, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if ov.fault == "reset":
            resp.content_length = len(data)
        with _Watch(self.stats):
            await resp.prepare(request)
            if ov.fault == "reset":  # half the promised body, then a dead connection
                await resp.write(data[: len(data) // 2])
                _abort(request)
                return resp
            while True:  # endless: JSON's leading whitespace, never a value
                await _pause(request, max(ov.delay, 0.001))
                await resp.write(b" ")
        return resp

    async def _stream_out(
        self,
        request: web.Request,
        kind: str,
        model: str,
        idb: bytes,
        ov: _Overrides,
        usage: bool,
        prompt: int,
        finish: str = "stop",
        billed: int | None = None,
    ) -> web.StreamResponse:
        head = b'data: {"id":"' + idb
        plan = self._stream(kind, model, ov.chunks, usage, finish)
        tails: Iterable[bytes] = plan.tails
        stop, gap = float(plan.start + ov.chunks), ov.delay
        if ov.fault == "endless":
            more = (self._chunk(kind, model, f"tok{i} ", usage) for i in itertools.count())
            tails = itertools.chain(plan.tails[: plan.start], more)
            stop, gap = math.inf, max(gap, 0.001)
        cut = plan.start + min(ov.arg, ov.chunks) if ov.fault == "reset" else -1
        resp = web.StreamResponse(headers=_SSE_HEADERS | _fault_headers(ov))
        if ov.fault == "usage_in_content" and usage:  # usage rides on the last chunk
            last = self._head(kind, model, True) | {
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                "usage": orjson.loads(_usage_json(prompt, ov.chunks))}
            tails = (*plan.tails[:-1], _after_id(last, b"}\n\n"))
        with _Watch(self.stats, stream=True):
            await resp.prepare(request)  # sends the headers now, before the first chunk
            await _pause(request, ov.first)
            if ov.fault == "malformed":
                tails = ()
                await resp.write(b"data: {not json\n\n")
            if ov.fault == "huge_event":  # one event of arg bytes, in 64 KiB writes
                await _write_padded(resp, b'data: {"pad":"', ov.arg, b'"}\n\n')
            for i, tail in enumerate(tails):
                if i == cut:
                    _abort(request)
                    return resp
                if gap and plan.start <= i < stop:
                    await _pause(request, gap)
                await resp.write(head + tail)  # one event per write, as a real upstream
            if usage and ov.fault in _USAGE_CHUNK:
                await resp.write(
                    b"".join((head, plan.usage_prefix,
                              _usage_json(prompt, ov.chunks if billed is None else billed),
                              b"}\n\n"))
                )
            await resp.write(_DONE)
            if ov.fault == "linger":  # the upstream's last bytes come late
                await _pause(request, ov.arg / 1000)
                await resp.write(b": bye\n\n")
            self.stats.completed_streams += 1
        return resp


# The faults after which a stream still ends with its usage-only chunk.
_USAGE_CHUNK = frozenset({None, "leaky_headers", "huge_head", "huge_event", "linger"})
_PAD_PIECE = 64 * 1024


def _fault_headers(ov: _Overrides) -> dict[str, str]:
    if ov.fault == "leaky_headers":
        return LEAKY_HEADERS
    if ov.fault == "huge_head":
        return {"x-mock-padding": "a" * ov.arg}
    return {}


async def _write_padded(resp: web.StreamResponse, start: bytes, size: int,
                        end: bytes) -> None:
    """Write ``start``, then "a"s up to ``size`` bytes in all, then ``end``."""
    await resp.write(start)
    left = max(size - len(start) - len(end), 0)
    piece = b"a" * _PAD_PIECE
    while left > 0:
        await resp.write(piece[:left])
        left -= _PAD_PIECE
    await resp.write(end)


async def _huge_body(request: web.Request, size: int) -> web.StreamResponse:
    """A JSON completion-like body of ``size`` bytes, sent in pieces."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = max(size, 40)
    start, end = b'{"choices": [], "pad": "', b'"}'
    await resp.prepare(request)
    await _write_padded(resp, start, max(size, 40), end)
    return resp


def create_mock_app(settings: MockSettings = MockSettings()) -> web.Application:
    """The mock upstream as an aiohttp app; its counters are at ``app[MOCK_STATS]``."""
    mock = _Mock(settings)
    app = web.Application()
    app[MOCK_STATS] = mock.stats
    app.router.add_post("/v1/chat/completions", functools.partial(mock.generate, "chat"))
    app.router.add_post("/v1/completions", functools.partial(mock.generate, "completions"))
    app.router.add_post("/v1/embeddings", mock.embeddings)
    app.router.add_get("/v1/models", mock.list_models)
    app.router.add_post("/v1/responses", functools.partial(mock_responses.responses, mock))
    app.router.add_post("/v1/messages", functools.partial(mock_anthropic.messages, mock))
    app.router.add_post("/v1/messages/count_tokens",
                        functools.partial(mock_anthropic.count_tokens, mock))
    app.router.add_get("/_mock/stats", mock.stats_view)
    app.router.add_post("/_mock/reset", mock.reset_stats)
    return app


async def run_mock(host: str, port: int, settings: MockSettings) -> None:
    """Serve the mock until cancelled, printing its base URL once it listens."""
    # handler_cancellation: a client that leaves cancels its handler at once, so
    # disconnects are seen promptly. No access log: this is the bench's upstream.
    app = create_mock_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=2048).start()
        bound = runner.addresses[0][1] if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        print(f"mock upstream listening on http://{shown}:{bound}/v1", flush=True)
        await _collect_when_idle(app[MOCK_STATS])
    finally:
        await runner.cleanup()


async def _collect_when_idle(stats: MockStats) -> None:
    """Run the cyclic GC only while no stream is open, until cancelled.

    With thousands of streams open, a full collection of their objects stalled the
    mock for 50-100 ms, and with it every stream it served: the bench's baselines
    measured the mock's collector rather than the gateway. Cycles still get
    collected, in the pauses between loads.
    """
    gc.disable()
    try:
        while True:
            await asyncio.sleep(IDLE_COLLECT_S)
            if stats.active_streams == 0 and gc.get_count()[0] > 0:
                gc.collect()
    finally:
        gc.enable()
