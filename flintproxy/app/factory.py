"""The application: ``create_app(config)``, its resources, the error middleware, and
``start``/``serve``.

Each resource has one cleanup context that opens it, yields, then closes it and
drains whatever background work it owns; the order of ``cleanup_ctx`` is the
order of start-up, reversed at shutdown.

Two servers share the port (``Runner``): the lean one (``server``) answers /v1 and
hands every other connection to aiohttp, which also answers /v1 on those
(``v1_route``, through ``AiohttpResponder``); both end in ``Relay.serve``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiosqlite
import orjson
from aiohttp import web
from multidict import CIMultiDict

from flintproxy.config import Config
from flintproxy.errors import FlintError, MethodNotAllowed, NotFound, PayloadTooLarge
from flintproxy.gate.gate import Exchange, Gate
from flintproxy.gate.keys import DEMO_KEY, accounts_ctx
from flintproxy.gate.service import ServiceGate, service_ctx
from flintproxy.http.client import UpstreamClient
from flintproxy.http.server import LeanServer
from flintproxy.ops import accesslog
from flintproxy.ops.accesslog import AccessLog
from flintproxy.ops.health import health_ctx, readyz
from flintproxy.ops.metrics import Metrics, add_metrics
from flintproxy.relay.relay import ROUTES, Relay
from flintproxy.relay.routing import Router
from flintproxy.store import sqlite
from flintproxy.store.ledger import add_usage_routes, usage_ctx
from flintproxy.web.api import add_api_routes

log = logging.getLogger("flintproxy")

CONFIG = web.AppKey("config", Config)
DB = web.AppKey("db", aiosqlite.Connection)
ROUTER = web.AppKey("router", Router)
RELAY = web.AppKey("relay", Relay)
GATE = web.AppKey("gate", Gate)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Told of every error response of a request the gate did not admit (metrics, access
# log); admitted requests are accounted for once, by the gate's finish. The same
# list serves /v1 (Relay.refusal_observers) and aiohttp's routes.
REFUSAL_OBSERVERS = web.AppKey("flint.refusal_observers",
                               list[Callable[[Exchange, FlintError], None]])


def error_response(exc: FlintError) -> web.Response:
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json",
                        headers=exc.headers)


def _refused(request: web.Request, err: FlintError) -> web.Response:
    observers = request.app.get(REFUSAL_OBSERVERS, ())
    if observers:
        exchange = exchange_of(request)
        for observe in observers:
            observe(exchange, err)
    return error_response(err)


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> FlintError:
    if exc.status == 404:
        return NotFound(f"Unknown request URL: {request.method} {request.path}.")
    if exc.status == 405:
        return MethodNotAllowed(f"Method {request.method} is not allowed for {request.path}.")
    if exc.status == 413:
        return PayloadTooLarge("Request body is too large.")
    err = FlintError(exc.reason or "error", code=None)
    err.status = exc.status
    err.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return err


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error OpenAI-shaped: ``{"error": {message, type, param, code}}``."""
    try:
        return await handler(request)
    except FlintError as exc:
        return _refused(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _refused(request, _from_http_exception(exc, request))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        # Never the request itself in the log: only where it failed.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _refused(request, FlintError("The server had an error processing your request."))


async def db_ctx(app: web.Application) -> AsyncIterator[None]:
    db = await sqlite.open_store(app[CONFIG].storage.path)
    app[DB] = db
    yield
    await db.close()


async def upstream_client_ctx(app: web.Application) -> AsyncIterator[None]:
    # One pool of keep-alive connections for all upstream traffic, unbounded:
    # thousands of concurrent streams each hold one.
    client = UpstreamClient()
    app[RELAY].client = client
    yield
    client.close()
    app[RELAY].heartbeats.close()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=lambda o: orjson.dumps(o).decode())


def create_app(config: Config, gate: Gate | None = None) -> web.Application:
    """Build the gateway application; nothing runs until it is started."""
    app = web.Application(middlewares=[errors_middleware],
                          client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    router = app[ROUTER] = Router(config)
    gate = gate or ServiceGate(config)
    app[GATE] = gate
    relay = app[RELAY] = Relay(config, router, gate)
    metrics = Metrics(config, router, relay)
    refusals = relay.refusal_observers
    refusals.append(metrics.rejected)
    app[REFUSAL_OBSERVERS] = refusals
    if isinstance(gate, ServiceGate):
        gate.finish_observers.append(metrics.finished)
    if config.metrics.access_log:
        access = app[accesslog.ACCESS_LOG] = AccessLog(config)
        refusals.append(access.rejected)
        if isinstance(gate, ServiceGate):
            gate.finish_observers.append(access.finished)
        app.cleanup_ctx.append(accesslog.flush_periodically)
    app.cleanup_ctx.append(db_ctx)  # migrations run here, before anyone else connects
    app.cleanup_ctx.append(accounts_ctx)  # accounts, key cache, change watcher
    app.cleanup_ctx.append(usage_ctx)  # balances, usage writer (drained at exit), retention
    app.cleanup_ctx.append(service_ctx)
    app.cleanup_ctx.append(health_ctx)
    app.cleanup_ctx.append(upstream_client_ctx)
    add_api_routes(app)
    add_usage_routes(app)
    # Served by the lean server (``server``); here for connections aiohttp serves.
    for method, path in ROUTES:
        app.router.add_route(method, path, v1_route)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_metrics(app, config, metrics)  # /metrics here or on its own port; after usage_ctx
    return app


class Runner:
    """The gateway's servers, started and stopped together; ``addresses`` and
    ``cleanup()`` as on aiohttp's AppRunner."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        config = app[CONFIG].server
        # access_log=None: aiohttp's default access log records the client IP, which
        # the privacy promises forbid. handler_cancellation: a client that goes away
        # cancels its handler, which closes the upstream request at once.
        self.aiohttp = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=config.shutdown_timeout_s,
                                     keepalive_timeout=config.keepalive_timeout_s)
        self._config = config
        self.lean: LeanServer | None = None

    async def start(self, host: str, port: int) -> None:
        await self.aiohttp.setup()  # the app's start-up: cleanup contexts enter
        server = self.aiohttp.server
        assert server is not None
        self.lean = LeanServer(self.app[RELAY].serve, ROUTES, self._config, server)
        await self.lean.start(host, port)

    @property
    def addresses(self) -> list[Any]:
        assert self.lean is not None
        return self.lean.addresses

    async def cleanup(self) -> None:
        """Finish or cut what is in flight, then the app's cleanup (usage drained last)."""
        if self.lean is not None:
            await self.lean.shutdown(self._config.shutdown_timeout_s)
        await self.aiohttp.cleanup()


# -- /v1 on connections aiohttp serves ------------------------------------------------


async def v1_route(request: web.Request) -> web.StreamResponse:
    """A /v1 route on a connection handed over to aiohttp (see ``server``)."""
    relay = request.app[RELAY]
    responder = AiohttpResponder(request)
    await relay.serve(await exchange_from(request, relay.max_body), responder)
    return responder.response()


def exchange_of(request: web.Request, body: bytes = b"", too_large: bool = False
                ) -> Exchange:
    """An aiohttp request as an Exchange."""
    info = request.match_info.route.resource
    route = info.canonical if info is not None else None
    return Exchange(request.method, request.path, route, list(request.raw_headers),
                    request.remote, body, too_large)


async def exchange_from(request: web.Request, max_body: int) -> Exchange:
    """An aiohttp request as an Exchange, with its body (not read when too large)."""
    if request.content_length is not None and request.content_length > max_body:
        return exchange_of(request, too_large=True)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return exchange_of(request, too_large=True)
    return exchange_of(request, body)


def _headers(head: bytes) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for line in head.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            headers.add(name.decode("latin-1"), value.strip().decode("latin-1"))
    return headers


class AiohttpResponder:
    """The Responder of a /v1 request on a connection aiohttp serves."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self._response: web.Response | None = None
        self._stream: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self._stream is not None

    def respond(self, status: int, head: bytes, body: bytes) -> None:
        self._response = web.Response(status=status, body=body, headers=_headers(head))

    async def stream(self, status: int, head: bytes, first: bytes = b"",
                     end: bool = False) -> None:
        response = self._stream = web.StreamResponse(status=status, headers=_headers(head))
        await response.prepare(self.request)
        if first:
            await response.write(first)
        if end:
            await response.write_eof()

    async def write(self, data: bytes) -> None:
        assert self._stream is not None
        await self._stream.write(data)

    async def end(self, last: bytes = b"") -> None:
        assert self._stream is not None
        if last:
            await self._stream.write(last)
        await self._stream.write_eof()

    def response(self) -> web.StreamResponse:
        """What the aiohttp handler returns."""
        response = self._stream or self._response
        assert response is not None, "the request was not answered"
        return response


async def start(app: web.Application, host: str, port: int) -> Runner:
    """Start serving ``app``; the caller owns the returned runner (``await runner.cleanup()``)."""
    runner = Runner(app)
    await runner.start(host, port)
    return runner


async def serve(config: Config, host: str | None = None, port: int | None = None) -> None:
    """Run the gateway until SIGINT/SIGTERM, then shut down gracefully."""
    app = create_app(config)
    access = app.get(accesslog.ACCESS_LOG)  # only with [metrics] access_log = true
    if access is not None:
        # create_app leaves it off: only the process that owns stdout writes there.
        access.sink = sys.stdout.buffer
    host = host or config.server.host
    port = config.server.port if port is None else port
    runner = await start(app, host, port)
    # Start-up objects (config, routes, caches) never die: keep them out of the
    # cyclic GC's generations so its pauses stay short under load.
    gc.freeze()
    # The cyclic GC's pauses are the streams' latency tail, and the hot path leaves
    # no cycles for it to find (tests/test_server.py checks). A full collection walks
    # every live object (100-300 ms with 5,000 streams open): it comes after about
    # 10,000 young collections instead of 100. A middle-generation collection walks
    # what survived the young ones since the last (2-7 ms while 1,000 streams open):
    # it runs every other time, so each pause walks at most two young generations'
    # worth (about 1 ms).
    gc.set_threshold(700, 0, 5000)
    for addr in runner.addresses:
        log.info("flintproxy listening on http://%s:%s", *addr[:2])
    demo_key = app.get(DEMO_KEY)
    if demo_key is not None:
        # stdout only, once: plaintext keys never go to the log or to disk.
        print(f"\nCreated demo account {config.accounts.demo_email} with "
              f"${config.accounts.demo_credit_usd} of credit. Its API key, shown once:\n"
              f"{demo_key}\n", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("flintproxy shutting down")
        await runner.cleanup()
