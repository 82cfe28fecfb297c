"""The runner: ``Server.startup`` → ``serve`` → ``shutdown``, as uvicorn's ``Server``.

Two listeners, two planes:

    data plane     [server] host:port   the lean HTTP/1.1 server alone: /v1/*, /healthz,
                                        /readyz (``http.server``, ``relay``)
    control plane  [console] host:port  aiohttp: /api/*, /metrics (unless [metrics] port
                                        gives it a listener of its own), later the console

Start-up opens the components (``root``), then the listeners; a listener that cannot
open raises ``ListenError`` after what was opened is closed again (``flintproxy serve``
then exits 1 naming the address). Shutdown stops accepting, lets in-flight streams
finish within ``server.shutdown_timeout_s`` and ends those still open with a final SSE
error event (``server_shutting_down``; their usage is recorded), stops the control
plane, cancels the background jobs, then closes the components in reverse order (the
usage writer drained before its connection closes).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

from aiohttp import web

from flintproxy.app.root import Components, open_components
from flintproxy.config import Config
from flintproxy.errors import ListenError
from flintproxy.http.exchange import Exchange, Responder
from flintproxy.http.server import LeanServer
from flintproxy.ops import logfilter
from flintproxy.ops.accesslog import Sink
from flintproxy.ops.health import ReadyEndpoint, healthz
from flintproxy.ops.metrics import MetricsEndpoint
from flintproxy.tasks import TaskGroup
from flintproxy.web.app import create_console_app
from flintproxy.web.console_server import ConsoleLimits, ConsoleRunner

__all__ = ["Server", "serve"]

log = logging.getLogger("flintproxy")

class DataPlane:
    """The lean server's one handler: health here, every other request (404 and 405
    included) to the relay, which knows the route table."""

    def __init__(self, components: Components) -> None:
        self._relay = components.relay.serve
        self._ready = ReadyEndpoint(components.readiness)

    async def __call__(self, exchange: Exchange, out: Responder) -> None:
        path = exchange.path
        if path == "/healthz" and exchange.method == "GET":
            exchange.route = path
            await healthz(exchange, out)
        elif path == "/readyz" and exchange.method == "GET":
            exchange.route = path
            await self._ready(exchange, out)
        else:
            await self._relay(exchange, out)


class Server:
    """The gateway's lifecycle; ``components`` and the addresses once started."""

    def __init__(self, config: Config, access_sink: Sink | None = None,
                 reuse_port: bool = False) -> None:
        self.config = config
        # SO_REUSEPORT on both planes: a worker of ``serve --workers`` (app.supervisor).
        self._reuse_port = reuse_port
        self._access_sink = access_sink
        self._stack = AsyncExitStack()
        self._tasks = TaskGroup()
        self._components: Components | None = None
        self._lean: LeanServer | None = None
        self._runners: list[ConsoleRunner] = []
        self._sites: list[web.TCPSite] = []

    @property
    def components(self) -> Components:
        assert self._components is not None, "Server.startup() first"
        return self._components

    @property
    def addresses(self) -> list[Any]:
        """The data plane's listening addresses."""
        assert self._lean is not None, "Server.startup() first"
        return self._lean.addresses

    @property
    def console_addresses(self) -> list[Any]:
        """The control plane's listening addresses."""
        return list(self._runners[0].addresses) if self._runners else []

    @property
    def metrics_addresses(self) -> list[Any]:
        """/metrics's own listener ([metrics] port), if any."""
        return list(self._runners[1].addresses) if len(self._runners) > 1 else []

    @property
    def data_plane(self) -> LeanServer:
        assert self._lean is not None, "Server.startup() first"
        return self._lean

    # -- startup → serve → shutdown ------------------------------------------------

    async def startup(self, host: str | None = None, port: int | None = None,
                      console_port: int | None = None) -> None:
        """Open every component, then both listeners; on failure, undo what was done."""
        cfg = self.config
        # Before anything can log: no library's record may carry a client address, a
        # header value or body bytes (ops.logfilter).
        logfilter.install()
        try:
            c = self._components = await open_components(cfg, self._stack, self._tasks,
                                                         self._access_sink)
            extra = []
            if cfg.metrics.port is None:
                extra.append(("GET", "/metrics",
                              MetricsEndpoint(c.metrics, cfg.metrics.bearer_token).handle))
            console = create_console_app(cfg, c.accounts, c.guard, c.usage, c.usage_db,
                                         c.billing, [c.metrics.rejected], extra)
            await self._listen(console, cfg.console.host,
                               cfg.console.port if console_port is None else console_port)
            if cfg.metrics.port is not None:
                side = web.Application()
                side.router.add_get("/metrics", MetricsEndpoint(
                    c.metrics, cfg.metrics.bearer_token).handle)
                await self._listen(side, cfg.console.host, cfg.metrics.port)
            self._lean = LeanServer(DataPlane(c), cfg.server, cfg.limits.trusted_proxies)
            await self._lean.start(host or cfg.server.host,
                                   cfg.server.port if port is None else port,
                                   reuse_port=self._reuse_port)
        except BaseException:
            await self.shutdown()
            raise

    async def _listen(self, app: web.Application, host: str, port: int) -> None:
        # access_log=None: aiohttp's default access log records the client IP, which
        # the privacy promises forbid.
        # ConsoleRunner: deadlines for heads and bodies, connection caps, errors in the
        # API's shape and never logged with the request's bytes or the client's address.
        runner = ConsoleRunner(app, ConsoleLimits.from_config(self.config), access_log=None,
                               handler_cancellation=True,
                               shutdown_timeout=self.config.server.shutdown_timeout_s,
                               keepalive_timeout=self.config.server.keepalive_timeout_s)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port, reuse_address=True,
                           reuse_port=self._reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError.of(host, port, exc) from None

    async def serve(self, host: str | None = None, port: int | None = None) -> None:
        """Start, run until SIGINT/SIGTERM, then shut down gracefully."""
        await self.startup(host, port)
        # Start-up objects (config, routes, caches) never die: keep them out of the
        # cyclic GC's generations so its pauses stay short under load.
        gc.freeze()
        # The cyclic GC's pauses are the streams' latency tail, and the hot path leaves
        # no cycles for it to find (tests/http/test_server.py checks). A full collection walks
        # every live object (100-300 ms with 5,000 streams open): it comes after about
        # 10,000 young collections instead of 100. A middle-generation collection walks
        # what survived the young ones since the last (2-7 ms while 1,000 streams open):
        # it runs every other time, so each pause walks at most two young generations'
        # worth (about 1 ms).
        gc.set_threshold(700, 0, 5000)
        self._announce()
        try:
            with _captured_signals() as stop:
                await stop.wait()
        finally:
            log.info("flintproxy shutting down")
            await self.shutdown()

    def _announce(self) -> None:
        for addr in self.addresses:
            log.info("flintproxy data plane (/v1, /healthz, /readyz) listening on http://%s:%s",
                     *addr[:2])
        for addr in self.console_addresses:
            log.info("flintproxy control plane (web console, /api, /metrics) listening on "
                     "http://%s:%s", *addr[:2])
        demo_key = self.components.demo_key
        if demo_key is not None:
            # stdout only, once: plaintext keys never go to the log or to disk.
            cfg = self.config.accounts
            print(f"\nCreated demo account {cfg.demo_email} with ${cfg.demo_credit_usd} of "
                  f"credit. Its API key, shown once:\n{demo_key}\n", flush=True)

    async def shutdown(self) -> None:
        """Finish or cut what is in flight, stop both planes, drain, close (idempotent)."""
        if self._lean is not None:
            await self._lean.shutdown(self.config.server.shutdown_timeout_s)
            self._lean = None
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        await self._tasks.close()
        await self._stack.aclose()


@contextmanager
def _captured_signals() -> Iterator[asyncio.Event]:
    """An event set by SIGINT/SIGTERM; the previous handlers are restored at exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in sigs}
    for sig in sigs:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous[sig])


async def serve(config: Config, host: str | None = None, port: int | None = None,
                access_sink: Sink | None = None, reuse_port: bool = False) -> None:
    """``flintproxy serve``: the gateway until SIGINT/SIGTERM."""
    await Server(config, access_sink, reuse_port).serve(host, port)
