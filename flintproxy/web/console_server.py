"""The control plane's listener: aiohttp's server with deadlines and connection caps.

aiohttp bounds nothing a slow client does: ``POST /api/login`` with
``Content-Length: 100`` and no body held its connection (and a descriptor) for as
long as the client liked, and a hundred such clients starved the whole process of
descriptors, the data plane's included. ``ConsoleRunner`` serves the console through
``GuardedHandler``, aiohttp's ``RequestHandler`` with:

- a head deadline: a request's line and headers must arrive within
  ``console.head_timeout_s`` of the connection opening or of the previous response
  (so an idle keep-alive connection closes after that time too);
- a body deadline: once a head is in, its body must arrive within
  ``console.body_timeout_s``;
- caps: ``console.max_connections`` open connections, ``max_connections_per_ip`` per
  client address (IPv6 per /64; trusted proxies count only towards the global cap).
  A connection over a cap gets a 503 in the API's error shape and is closed.

One timer per connection, re-armed per request: nothing per byte. Errors aiohttp
answers itself (malformed requests) are rendered in the API's error shape and never
logged with the request's bytes or the client's address; every response says
``Server: flintproxy``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.web_request import BaseRequest

from flintproxy.config import Config
from flintproxy.errors import BadRequest, FlintError, ServiceUnavailable
from flintproxy.gate.ipguard import Network, ip_bucket, is_trusted_proxy
from flintproxy.web.console import SECURITY_HEADERS

__all__ = ["SERVER_HEADER", "ConsoleLimits", "ConsoleRunner", "GuardedHandler"]

log = logging.getLogger("flintproxy.web.console")

SERVER_HEADER = "flintproxy"


@dataclass(frozen=True, slots=True)
class ConsoleLimits:
    head_timeout_s: float
    body_timeout_s: float
    max_connections: int
    max_connections_per_ip: int
    trusted_proxies: tuple[Network, ...] = ()

    @classmethod
    def from_config(cls, cfg: Config) -> ConsoleLimits:
        c = cfg.console
        return cls(c.head_timeout_s, c.body_timeout_s, c.max_connections,
                   c.max_connections_per_ip, cfg.limits.trusted_proxies)


def _canned(err: FlintError) -> bytes:
    body = err.body()
    security = "".join(f"{k}: {v}\r\n" for k, v in SECURITY_HEADERS.items())
    return (f"HTTP/1.1 {err.status} Service Unavailable\r\nServer: {SERVER_HEADER}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{security}"
            "Retry-After: 1\r\nConnection: close\r\n\r\n").encode() + body


_TOO_MANY = _canned(ServiceUnavailable(
    "Too many connections to the console; please retry shortly.", code="too_many_connections"))


class _Counts:
    """Open connections: in total and per client address (in memory only)."""

    __slots__ = ("per_ip", "total")

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: dict[str, int] = {}


class GuardedHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler with the deadlines and caps of the module docstring."""

    def __init__(self, manager: ConsoleServer, *, limits: ConsoleLimits, counts: _Counts,
                 **kwargs: Any) -> None:
        # After an answer given without reading the body (a 401, a 429), aiohttp
        # reads ("lingers" on) the rest for up to 10 s: no longer than a body may take.
        kwargs["lingering_time"] = min(10.0, limits.body_timeout_s)
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._counts = counts
        self._bucket: str | None = None  # counted under this address (None: not counted)
        self._counted = False
        self._head_by = 0.0
        self._body_by = 0.0
        self._watch: asyncio.TimerHandle | None = None

    # -- caps --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        lim, counts = self._limits, self._counts
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else None
        bucket = None
        if isinstance(host, str) and not is_trusted_proxy(host, lim.trusted_proxies):
            bucket = ip_bucket(host)
        if counts.total >= lim.max_connections or (
                bucket is not None and counts.per_ip.get(bucket, 0) >= lim.max_connections_per_ip):
            # Refused before aiohttp sees it: no task, no parser work, no log line.
            self._manager = None  # connection_lost: nothing to undo
            self._force_close = True  # data_received: ignore whatever comes
            tr: Any = transport
            tr.write(_TOO_MANY)
            tr.close()
            return
        counts.total += 1
        if bucket is not None:
            counts.per_ip[bucket] = counts.per_ip.get(bucket, 0) + 1
        self._bucket, self._counted = bucket, True
        super().connection_made(transport)
        self._head_by = self._loop.time() + lim.head_timeout_s
        self._arm(self._head_by)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            counts, bucket = self._counts, self._bucket
            counts.total -= 1
            if bucket is not None:
                left = counts.per_ip.get(bucket, 1) - 1
                if left > 0:
                    counts.per_ip[bucket] = left
                else:
                    counts.per_ip.pop(bucket, None)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        super().connection_lost(exc)

    # -- deadlines ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a head is in: its body has its own deadline
            self._body_by = self._loop.time() + self._limits.body_timeout_s
            self._arm(self._body_by)

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        self._head_by = self._loop.time() + self._limits.head_timeout_s
        self._arm(self._head_by)
        return result

    def _arm(self, when: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._watch = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._watch = None
        if self._force_close or self.transport is None:
            return
        now = self._loop.time()
        waiter = self._waiter
        if waiter is not None and not waiter.done():  # awaiting (the rest of) a head
            if now >= self._head_by:
                self.force_close()
            else:
                self._arm(self._head_by)
            return
        request = self._current_request
        if request is not None and not request.content.is_eof():  # awaiting its body
            if now >= self._body_by:
                self.force_close()  # the handler's read is cancelled with the connection
            else:
                self._arm(self._body_by)
        # Otherwise a handler is at work with its body in: finish_response re-arms.

    # -- errors aiohttp answers itself ---------------------------------------------

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Malformed requests and handler failures, in the API's error shape.

        aiohttp logs these with the client's address and a traceback quoting the
        request's bytes, and echoes the parser's message: neither happens here.
        """
        if status >= 500:
            log.error("console: unhandled %s", type(exc).__name__ if exc else "error")
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        err = (BadRequest("The request could not be parsed as HTTP/1.1.", code="bad_request")
               if status < 500 else
               FlintError("The server had an error processing your request."))
        err.status = status
        resp = web.Response(status=status, body=err.body(), content_type="application/json",
                            headers={"Server": SERVER_HEADER, **SECURITY_HEADERS})
        resp.force_close()
        return resp


class ConsoleServer(web.Server):
    """aiohttp's low-level server making ``GuardedHandler`` connections."""

    def __init__(self, base: web.Server, limits: ConsoleLimits) -> None:
        super().__init__(base.request_handler, request_factory=base.request_factory,
                         handler_cancellation=base.handler_cancellation, loop=base._loop,
                         **base._kwargs)
        self._limits = limits
        self._counts = _Counts()

    def __call__(self) -> GuardedHandler:
        return GuardedHandler(self, loop=self._loop, limits=self._limits,
                              counts=self._counts, **self._kwargs)

    @property
    def open_connections(self) -> int:
        return self._counts.total


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER  # not "Python/3.11 aiohttp/..."


class ConsoleRunner(web.AppRunner):
    """``web.AppRunner`` serving through ``ConsoleServer``; use it as AppRunner."""

    def __init__(self, app: web.Application, limits: ConsoleLimits, **kwargs: Any) -> None:
        app.on_response_prepare.append(_server_header)
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        return ConsoleServer(await super()._make_server(), self._limits)
