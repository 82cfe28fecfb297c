"""The seam around every /v1 request: admission before the upstream call, settlement after.

``relay`` calls exactly two things per request:

    principal = await gate.authenticate(exchange)  # key cache, IP guard (401/403/429)
    admission = await gate.admit(exchange, call, principal, ...)  # limits, balance
    ...relay to the upstream...
    gate.finish(admission, outcome)               # usage, settle, release — never awaits

``admit`` raises a FlintError (401/402/403/429/503) and leaves nothing held when it
does. ``finish`` is synchronous and cheap: it settles the in-memory reservation and
limiter counters and enqueues one usage row for the background writer; nothing on
this path touches disk.

The pieces behind the gate are narrow interfaces (Protocols below) so the embedded
SQLite-plus-memory implementations can later be swapped for PostgreSQL/Redis ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import orjson

from flintproxy.errors import AuthenticationError, BadRequest, InvalidJSON
from flintproxy.gate.bounds import Bound, measure
from flintproxy.http.exchange import Exchange


@dataclass(slots=True)
class Principal:
    """An authenticated API key as the hot path sees it (cached in memory)."""

    key_id: int
    account_id: int
    # None: every configured model is allowed.
    allowed_models: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    # The account-wide overrides (rpm, tpm, max_concurrent), read with the key.
    account_limits: tuple[int | None, int | None, int | None] = (None, None, None)
    # Set once the limiter has been told of account_limits (per cached Principal).
    limits_applied: bool = False
    # The key's spend caps (day, month) in nano-USD; None: no cap at all (gate.spendcaps).
    caps: tuple[int | None, int | None] | None = None


@dataclass(slots=True)
class Call:
    """What admission needs to know of the request (parsed once by relay)."""

    endpoint: str  # a relay.routes endpoint: "chat/completions", "messages", ...
    model: str
    stream: bool
    prompt_tokens_estimate: int
    max_tokens: int | None
    request_id: str  # ours, unique and time-ordered: the usage ledger's key
    # Echoed in x-request-id and sent upstream: the client's own id when it sent a
    # sane one (never trusted as a ledger key), else request_id.
    trace_id: str = ""
    # Set by the gate once admitted: from then on ``finish`` accounts for the request,
    # and the error rendering must not count it a second time.
    admitted: bool = False
    # The money bound measured from the body (gate.bounds); None: made without one.
    bound: Bound | None = None


def parse_call(endpoint: str, body: bytes, request_id: str,
               trace_id: str | None = None) -> tuple[Call, dict[str, Any]]:
    """Validate the parts of the body the gateway relies on; everything else is the upstream's."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidJSON(
            "We could not parse the JSON body of your request. The body must be valid JSON."
        ) from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter (a non-empty string).",
                         param="model", code="missing_model" if model is None else None)
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean.", param="stream")
    if endpoint == "embeddings" or endpoint == "messages/count_tokens":
        stream = False
    bound = measure(endpoint, data, len(body))
    # Roughly 4 bytes of JSON per token: the rate limiter's estimate (money uses the
    # upper bound in ``bound``). The upstream's own count replaces it after the call.
    call = Call(endpoint=endpoint, model=model, stream=stream,
                prompt_tokens_estimate=len(body) // 4 + 1, max_tokens=bound.requested,
                request_id=request_id, trace_id=trace_id or request_id, bound=bound)
    return call, data


class Ending(StrEnum):
    """How an admitted request ended. The values are stored in usage rows and used as
    metric and access-log labels: never change them."""

    OK = "ok"  # answered in full (a stream: once its ``data: [DONE]`` was relayed)
    # The client left first: status 499 if it left before a status was sent.
    CLIENT_DISCONNECT = "client_disconnect"
    UPSTREAM_ERROR = "upstream_error"  # no upstream answered well
    ERROR = "error"  # refused or failed on our side after admission
    REJECTED = "rejected"  # never admitted: a label of metrics and the access log only


# nginx's "client closed request": the status of a request whose client left before
# any status was sent (after a 200 began a stream, 200 it stays, as nginx logs it).
CLIENT_CLOSED = 499


@dataclass(slots=True)
class Outcome:
    """What happened, for usage, billing, limits and metrics."""

    status: int
    outcome: Ending
    upstream: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # part of prompt_tokens: cache reads
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0  # part of prompt_tokens: Anthropic's cache creation
    estimated: bool = False
    ttfb_s: float | None = None
    duration_s: float = 0.0
    upstream_wait_s: float = 0.0


class Admission:
    """Everything held for one admitted request until ``finish``."""

    __slots__ = ("call", "exchange", "headers", "limit", "principal", "started", "started_ms",
                 "state")

    def __init__(self, call: Call, principal: Principal, started: float, started_ms: int,
                 exchange: Exchange | None = None) -> None:
        self.call = call
        self.exchange = exchange  # for the access log's opt-in client IP
        self.principal = principal
        self.started = started  # perf_counter at arrival
        self.started_ms = started_ms  # wall clock, unix ms
        # Opaque per-component state (limiter ticket, reservation), set by the Gate.
        self.state: object = None
        # Response headers to add (the x-ratelimit-* family).
        self.headers: dict[str, str] = {}
        # The output limit the upstream body must carry (parameter names, tokens per
        # choice); None when the body already holds the upstream to the reservation.
        self.limit: tuple[tuple[str, ...], int] | None = None


class Gate(Protocol):
    """The interface relay depends on; see the module docstring."""

    async def admit(self, exchange: Exchange, call: Call, principal: Principal,
                    started: float, started_ms: int) -> Admission: ...

    def finish(self, admission: Admission, outcome: Outcome) -> None: ...

    def allowed_models(self, principal: Principal) -> frozenset[str] | None: ...

    async def authenticate(self, exchange: Exchange) -> Principal: ...


def bearer_token(exchange: Exchange) -> str:
    """The API key from ``Authorization: Bearer ...``, else from ``x-api-key`` (how
    Anthropic's SDKs send it); raises 401 when absent."""
    header = exchange.header(b"authorization")
    if not header:
        key = exchange.header(b"x-api-key")
        if key and key.strip():
            return key.strip()
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'"
            " (or 'x-api-key: YOUR_KEY').",
            code="missing_api_key",
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Malformed Authorization header; expected 'Bearer YOUR_KEY'.")
    return token
