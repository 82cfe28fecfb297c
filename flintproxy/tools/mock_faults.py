"""The mock's ``x-mock-*`` request headers, read into ``Overrides``, and the fault modes'
vocabulary: their names, the headers and bodies they send, the padded writes of
``huge_*:N``, and the OpenAI-shaped errors that faults and validation answer with.

Why a module of its own: every route of every format (tools.mock_chat,
tools.mock_anthropic, tools.mock_responses) is broken the same way by the same header,
so the header is read in one place, and a request without any ``x-mock-*`` header (the
bench's) costs a few dict lookups and no parsing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import orjson
from aiohttp import web

__all__ = ["LEAKY_HEADERS", "LINES_BODY", "USAGE_CHUNK", "Overrides", "error", "fault_headers",
           "huge_body", "parse_overrides", "write_padded"]

_MAX_CHUNKS = 1_000_000
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
_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    404: web.HTTPNotFound,
    429: web.HTTPTooManyRequests,
    500: web.HTTPInternalServerError,
}
# The faults after which a stream still ends with its usage-only chunk.
USAGE_CHUNK = frozenset({None, "leaky_headers", "huge_head", "huge_event", "linger"})
_PAD_PIECE = 64 * 1024


class Overrides(NamedTuple):
    """One response's settings: the mock's defaults, or what ``x-mock-*`` headers say."""

    chunks: int
    delay: float  # seconds
    first: float  # seconds
    fault: str | None
    arg: int  # the N of reset:N, huge_*:N, linger:MS


def error(
    status: int,
    message: str,
    err_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.HTTPException:
    """An OpenAI-shaped error answer of ``status`` (400, 404, 429 or 500)."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    text = orjson.dumps(body).decode()
    return _ERRORS[status](text=text, content_type="application/json", headers=headers)


def parse_overrides(request: web.BaseRequest, default: Overrides) -> Overrides:
    """``default`` as the request's ``x-mock-*`` headers change it (400 on a bad one)."""
    h = request.headers
    chunks_raw, fault = h.get("x-mock-chunks"), h.get("x-mock-fault")
    timed = "x-mock-delay-ms" in h or "x-mock-first-delay-ms" in h
    if chunks_raw is None and fault is None and not timed:
        return default  # the bench's path: no parsing at all
    chunks, arg = default.chunks, 0
    if chunks_raw is not None:
        if not (chunks_raw.isdigit() and int(chunks_raw) <= _MAX_CHUNKS):
            raise error(400, "invalid x-mock-chunks header", param="x-mock-chunks")
        chunks = int(chunks_raw)
    if fault is not None:
        name, _, number = fault.partition(":")
        if name in _ARG_FAULTS and number.isdigit() and int(number) <= _MAX_FAULT_BYTES:
            fault, arg = name, int(number)
        elif fault not in _FAULTS:
            raise error(400, f"unknown x-mock-fault {fault!r}", param="x-mock-fault")
    delay = _ms_header(request, "x-mock-delay-ms", default.delay)
    first = _ms_header(request, "x-mock-first-delay-ms", default.first)
    return Overrides(chunks, delay, first, fault, arg)


def _ms_header(request: web.BaseRequest, name: str, default: float) -> float:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise error(400, f"invalid {name} header", param=name)
    return value / 1000


def fault_headers(ov: Overrides) -> dict[str, str]:
    """The response headers a fault adds: ``leaky_headers``' or ``huge_head:N``'s."""
    if ov.fault == "leaky_headers":
        return LEAKY_HEADERS
    if ov.fault == "huge_head":
        return {"x-mock-padding": "a" * ov.arg}
    return {}


async def write_padded(resp: web.StreamResponse, start: bytes, size: int,
                       end: bytes) -> None:
    """Write ``start``, then "a"s up to ``size`` bytes in all, then ``end``."""
    await resp.write(start)
    left = max(size - len(start) - len(end), 0)
    piece = b"a" * _PAD_PIECE
    while left > 0:
        await resp.write(piece[:left])
        left -= _PAD_PIECE
    await resp.write(end)


async def huge_body(request: web.Request, size: int) -> web.StreamResponse:
    """A JSON completion-like body of ``size`` bytes, sent in pieces."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = max(size, 40)
    start, end = b'{"choices": [], "pad": "', b'"}'
    await resp.prepare(request)
    await write_padded(resp, start, max(size, 40), end)
    return resp
