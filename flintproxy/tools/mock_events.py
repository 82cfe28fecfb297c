"""What the mock's Anthropic and Responses formats share: the core they call back into,
a named SSE event, and one stream writer with the mock's stream fault modes.

The core is ``tools.mock_core.Mock`` (``MockCore`` names what these formats use of it),
so the formats count, record and fault requests exactly as the chat routes do.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import orjson
from aiohttp import web

from flintproxy.tools.mock_faults import Overrides

__all__ = ["MockCore", "Plan", "cache_tokens", "event", "stream_events", "tokens_of"]


class MockCore(Protocol):
    """What a format module uses of the mock (``tools.mock_core.Mock``)."""

    ids: itertools.count[int]
    created: int

    async def intake(self, request: web.Request) -> tuple[dict[str, Any], Overrides]: ...

    async def wait(self, request: web.BaseRequest, seconds: float) -> bool: ...

    async def pause(self, request: web.BaseRequest, seconds: float) -> None: ...

    def watch(self, stream: bool) -> AbstractContextManager[None]: ...

    def abort(self, request: web.BaseRequest) -> None: ...

    def gone(self) -> web.HTTPException: ...

    def completed(self) -> None: ...

    async def plain(self, request: web.Request, data: bytes, ov: Overrides
                    ) -> web.StreamResponse: ...

    def fault_headers(self, ov: Overrides) -> dict[str, str]: ...


def event(obj: Mapping[str, Any]) -> bytes:
    """One named SSE event, as both APIs send them: ``event: <type>`` then its data."""
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def tokens_of(value: object) -> int:
    """The mock's token count of a text, or of any JSON value's texts: len // 4 + 1 each."""
    if isinstance(value, str):
        return len(value) // 4 + 1
    if isinstance(value, list):
        return sum(tokens_of(v) for v in value)
    if isinstance(value, dict):
        return sum(tokens_of(v) for k, v in value.items() if k in ("text", "content"))
    return 0


def cache_tokens(request: web.BaseRequest) -> tuple[int, int]:
    """(cache writes, cache reads) the request asks the mock to report: ``x-mock-cache:
    W,R``; (0, 0) without it."""
    raw = request.headers.get("x-mock-cache", "")
    write, _, read = raw.partition(",")
    if write.isdigit() and read.isdigit():
        return min(int(write), 1 << 30), min(int(read), 1 << 30)
    return 0, 0


class Plan:
    """A stream: its opening events, one delta event per token, its closing events."""

    __slots__ = ("closing", "delta", "opening")

    def __init__(self, opening: Iterable[bytes], delta: Callable[[int], bytes],
                 closing: Iterable[bytes]) -> None:
        self.opening = tuple(opening)
        self.delta = delta
        self.closing = tuple(closing)


_STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


async def stream_events(core: MockCore, request: web.Request, plan: Plan, chunks: int,
                        ov: Overrides) -> web.StreamResponse:
    """Send ``plan`` with ``chunks`` deltas, honouring the stream fault modes: malformed
    (a broken first event), reset:N (cut after N deltas), endless, huge_event:N, linger:MS,
    and the delays."""
    resp = web.StreamResponse(headers=_STREAM_HEADERS | core.fault_headers(ov))
    count = math.inf if ov.fault == "endless" else chunks
    gap = max(ov.delay, 0.001) if ov.fault == "endless" else ov.delay
    with core.watch(True):
        await resp.prepare(request)
        await core.pause(request, ov.first)
        if ov.fault == "malformed":
            await resp.write(b"event: message_start\ndata: {not json\n\n")
            return resp
        if ov.fault == "huge_event":
            pad = b"a" * max(ov.arg - 40, 0)
            await resp.write(b'event: ping\ndata: {"type":"ping","pad":"' + pad + b'"}\n\n')
        for opening in plan.opening:
            await resp.write(opening)
        for i in itertools.count():
            if i >= count:
                break
            if ov.fault == "reset" and i == ov.arg:
                core.abort(request)
                return resp
            if gap:
                await core.pause(request, gap)
            await resp.write(plan.delta(i))
        for closing in plan.closing:
            await resp.write(closing)
        if ov.fault == "linger":
            await core.pause(request, ov.arg / 1000)
            await resp.write(b": bye\n\n")
        core.completed()
    return resp
