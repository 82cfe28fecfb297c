"""The exception tree; every error a client can see is one of these.

    FlintError                      (status, type, code; rendered OpenAI-shaped)
    ├── BadRequest                  400 invalid_request_error
    │   ├── InvalidJSON             400 code=invalid_json
    │   ├── PayloadTooLarge         413 code=payload_too_large
    │   ├── HeadersTooLarge         431 code=request_header_fields_too_large
    │   ├── RequestTimeout          408 code=request_timeout (head or body too slow)
    │   └── UnsupportedMediaType    415 code=unsupported_media_type
    ├── AuthenticationError         401 invalid_api_key / invalid_credentials
    ├── InsufficientQuota           402 insufficient_quota
    │   ├── SpendCapReached         402 spend_cap_reached (a key's daily/monthly cap)
    │   └── LeaseShortfall          402 (shared mode: this node's lease is short; the
    │                               gate waits for one top-up, then answers 402)
    ├── PermissionDenied            403 (disabled account, model not allowed, CSRF)
    ├── NotFound                    404 (unknown model, path)
    │   └── ModelNotFound           404 code=model_not_found
    ├── MethodNotAllowed            405
    ├── Conflict                    409
    ├── RateLimited                 429 rate_limit_exceeded (+ Retry-After)
    ├── ServiceUnavailable          503 (not ready, usage backlog full)
    │   ├── StoreUnavailable        503 code=store_unavailable (database unreachable)
    │   └── RateLimiterUnavailable  503 code=rate_limiter_unavailable (Redis down, fail-closed)
    └── UpstreamError               502 upstream_error
        └── UpstreamTimeout         504 upstream_timeout

Not a client's: ``ListenError``, a listener that cannot open, ``SchemaBehind``,
a shared database not yet migrated, and ``KeyringError``, a missing or wrong data key
(start-up fails); ``SharedStateDown``, Redis unreachable or failing (converted from
redis-py's errors in ``store.redislink`` alone; the limiter turns it into a 503 or
per-node limits).

Third-party exceptions (aiohttp client errors, timeouts) are converted into
UpstreamError/UpstreamTimeout in one place, ``relay.upstream_failure``.
The store's drivers' errors (asyncpg, sqlite3) are converted in one place,
``store.db``: a unique violation is a ``Conflict``, a lost or refused connection a
``StoreUnavailable``; ``SchemaBehind`` (not a client's) stops start-up.
``Relay.serve`` renders every FlintError of a /v1 route, whichever server parsed
the request; the ``errors_middleware`` in ``app`` those of every other aiohttp
route, and aiohttp's own HTTPExceptions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import orjson


def header_lines(headers: Mapping[str, str]) -> bytes:
    """Header lines for our own headers (ASCII names and values), as responses send them."""
    return "".join([f"{k}: {v}\r\n" for k, v in headers.items()]).encode("latin-1")


class FlintError(Exception):
    """Base of every client-visible error; carries the OpenAI error fields."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def head(self) -> bytes:
        """The error response's header lines: its Content-Type and ``headers``."""
        return b"Content-Type: application/json\r\n" + header_lines(self.headers)

    def sse_event(self) -> bytes:
        """The error as a final SSE event, for a stream that already started."""
        return b"data: " + self.body() + b"\n\n"


class BadRequest(FlintError):
    status = 400
    type = "invalid_request_error"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class PayloadTooLarge(BadRequest):
    status = 413
    code = "payload_too_large"


class HeadersTooLarge(BadRequest):
    status = 431
    code = "request_header_fields_too_large"


class RequestTimeout(BadRequest):
    status = 408
    code = "request_timeout"


class UnsupportedMediaType(BadRequest):
    status = 415
    code = "unsupported_media_type"


class AuthenticationError(FlintError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class InsufficientQuota(FlintError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_quota"


class SpendCapReached(InsufficientQuota):
    """A spend cap of the API key (per UTC day or month) cannot cover the request; the
    message names the cap (``gate.spendcaps``)."""

    code = "spend_cap_reached"


class LeaseShortfall(InsufficientQuota):
    """Shared mode: the node's lease on the account cannot cover this request, but
    the account may still have unleased credit. The gate awaits ONE lease top-up
    (bounded) and reserves again; uncaught it is an ordinary 402.

    ``cap``: the key's spend-cap book whose cap lease fell short (``gate.spendcaps``),
    None for the account's credit lease; ``refusal``: what a second shortfall answers
    instead (the 402 ``spend_cap_reached`` naming the cap)."""

    def __init__(self, message: str, *, need_nano: int, cap: object | None = None,
                 refusal: FlintError | None = None) -> None:
        super().__init__(message)
        self.need_nano = need_nano
        self.cap = cap
        self.refusal = refusal


class PermissionDenied(FlintError):
    status = 403
    type = "permission_denied"
    code = "permission_denied"


class NotFound(FlintError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(FlintError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(FlintError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(FlintError):
    """Our own limit was hit; ``code`` names which (requests, tokens, concurrency)."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        hdrs = dict(headers or {})
        # Retry-After is whole seconds, never 0 for a real wait (RFC 9110 §10.2.3).
        hdrs["Retry-After"] = str(max(1, int(retry_after_s + 0.999)))
        super().__init__(message, code=code, headers=hdrs)
        self.retry_after_s = retry_after_s


class LimitNeverFits(RateLimited):
    """A request larger than the limit itself (OpenAI's "Request too large"): 429 as
    OpenAI answers it, but waiting cannot help, so no ``Retry-After`` and
    ``x-should-retry: false``, which the openai SDKs honour (no retries for minutes)."""

    def __init__(self, message: str, *, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        FlintError.__init__(self, message, code=code,
                            headers={**(headers or {}), "x-should-retry": "false"})
        self.retry_after_s = 0.0


class ServiceUnavailable(FlintError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class StoreUnavailable(ServiceUnavailable):
    """The database cannot be reached (connection refused or lost, server shutting down)."""

    code = "store_unavailable"


class RateLimiterUnavailable(ServiceUnavailable):
    """The shared rate limiter (Redis) cannot be reached and the policy is fail-closed."""

    code = "rate_limiter_unavailable"


class UpstreamError(FlintError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class SchemaBehind(RuntimeError):
    """The shared database's schema is older than this release: start-up stops.

    A shared database is migrated by an operator (``flintproxy admin migrate``), not by
    whichever node starts first mid-rollout.
    """

    def __init__(self, current: int, wanted: int) -> None:
        super().__init__(
            f"the PostgreSQL schema is at version {current}, this release needs {wanted}; "
            "run: flintproxy admin migrate")
        self.current = current
        self.wanted = wanted


class ListenError(OSError):
    """A listener cannot open (port taken, address not local, no permission).

    Start-up stops, undoing what it opened; ``flintproxy serve`` says which and exits 1.
    """

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port} ({reason})")
        self.host = host
        self.port = port
        self.reason = reason

    @classmethod
    def of(cls, host: str, port: int, exc: OSError) -> ListenError:
        """From the OSError of a bind; the reason as the OS says it ("Address already
        in use"), not the event loop's wording of it."""
        reason = os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)
        return cls(host, port, reason)


class KeyringError(Exception):
    """The key that encrypts account data is missing, malformed or not the one the data
    was written under: start-up stops with this message rather than serve garbage.
    The message names where the key was looked for, never the key itself."""


class SharedStateDown(Exception):
    """Redis could not answer (refused, timed out, failed): never a client's error.

    The message names the failure's kind only: never a URL (it may hold a password),
    a key or a value.
    """
