"""The /v1 hot path: parse once, admit, call the upstream (failing over), hand off usage.

Per request: one JSON parse of the body (orjson), the gate's in-memory checks, one
pooled upstream call, and the response forwarded as it arrives. Upstream failures
before the first byte reached the client (connect errors, timeouts, 429, 5xx, a
stream that dies before its first chunk) are retried on the next candidate; after
that, a stream ends with a final SSE error event and the usage seen so far is
still handed off.

Headers cross in both directions through allow-lists (relay.headers).

Bounds: the upstream head (http.client.MAX_HEAD), a non-streaming body
(``server.max_upstream_body_bytes``) and one SSE event (``server.max_sse_event_bytes``);
a breach is a 502, or mid-stream a final error event, with failure reason too_large.

Kept in one reading order (parse, admit, choose and call an upstream, settle); what
becomes of the upstream's response (the stream copied, the body checked, the outcome
set) is ``relay.answer``, its header filters ``relay.headers``, its route table
``relay.routes``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote

import orjson

from flintproxy.config import Config
from flintproxy.errors import (
    BadRequest,
    FlintError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    UnsupportedMediaType,
    UpstreamError,
)
from flintproxy.gate.bounds import with_limit
from flintproxy.gate.gate import Admission, Ending, Gate, Outcome, parse_call
from flintproxy.http.client import (
    UpstreamClient,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamReadTimeout,
    UpstreamResponse,
)
from flintproxy.http.exchange import Exchange, Responder
from flintproxy.http.heartbeat import Heartbeat, Heartbeats
from flintproxy.relay.answer import (
    Answer,
    StreamGauge,
    client_left,
    failure_reason,
    upstream_failure,
)
from flintproxy.relay.formats import (
    OPENAI_NATIVE,
    STORED_STATE,
    error_event,
    error_response,
    provider_storage,
    translation,
    upstream_endpoint,
)
from flintproxy.relay.headers import request_head
from flintproxy.relay.routes import (
    MODEL_ROUTE,
    PATHS,
    ROUTES,
    STORED_RESPONSE_ROUTE,
    match_route,
    new_request_id,
)
from flintproxy.relay.routing import Router, Upstream
from flintproxy.relay.translate import Translation

log = logging.getLogger("flintproxy")

JSON_HEAD = b"Content-Type: application/json\r\n"
MAX_REQUEST_ID = 128


def _encode(data: dict[str, Any]) -> bytes:
    """The request body re-encoded; a nesting orjson cannot write is the client's 400."""
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        raise BadRequest("The request body is nested too deeply.") from None


def _client_request_id(exchange: Exchange) -> str | None:
    given = exchange.header(b"x-request-id")
    if given and len(given) <= MAX_REQUEST_ID and given.isprintable() and given.isascii():
        return given
    return None


def _ask_for_usage(body: bytes) -> bytes:
    """``body`` (a JSON object without "stream_options") asking for usage in the stream."""
    i = body.index(b"{") + 1
    rest = body[i:]
    sep = b"" if rest.lstrip()[:1] == b"}" else b","
    return body[:i] + b'"stream_options":{"include_usage":true}' + sep + rest


def _json_content_type(value: bytes | None) -> bool:
    return value is not None and value.partition(b";")[0].strip().lower() == b"application/json"


# Endpoints whose streams report usage only when asked (stream_options.include_usage).
_USAGE_OPTION = frozenset(("chat/completions", "completions"))

RefusalObserver = Callable[[Exchange, FlintError], None]


class Relay:
    """The /v1 routes (``ROUTES``), bound to one pooled upstream client.

    ``serve`` is the data plane's handler for these routes: the lean server
    (``http.server``) calls it for every /v1 request it parses.
    """

    def __init__(self, config: Config, router: Router, gate: Gate, client: UpstreamClient,
                 heartbeats: Heartbeats, streams: StreamGauge,
                 refusal_observers: Sequence[RefusalObserver] = ()) -> None:
        self.config = config
        self.router = router
        self.gate = gate
        self.client = client
        self.max_body = config.server.max_body_bytes
        self.max_upstream_body = config.server.max_upstream_body_bytes
        self.heartbeats = heartbeats
        self.streams = streams  # open now (the answer counts them; metrics read them)
        self.answer = Answer(router, streams, config.server.max_sse_event_bytes)
        # Anthropic upstreams beside OpenAI-compatible ones: candidates are filtered by
        # what their kind serves (relay.formats); without, chat and kin skip that.
        self.mixed_kinds = any(up.anthropic for up in router.upstreams)
        # The one kind of a model's upstreams, when they share one: whether they serve
        # an endpoint is then one look-up, not a pass over the candidates per request.
        kinds = {model: {up.kind for tier in tiers for up in tier}
                 for model, tiers in router.by_model.items()}
        self.one_kind = {model: next(iter(k)) for model, k in kinds.items() if len(k) == 1}
        # Told of every error response of a request the gate did not admit (metrics,
        # access log); admitted requests are accounted for once, by the gate's finish.
        self.refusal_observers = tuple(refusal_observers)

    async def serve(self, exchange: Exchange, out: Responder) -> None:
        """Answer one request for a route in ``ROUTES``; errors are rendered OpenAI-shaped."""
        try:
            route = exchange.method, exchange.path
            if route not in ROUTES:
                named = match_route(exchange.method, exchange.path)
                if named == MODEL_ROUTE:
                    exchange.route = named
                    await self.model(exchange, out)
                    return
                if named == STORED_RESPONSE_ROUTE:
                    exchange.route = named
                    await self.gate.authenticate(exchange)
                    raise BadRequest(STORED_STATE, code="provider_storage_disabled")
                if exchange.path in PATHS:
                    raise MethodNotAllowed(
                        f"Method {exchange.method} is not allowed for {exchange.path}.")
                raise NotFound(f"Unknown request URL: {exchange.method} {exchange.path}.")
            exchange.route = exchange.path
            endpoint = ROUTES[route]
            if endpoint is None:
                await self.models(exchange, out)
            else:
                await self.proxy(exchange, out, endpoint)
        except FlintError as exc:
            self.refuse(exchange, out, exc)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            # Never the request itself in the log: only where it failed.
            log.exception("unhandled error in %s %s", exchange.method, exchange.route)
            self.refuse(exchange, out, FlintError(
                "The server had an error processing your request."))

    def refuse(self, exchange: Exchange, out: Responder, err: FlintError) -> None:
        """Answer with ``err``, and tell the observers unless the gate admitted the request."""
        call = exchange.call
        if call is None or not call.admitted:
            for observe in self.refusal_observers:
                observe(exchange, err)
        if out.started:
            raise ConnectionAbortedError("an error after the response began")
        status, body = error_response(exchange.route, err)
        out.respond(status, err.head(), body)

    async def models(self, exchange: Exchange, out: Responder) -> None:
        """``GET /v1/models``: the models this key may use, in OpenAI's list shape, or
        in Anthropic's for a client that speaks it (the anthropic SDK's ``models.list``
        sends ``anthropic-version``): one page, ``has_more`` false."""
        principal = await self.gate.authenticate(exchange)
        allowed = self.gate.allowed_models(principal)
        names = [m for m in self.router.models if allowed is None or m in allowed]
        if exchange.header(b"anthropic-version") is not None:
            body: dict[str, Any] = {
                "data": [_anthropic_model(m) for m in names], "has_more": False,
                "first_id": names[0] if names else None,
                "last_id": names[-1] if names else None}
        else:
            body = {"object": "list", "data": [_model_object(m) for m in names]}
        out.respond(200, JSON_HEAD, orjson.dumps(body))

    async def model(self, exchange: Exchange, out: Responder) -> None:
        """``GET /v1/models/{id}``: one model, as OpenAI answers it (as Anthropic does
        for a client that sends ``anthropic-version``); 404 if this key cannot use it
        (an unknown model and a forbidden one look alike)."""
        principal = await self.gate.authenticate(exchange)
        model = unquote(exchange.path[len("/v1/models/"):])
        allowed = self.gate.allowed_models(principal)
        if model not in self.router.by_model or (allowed is not None and model not in allowed):
            raise ModelNotFound(
                f"The model `{model[:256]}` does not exist or you do not have access to it.",
                param="model")
        shape = (_anthropic_model if exchange.header(b"anthropic-version") is not None
                 else _model_object)
        out.respond(200, JSON_HEAD, orjson.dumps(shape(model)))

    # -- the relay ----------------------------------------------------------------

    async def proxy(self, exchange: Exchange, out: Responder, endpoint: str) -> None:
        started = time.perf_counter()
        started_ms = time.time_ns() // 1_000_000
        principal = await self.gate.authenticate(exchange)
        if exchange.too_large:
            raise PayloadTooLarge(f"Request body exceeds {self.max_body} bytes.")
        if not _json_content_type(exchange.headers.get(b"content-type")):
            raise UnsupportedMediaType("Content-Type must be application/json.")
        body = exchange.body
        call, data = parse_call(endpoint, body, new_request_id(), _client_request_id(exchange))
        exchange.call = call
        allowed = self.gate.allowed_models(principal)
        if allowed is not None and call.model not in allowed:
            raise PermissionDenied(f"This API key may not use the model `{call.model}`.",
                                   param="model", code="model_not_allowed")
        candidates = self.router.candidates(call.model)
        if self.mixed_kinds or endpoint not in OPENAI_NATIVE:  # else every one serves it
            kind = self.one_kind.get(call.model)
            if kind is None or upstream_endpoint(endpoint, kind) is None:
                candidates = self._serving(candidates, endpoint, call.model)
        price = self.config.models.get(call.model)
        body = provider_storage(endpoint, data, body,
                                price is not None and price.allow_provider_storage)
        client_wants_usage = False
        if call.stream and endpoint in _USAGE_OPTION:
            opts = data.get("stream_options")
            client_wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            if not client_wants_usage:
                absent = "stream_options" not in data
                data["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                          "include_usage": True}
                # When absent it is spliced in: re-encoding a long prompt costs far more.
                body = _ask_for_usage(body) if absent else _encode(data)
        admission = await self.gate.admit(exchange, call, principal, started, started_ms)
        outcome = Outcome(status=500, outcome=Ending.ERROR)
        try:
            body = with_limit(data, body, admission.limit)  # held to what was reserved
            head = b"X-Request-Id: " + call.trace_id.encode("ascii") + b"\r\n"
            await self._forward(out, exchange, admission, candidates, data, body, head,
                                client_wants_usage, outcome)
        except asyncio.CancelledError:
            client_left(outcome, out)
            if not outcome.prompt_tokens:  # gone before any usage: charge the estimate
                outcome.prompt_tokens = call.prompt_tokens_estimate
                outcome.estimated = True
            raise
        except FlintError as exc:
            outcome.status = exc.status
            outcome.outcome = (Ending.UPSTREAM_ERROR if isinstance(exc, UpstreamError)
                               else Ending.ERROR)
            # Admitted: the error carries the limits and the id, as a success would.
            exc.headers = {**admission.headers, **exc.headers, "x-request-id": call.trace_id}
            raise
        finally:
            outcome.duration_s = time.perf_counter() - started
            self.gate.finish(admission, outcome)

    @staticmethod
    def _serving(candidates: list[Upstream], endpoint: str, model: str) -> list[Upstream]:
        """The candidates whose kind serves ``endpoint`` (natively or translated)."""
        serving = [up for up in candidates if upstream_endpoint(endpoint, up.kind) is not None]
        if not serving:
            raise BadRequest(f"The model `{model}` is not served on this endpoint: its "
                             f"upstreams speak another API ({candidates[0].kind}).",
                             param="model", code="unsupported_endpoint")
        return serving

    def _body_for(self, up: Upstream, data: dict[str, Any], body: bytes, model: str,
                  conv: Translation | None) -> bytes:
        mapped = up.upstream_model(model)
        if conv is not None:
            return conv.request(data, mapped)
        if mapped != model:
            return _encode({**data, "model": mapped})
        return body

    async def _attempt(self, up: Upstream, endpoint: str, body: bytes, head: bytes, own: bytes,
                       stream: bool) -> tuple[UpstreamResponse, bytes]:
        """One upstream call up to its first byte (stream) or whole body (non-stream)."""
        # The upstream's own headers (its key) after the client's: per attempt, so a
        # retry never carries the previous upstream's key.
        resp = await self.client.post(up.targets[endpoint], head + own, body,
                                      up.cfg.connect_timeout_s, up.cfg.read_timeout_s)
        try:
            if resp.status != 200 or not stream:
                return resp, await resp.read(self.max_upstream_body)
            first = await resp.readany()
            if stream and not first:
                raise UpstreamDisconnected("stream ended before its first byte")
            return resp, first
        except BaseException:
            resp.close()
            raise

    async def _forward(self, out: Responder, exchange: Exchange, admission: Admission,
                       candidates: list[Upstream], data: dict[str, Any], body: bytes,
                       head: bytes, client_wants_usage: bool, outcome: Outcome) -> None:
        call = admission.call
        beat: Heartbeat | None = None
        if call.stream:
            beat = self.heartbeats.watch(out)
        error: UpstreamError | None = None
        resp: UpstreamResponse | None = None
        conv: Translation | None = None
        first = b""
        up = candidates[0]
        connection = exchange.headers.get(b"connection")
        wait_started = time.perf_counter()
        try:
            for i, up in enumerate(candidates):
                conv = translation(call.endpoint, up.kind, call.model, client_wants_usage)
                send = self._body_for(up, data, body, call.model, conv)  # before begin
                self.router.begin(up)
                own = up.bare_head if b"anthropic-version" in exchange.headers else up.head
                try:
                    resp, first = await self._attempt(
                        up, conv.upstream_endpoint if conv else call.endpoint, send,
                        request_head(exchange.raw_headers, up, connection) + head, own,
                        call.stream)
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
            if beat is not None:
                await self.heartbeats.stop(beat)
        outcome.upstream = up.name
        outcome.upstream_wait_s = time.perf_counter() - wait_started
        if resp is None:
            assert error is not None
            if not out.started:
                try:
                    raise error
                finally:
                    error = None  # the frame in its traceback must not hold it: a cycle
            outcome.status, outcome.outcome = error.status, Ending.UPSTREAM_ERROR
            await out.end(error_event(call.endpoint, error))
            return
        try:
            if resp.status != 200:
                await self.answer.upstream_error(out, resp, first, admission, outcome, conv)
            elif not call.stream:
                self.answer.plain(out, up, resp, first, admission, outcome, conv)
            else:
                await self.answer.stream(out, up, resp, first, admission, outcome,
                                         client_wants_usage, conv)
        finally:
            resp.release()


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "flintproxy"}


def _anthropic_model(model: str) -> dict[str, Any]:
    return {"type": "model", "id": model, "display_name": model,
            "created_at": "1970-01-01T00:00:00Z"}
