"""The seam around every /v1 request: admission before the upstream call, settlement after.

``relay`` calls exactly two things per request:

    principal = await gate.authenticate(request)  # key cache, IP guard (401/403/429)
    admission = await gate.admit(request, call, principal, ...)  # limits, balance
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

import hashlib
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from flintproxy.errors import AuthenticationError


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


@dataclass(slots=True)
class Call:
    """What admission needs to know of the request (parsed once by relay)."""

    endpoint: str  # "chat/completions" | "completions" | "embeddings"
    model: str
    stream: bool
    prompt_tokens_estimate: int
    max_tokens: int | None
    request_id: str  # ours, unique and time-ordered: the usage ledger's key
    # Echoed in x-request-id and sent upstream: the client's own id when it sent a
    # sane one (never trusted as a ledger key), else request_id.
    trace_id: str = ""
    # Set by the gate once admitted: from then on ``finish`` accounts for the request,
    # and the error middleware must not count it a second time.
    admitted: bool = False


# The request's Call, stored by relay as soon as the body is parsed.
CALL = web.RequestKey("flint.call", Call)


@dataclass(slots=True)
class Outcome:
    """What happened, for usage, billing, limits and metrics."""

    status: int
    outcome: str  # "ok" | "client_disconnect" | "upstream_error" | "error"
    upstream: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    ttfb_s: float | None = None
    duration_s: float = 0.0
    upstream_wait_s: float = 0.0


class Admission:
    """Everything held for one admitted request until ``finish``."""

    __slots__ = ("call", "headers", "principal", "request", "started", "started_ms", "state")

    def __init__(self, call: Call, principal: Principal, started: float, started_ms: int,
                 request: web.Request | None = None) -> None:
        self.call = call
        self.request = request  # for the access log's opt-in client IP
        self.principal = principal
        self.started = started  # perf_counter at arrival
        self.started_ms = started_ms  # wall clock, unix ms
        # Opaque per-component state (limiter ticket, reservation), set by the Gate.
        self.state: object = None
        # Response headers to add (the x-ratelimit-* family).
        self.headers: dict[str, str] = {}


class Gate(Protocol):
    """The interface relay depends on; see the module docstring."""

    async def admit(self, request: web.Request, call: Call, principal: Principal,
                    started: float, started_ms: int) -> Admission: ...

    def finish(self, admission: Admission, outcome: Outcome) -> None: ...

    def allowed_models(self, principal: Principal) -> frozenset[str] | None: ...

    async def authenticate(self, request: web.Request) -> Principal: ...


def bearer_token(request: web.Request) -> str:
    """The API key from ``Authorization: Bearer ...``; raises 401 when absent."""
    header = request.headers.get("Authorization")
    if not header:
        raise AuthenticationError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Malformed Authorization header; expected 'Bearer YOUR_KEY'.")
    return token


def hash_key(token: str) -> bytes:
    """SHA-256 of an API key: the only form in which keys are stored or cached."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()

