"""The aiohttp application: ``create_app(config)``, its resources and the error middleware.

Each resource has one cleanup context that opens it, yields, then closes it and
drains whatever background work it owns; the order of ``cleanup_ctx`` is the
order of start-up, reversed at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import aiosqlite
import orjson
from aiohttp import web

from flintproxy import store
from flintproxy.api import add_api_routes
from flintproxy.auth import DEMO_KEY, accounts_ctx
from flintproxy.config import Config
from flintproxy.errors import FlintError, MethodNotAllowed, NotFound, PayloadTooLarge
from flintproxy.gate import Gate
from flintproxy.relay import Relay
from flintproxy.routing import Router
from flintproxy.service import ServiceGate, service_ctx
from flintproxy.usage import add_usage_routes, usage_ctx

log = logging.getLogger("flintproxy")

CONFIG = web.AppKey("config", Config)
DB = web.AppKey("db", aiosqlite.Connection)
ROUTER = web.AppKey("router", Router)
RELAY = web.AppKey("relay", Relay)
GATE = web.AppKey("gate", Gate)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: FlintError) -> web.Response:
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json",
                        headers=exc.headers)


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
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(exc, request))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        # Never the request itself in the log: only where it failed.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(FlintError("The server had an error processing your request."))


async def db_ctx(app: web.Application) -> AsyncIterator[None]:
    db = await store.open_store(app[CONFIG].storage.path)
    app[DB] = db
    yield
    await db.close()


async def client_session_ctx(app: web.Application) -> AsyncIterator[None]:
    # One pooled session for all upstream traffic. No connection cap: thousands
    # of concurrent streams each hold one; keep-alive reuses them.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
        read_bufsize=2**16,
    )
    app[RELAY].session = session
    yield
    await session.close()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=lambda o: orjson.dumps(o).decode())


async def readyz(request: web.Request) -> web.Response:
    checks = {"upstream": request.app[ROUTER].any_healthy()}
    ready = all(checks.values())
    return web.Response(
        status=200 if ready else 503,
        body=orjson.dumps({"ready": ready, "checks": checks}),
        content_type="application/json",
    )


def create_app(config: Config, gate: Gate | None = None) -> web.Application:
    """Build the gateway application; nothing runs until it is started."""
    app = web.Application(middlewares=[errors_middleware],
                          client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    router = app[ROUTER] = Router(config)
    gate = gate or ServiceGate(config)
    app[GATE] = gate
    relay = app[RELAY] = Relay(config, router, gate)
    app.cleanup_ctx.append(db_ctx)  # migrations run here, before anyone else connects
    app.cleanup_ctx.append(accounts_ctx)  # accounts, key cache, change watcher
    app.cleanup_ctx.append(usage_ctx)  # balances, usage writer (drained at exit), retention
    app.cleanup_ctx.append(service_ctx)
    app.cleanup_ctx.append(client_session_ctx)
    add_api_routes(app)
    add_usage_routes(app)
    app.router.add_post("/v1/chat/completions", relay.chat_completions)
    app.router.add_post("/v1/completions", relay.completions)
    app.router.add_post("/v1/embeddings", relay.embeddings)
    app.router.add_get("/v1/models", relay.models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving ``app``; the caller owns the returned runner (``await runner.cleanup()``)."""
    # access_log=None: aiohttp's default access log records the client IP, which
    # the privacy promises forbid. handler_cancellation: a client that goes away
    # cancels its handler, which closes the upstream request at once.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           shutdown_timeout=app[CONFIG].server.shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    return runner


async def serve(config: Config, host: str | None = None, port: int | None = None) -> None:
    """Run the gateway until SIGINT/SIGTERM, then shut down gracefully."""
    app = create_app(config)
    host = host or config.server.host
    port = config.server.port if port is None else port
    runner = await start(app, host, port)
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
