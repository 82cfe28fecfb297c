"""The mock's core: its settings and counters, and what every route does with a request:
count and record it, read its ``x-mock-*`` headers, validate its body, apply the faults
that need no body, wait while noticing a client that left, and answer a complete body
(or its broken variant when a fault asks for one).

Why a module of its own: the format modules (tools.mock_chat, tools.mock_anthropic,
tools.mock_responses, tools.mock_chat_tools) all go through this one core
(``mock_events.MockCore`` names what they use of it), so every format counts,
records and faults requests alike, and the tests read one ``MockStats``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from flintproxy.tools.mock_faults import (
    LINES_BODY,
    Overrides,
    error,
    fault_headers,
    huge_body,
    parse_overrides,
)

__all__ = ["MOCK_STATS", "Mock", "MockSettings", "MockStats", "Received"]


# How often a long sleep checks that the client is still there. Only needed when
# the runner does not cancel handlers (run_mock does): slow enough that thousands of
# open streams do not turn into a storm of wake-ups (the bench's slow-stream rows).
_POLL_S = 0.5


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


class _Gone(web.HTTPException):
    """The answer to a client that already left (nginx's 499); it is never delivered."""

    status_code = 499



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


class Mock:
    """The mock's shared core (it is what ``mock_events.MockCore`` describes)."""

    def __init__(self, settings: MockSettings) -> None:
        self.stats = MockStats()
        self.models = frozenset(settings.models)
        self.created = int(time.time())
        self.ids = itertools.count(1)
        delay, first = settings.delay_ms / 1000, settings.first_chunk_delay_ms / 1000
        self.default = Overrides(settings.chunks, delay, first, None, 0)
        self.record = settings.record

    async def intake(self, request: web.Request) -> tuple[dict[str, Any], Overrides]:
        """Count and record the request, validate it, apply the faults that need no body."""
        stats = self.stats
        stats.requests += 1
        stats._headers = request.headers
        stats._transport = request.transport
        if self.record:
            raw_headers = [(k.decode("latin-1"), v.decode("latin-1"))
                           for k, v in request.raw_headers]
            stats.received.append(Received(raw_headers, await request.read()))
        ov = parse_overrides(request, self.default)
        body: dict[str, Any] = {}
        if request.method == "POST":
            try:
                parsed = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise error(400, "We could not parse the JSON body of your request.") from None
            if not isinstance(parsed, dict):
                raise error(400, "The request body must be a JSON object.")
            body = stats.last_body = parsed
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise error(400, "you must provide a model parameter", param="model")
            if model not in self.models:
                msg = f"The model `{model}` does not exist or you do not have access to it."
                raise error(404, msg, code="model_not_found")
        if ov.fault == "http500":
            msg = "The server had an error while processing your request."
            raise error(500, msg, "server_error")
        if ov.fault == "http429":
            msg = "Rate limit reached for requests (mock)."
            retry = {"Retry-After": "1"}
            raise error(429, msg, "requests", "rate_limit_exceeded", headers=retry)
        if ov.fault == "hang":
            await self.wait(request, math.inf)
            raise _Gone()
        if ov.fault == "http400_lines":
            if not await self.wait(request, ov.first):
                raise _Gone()
            raise web.HTTPBadRequest(text=LINES_BODY.decode(), content_type="application/json")
        return body, ov

    async def wait(self, request: web.BaseRequest, seconds: float) -> bool:
        """Pause before answering; False (and counted) if the client went away."""
        with _Watch(self.stats):
            await _pause(request, seconds)
            return True
        return False

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

    def fault_headers(self, ov: Overrides) -> dict[str, str]:
        return fault_headers(ov)

    async def stats_view(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot(), dumps=lambda o: orjson.dumps(o).decode())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.Response(status=204)

    async def plain(self, request: web.Request, data: bytes, ov: Overrides) -> web.StreamResponse:
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
                                headers=fault_headers(ov))
        if ov.fault == "huge_body":
            return await huge_body(request, ov.arg)
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
