"""The /v1 hot path: parse once, admit, call the upstream, relay bytes, hand off usage.

Per request: one JSON parse of the body (orjson), the gate's in-memory checks, one
pooled upstream call, and the response forwarded as it arrives. Upstream failures
before the first byte reached the client (connect errors, timeouts, 429, 5xx, a
stream that dies before its first chunk) are retried on the next candidate; after
that, a stream ends with a final SSE error event and the usage seen so far is
still handed off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, istr

from flintproxy.config import Config
from flintproxy.errors import (
    BadRequest,
    FlintError,
    InvalidJSON,
    PayloadTooLarge,
    PermissionDenied,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
)
from flintproxy.gate import CALL, Admission, Call, Gate, Outcome
from flintproxy.httpclient import (
    UpstreamClient,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamReadTimeout,
    UpstreamResponse,
)
from flintproxy.routing import Router, Upstream
from flintproxy.sse import StreamScanner, extract_usage
from flintproxy.usage import new_request_id

# RFC 9110 §7.6.1: connection-specific fields are never forwarded.
HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                      "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade")
)
# Never sent upstream: the client's credentials, cookies, its IP, and what we set.
REQUEST_DROP = HOP_BY_HOP | frozenset(
    ("host", "content-length", "authorization", "cookie", "api-key",
                      "accept-encoding", "expect", "x-forwarded-for", "x-forwarded-host",
                      "x-forwarded-proto", "forwarded", "x-real-ip", "x-request-id")
)
# Never sent to the client: framing we redo, the upstream's cookies and rate limits.
RESPONSE_DROP = HOP_BY_HOP | frozenset(
    ("content-length", "content-encoding", "set-cookie", "date", "server",
                      "x-request-id", "authorization")
)
X_REQUEST_ID = istr("x-request-id")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
HEARTBEAT = b": keep-alive\n\n"
MAX_REQUEST_ID = 128


# The upstream client's errors: what the client sees, and the metrics reason.
_FAILURES: tuple[tuple[type[Exception], type[UpstreamError], str, str], ...] = (
    (UpstreamReadTimeout, UpstreamTimeout, "timeout", "Upstream '{}' timed out."),
    (UpstreamConnectError, UpstreamError, "connect", "Could not connect to upstream '{}'."),
    (UpstreamDisconnected, UpstreamError, "reset", "Upstream '{}' failed: {}."),
)


def _classify(exc: BaseException) -> tuple[type[UpstreamError], str, str]:
    for kind, error, reason, message in _FAILURES:
        if isinstance(exc, kind):
            return error, reason, message
    return UpstreamError, "other", "Upstream '{}' failed: {}."


def upstream_failure(exc: BaseException, up: Upstream) -> UpstreamError:
    """The one place where upstream-client errors become our error classes."""
    error, _, message = _classify(exc)
    return error(message.format(up.name, type(exc).__name__))


def failure_reason(exc: BaseException) -> str:
    """The ``routing.FAILURE_REASONS`` entry (a metrics label) for a failed attempt."""
    return _classify(exc)[1]


def _filter(headers: Iterable[tuple[str, str]], drop: frozenset[str],
            connection: str | None) -> CIMultiDict[str]:
    # Names compared lower-cased (istr hashes case-sensitively, so sets of istr
    # would not match "Content-Length" against "content-length").
    extra = frozenset(t.strip().lower() for t in connection.split(",")) if connection else ()
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers:
        lk = k.lower()
        if lk not in drop and lk not in extra and not lk.startswith("x-ratelimit-"):
            out.add(k, v)
    return out


def _client_request_id(request: web.Request) -> str | None:
    given = request.headers.get(X_REQUEST_ID)
    if given and len(given) <= MAX_REQUEST_ID and given.isprintable() and given.isascii():
        return given
    return None


def _optional_int(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer.", param=name)
    return value


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
    if endpoint == "embeddings":
        stream = False
    max_tokens = _optional_int(data, "max_completion_tokens") or _optional_int(data, "max_tokens")
    # Roughly 4 bytes of JSON per token; an over-estimate, which is the safe side
    # for a reservation. The upstream's own count replaces it after the call.
    call = Call(endpoint=endpoint, model=model, stream=stream,
                prompt_tokens_estimate=len(body) // 4 + 1, max_tokens=max_tokens,
                request_id=request_id, trace_id=trace_id or request_id)
    return call, data


class Relay:
    """Request handlers for /v1, bound to one pooled upstream client."""

    def __init__(self, config: Config, router: Router, gate: Gate) -> None:
        self.config = config
        self.router = router
        self.gate = gate
        self.client: UpstreamClient | None = None  # set at start-up (needs the loop)
        self.max_body = config.server.max_body_bytes
        self.heartbeat_s = config.server.heartbeat_interval_s
        self.active_streams = 0

    # -- routes -----------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy(request, "chat/completions")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy(request, "completions")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy(request, "embeddings")

    async def models(self, request: web.Request) -> web.Response:
        principal = await self.gate.authenticate(request)
        allowed = self.gate.allowed_models(principal)
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "flintproxy"}
            for m in self.router.models
            if allowed is None or m in allowed
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                            content_type="application/json")

    # -- the relay ----------------------------------------------------------------

    async def proxy(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        started = time.perf_counter()
        started_ms = time.time_ns() // 1_000_000
        principal = await self.gate.authenticate(request)
        if request.content_length is not None and request.content_length > self.max_body:
            raise PayloadTooLarge(f"Request body exceeds {self.max_body} bytes.")
        if request.content_type != "application/json":
            raise UnsupportedMediaType("Content-Type must be application/json.")
        body = await request.read()
        call, data = parse_call(endpoint, body, new_request_id(), _client_request_id(request))
        request[CALL] = call  # metrics and access log of a request refused before admission
        allowed = self.gate.allowed_models(principal)
        if allowed is not None and call.model not in allowed:
            raise PermissionDenied(f"This API key may not use the model `{call.model}`.",
                                   param="model", code="model_not_allowed")
        candidates = self.router.candidates(call.model)
        client_wants_usage = False
        if call.stream:
            opts = data.get("stream_options")
            client_wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            if not client_wants_usage:
                data["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                          "include_usage": True}
                body = b""  # re-encoded below
        admission = await self.gate.admit(request, call, principal, started, started_ms)
        outcome = Outcome(status=500, outcome="error")
        try:
            headers = _filter(request.headers.items(), REQUEST_DROP, None)
            headers[X_REQUEST_ID] = call.trace_id
            return await self._forward(request, admission, candidates, data, body, headers,
                                       client_wants_usage, outcome)
        except asyncio.CancelledError:
            outcome.outcome = "client_disconnect"
            if not outcome.prompt_tokens:  # gone before any usage: charge the estimate
                outcome.prompt_tokens = call.prompt_tokens_estimate
                outcome.estimated = True
            raise
        except FlintError as exc:
            outcome.status = exc.status
            outcome.outcome = "upstream_error" if isinstance(exc, UpstreamError) else "error"
            raise
        finally:
            outcome.duration_s = time.perf_counter() - started
            self.gate.finish(admission, outcome)

    def _body_for(self, up: Upstream, data: dict[str, Any], body: bytes, model: str) -> bytes:
        mapped = up.upstream_model(model)
        if mapped != model:
            return orjson.dumps({**data, "model": mapped})
        return body or orjson.dumps(data)

    async def _attempt(self, up: Upstream, endpoint: str, body: bytes,
                       headers: CIMultiDict[str], stream: bool,
                       ) -> tuple[UpstreamResponse, bytes]:
        """One upstream call up to its first byte (stream) or whole body (non-stream)."""
        assert self.client is not None
        # In place: a retry overwrites what the previous attempt added, and drops a
        # previous upstream's key when this one has none.
        headers.popall("Authorization", None)
        headers.update(up.headers)
        resp = await self.client.post(up.targets[endpoint], headers, body,
                                      up.cfg.connect_timeout_s, up.cfg.read_timeout_s)
        try:
            if resp.status != 200:
                return resp, await resp.read()
            first = await (resp.readany() if stream else resp.read())
            if stream and not first:
                raise UpstreamDisconnected("stream ended before its first byte")
            return resp, first
        except BaseException:
            resp.close()
            raise

    async def _forward(self, request: web.Request, admission: Admission,
                       candidates: list[Upstream], data: dict[str, Any], body: bytes,
                       headers: CIMultiDict[str], client_wants_usage: bool,
                       outcome: Outcome) -> web.StreamResponse:
        call = admission.call
        loop = asyncio.get_running_loop()
        beat: _Heartbeat | None = None
        timer = None
        if call.stream:
            beat = _Heartbeat(request, self.heartbeat_s)
            timer = loop.call_later(self.heartbeat_s, beat.start)
        error: UpstreamError | None = None
        resp: UpstreamResponse | None = None
        first = b""
        up = candidates[0]
        wait_started = time.perf_counter()
        try:
            for i, up in enumerate(candidates):
                self.router.begin(up)
                try:
                    resp, first = await self._attempt(
                        up, call.endpoint, self._body_for(up, data, body, call.model),
                        headers, call.stream)
                except (UpstreamConnectError, UpstreamDisconnected, UpstreamReadTimeout) as exc:
                    self.router.failure(up, failure_reason(exc))
                    error = upstream_failure(exc, up)
                    continue
                except BaseException:
                    self.router.abandon(up)
                    raise
                if resp.status == 429 or resp.status >= 500:
                    self.router.failure(up, "http_429" if resp.status == 429 else "http_5xx")
                    if i < len(candidates) - 1:
                        resp.release()
                        resp = None
                        continue
                else:
                    self.router.success(up)
                break
        finally:
            if timer is not None:
                timer.cancel()
            if beat is not None:
                await beat.stop()
        outcome.upstream = up.name
        outcome.upstream_wait_s = time.perf_counter() - wait_started
        prepared = beat.response if beat is not None else None
        if prepared is not None and not prepared.prepared:
            prepared = None
        if resp is None:
            assert error is not None
            if prepared is None:
                raise error
            outcome.status, outcome.outcome = error.status, "upstream_error"
            await _end_with_error(prepared, error.sse_event())
            return prepared
        try:
            if resp.status != 200:
                return await self._upstream_error(resp, first, admission, outcome, prepared)
            if not call.stream:
                return self._plain(resp, first, admission, outcome)
            return await self._stream(request, up, resp, first, admission, outcome,
                                      client_wants_usage, prepared)
        finally:
            resp.release()

    def _response_headers(self, resp: UpstreamResponse,
                          admission: Admission) -> CIMultiDict[str]:
        headers = _filter(resp.headers.items(), RESPONSE_DROP,
                          resp.headers.get("Connection"))
        headers.update(admission.headers)
        headers[X_REQUEST_ID] = admission.call.trace_id
        return headers

    async def _upstream_error(self, resp: UpstreamResponse, body: bytes,
                              admission: Admission, outcome: Outcome,
                              prepared: web.StreamResponse | None) -> web.StreamResponse:
        # 4xx are the client's own errors and an upstream 429 is passed through
        # (ours say "rate_limit_requests/tokens/concurrency"); 5xx become 502.
        outcome.status = resp.status if resp.status < 500 else 502
        outcome.outcome = "upstream_error"
        if resp.status >= 500:
            err = UpstreamError(f"Upstream '{outcome.upstream}' returned HTTP {resp.status}.")
            if prepared is None:
                raise err
            body = err.body()
        if prepared is not None:
            await _end_with_error(prepared, b"data: " + body.strip() + b"\n\n")
            return prepared
        return web.Response(body=body, status=resp.status,
                            headers=self._response_headers(resp, admission))

    def _plain(self, resp: UpstreamResponse, body: bytes, admission: Admission,
               outcome: Outcome) -> web.Response:
        usage = extract_usage(body)
        outcome.status, outcome.outcome = 200, "ok"
        outcome.ttfb_s = time.perf_counter() - admission.started
        if usage is not None:
            _apply_usage(outcome, usage)
        else:
            outcome.prompt_tokens = admission.call.prompt_tokens_estimate
            outcome.estimated = True
        return web.Response(body=body, status=200,
                            headers=self._response_headers(resp, admission))

    async def _stream(self, request: web.Request, up: Upstream, resp: UpstreamResponse,
                      first: bytes, admission: Admission, outcome: Outcome,
                      client_wants_usage: bool,
                      prepared: web.StreamResponse | None) -> web.StreamResponse:
        scanner = StreamScanner(strip_usage=not client_wants_usage)
        out = prepared
        if out is None:
            out = web.StreamResponse(status=200, headers=self._response_headers(resp, admission))
            if "Content-Type" not in out.headers:
                out.headers.update(SSE_HEADERS)
        outcome.status = 200
        self.active_streams += 1
        read = resp.readany
        try:
            if not out.prepared:
                await out.prepare(request)  # may find the client already gone
            chunk = scanner.feed(first)
            if chunk:
                await out.write(chunk)
            outcome.ttfb_s = time.perf_counter() - admission.started
            while data := await read():
                chunk = scanner.feed(data)
                if chunk:
                    await out.write(chunk)
            rest = scanner.flush()
            if rest:
                await out.write(rest)
            outcome.outcome = "ok"
            await out.write_eof()
        except (UpstreamDisconnected, UpstreamReadTimeout) as exc:
            self.router.failure(up, failure_reason(exc))
            outcome.outcome = "upstream_error"
            with contextlib.suppress(ConnectionError):
                await _end_with_error(out, upstream_failure(exc, up).sse_event())
        except ConnectionError:
            outcome.outcome = "client_disconnect"  # our write failed: the client left
        except asyncio.CancelledError:
            outcome.outcome = "client_disconnect"  # the handler was cancelled: it left
            raise
        finally:
            self.active_streams -= 1
            if outcome.outcome != "ok":
                resp.close()
            if scanner.usage is not None:
                _apply_usage(outcome, scanner.usage)
            else:
                outcome.prompt_tokens = admission.call.prompt_tokens_estimate
                outcome.completion_tokens = scanner.estimated_completion_tokens()
                outcome.estimated = True
        return out


def _apply_usage(outcome: Outcome, usage: Any) -> None:
    outcome.prompt_tokens = usage.prompt_tokens
    outcome.completion_tokens = usage.completion_tokens
    outcome.cached_tokens = usage.cached_tokens
    outcome.reasoning_tokens = usage.reasoning_tokens


async def _end_with_error(out: web.StreamResponse, event: bytes) -> None:
    await out.write(event)
    await out.write_eof()


class _Heartbeat:
    """SSE comments while a stream waits for its first upstream byte.

    Armed with a timer per stream; a task exists only once the wait actually
    exceeded the interval, so the fast path creates none.
    """

    __slots__ = ("interval", "request", "response", "task")

    def __init__(self, request: web.Request, interval: float) -> None:
        self.request = request
        self.interval = interval
        self.response: web.StreamResponse | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        response = self.response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        try:
            await response.prepare(self.request)
            while True:
                await response.write(HEARTBEAT)
                await asyncio.sleep(self.interval)
        except ConnectionError:
            return  # the client left; the handler's own cancellation deals with it

    async def stop(self) -> None:
        task = self.task
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
