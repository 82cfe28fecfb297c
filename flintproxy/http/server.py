"""The lean HTTP/1.1 server: the data plane's one server (/v1, /healthz, /readyz).

Why not aiohttp for /v1: its per-request machinery (request and response objects,
the middleware chain, a task per request, header multidicts) cost more CPU than
the rest of a relayed request together (bench/hotpath.py). Here, per connection,
llhttp (httptools, as in uvicorn) parses in C, and one task serves the
connection's requests in order; a response is one ``transport.write``.

Every request goes to the one handler, whatever its route: the handler answers
404 and 405 too. The control plane (/api, /metrics, the console) is aiohttp's, on a
port of its own; no connection is ever shared between the two.

Hostile clients meet limits, each checked once per connection, message or read,
never per byte or chunk:

- a request head of at most MAX_HEAD bytes and MAX_HEADER_LINES lines (431); a body
  over the configured maximum is not kept (413 once authenticated, then the
  connection closes); chunked trailers are never headers (dropped, and counted
  against MAX_HEAD);
- deadlines, checked by one sweep a second rather than a timer per request: a head
  must arrive within ``head_timeout_s``, a body within ``body_timeout_s`` (408, then
  close); an idle connection closes after ``keepalive_timeout_s``; a client that
  reads nothing of what is written to it for ``write_timeout_s`` is cut (the relay
  then bills what was relayed, as for any client that leaves);
- pipelined requests are answered in order; at most MAX_PIPELINED of them or
  MAX_QUEUED_BYTES of their bodies wait before reading pauses, and a response waits
  for the client to read the previous one;
- ``max_connections`` and ``max_connections_per_ip``: a connection over a cap is
  answered 503 (OpenAI's error shape) and closed;
- ``100 Continue`` is sent only when the request is the next to be answered and no
  response is being written (never into another response).

Shutdown stops accepting, lets the requests being answered finish within the grace
period, then ends each stream still open with a final SSE error event
(``server_shutting_down``) and a proper end of its chunked body.

An ``Upgrade`` (h2c from ``curl --http2``) is ignored, as RFC 9110 §7.8
allows: the request is answered over HTTP/1.1 and the connection then closes.

Why one module of this size: ``HttpProtocol`` is one state machine (parser callbacks,
the request queue, deadlines, the sweep); its response side is ``http.response`` and
its flow control ``http.flow``. What remains reads best in one place.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from email.utils import formatdate
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

import httptools

from flintproxy.config import ServerConfig
from flintproxy.errors import (
    BadRequest,
    FlintError,
    HeadersTooLarge,
    ListenError,
    RequestTimeout,
    ServiceUnavailable,
)
from flintproxy.http.exchange import Exchange, Responder, index_headers
from flintproxy.http.flow import FlowControl
from flintproxy.http.response import Response
from flintproxy.tasks import TaskGroup

log = logging.getLogger("flintproxy")

MAX_HEAD = 64 * 1024  # request line, headers and trailers together
MAX_HEADER_LINES = 100
LINGER_S = 2.0  # after a response that ends a connection, read and drop this long
MAX_PIPELINED = 16  # queued requests before reading from the socket pauses
MAX_QUEUED_BYTES = 1 << 20  # ... or queued request bodies
FEED_SLICE = 8192  # a larger read is parsed a slice at a time (see data_received)
SWEEP_S = 1.0

Handler = Callable[[Exchange, Responder], Awaitable[None]]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_SHUTTING_DOWN = ServiceUnavailable("The server is shutting down; please retry.",
                                    code="server_shutting_down")
_TOO_MANY = ServiceUnavailable("Too many connections; please retry later.",
                               code="too_many_connections")


class _Request(Exchange):
    """An Exchange plus how its connection answers it."""

    __slots__ = ("http11", "keep_alive")

    def __init__(self, method: str, path: str, raw_headers: list[tuple[bytes, bytes]],
                 headers: dict[bytes, bytes], remote: str | None, keep_alive: bool,
                 http11: bool) -> None:
        super().__init__(method, path, None, raw_headers, remote, headers=headers)
        self.keep_alive = keep_alive
        self.http11 = http11


class ConnectionState(enum.IntEnum):
    """A client connection's life, in order: it only ever moves forward."""

    ACTIVE = 0  # reading requests and answering them
    LAST = 1  # the server is stopping: answer what is queued, take no more
    ENDING = 2  # closing after what was written (write_eof, then a short linger)
    CLOSED = 3  # the transport is gone


class _Refuse(Exception):
    """Raised in a parser callback: answer ``error`` and close."""

    def __init__(self, error: FlintError) -> None:
        super().__init__(error.message)
        self.error = error


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    # Slots: thousands live at once, and each would otherwise carry a dict for the
    # cyclic GC to walk.
    __slots__ = ("backlog", "body", "body_size", "busy", "continue_pending", "counted",
                 "current", "deadline", "discarding", "flow", "head_done", "head_size",
                 "in_message", "loop", "parser", "queue", "queued_bytes", "raw", "raw_left",
                 "remote", "response", "server", "state", "task", "transport", "url",
                 "waiter")

    def __init__(self, server: LeanServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser: Any = httptools.HttpRequestParser(self)
        self.remote: str | None = None
        self.queue: deque[_Request | FlintError] = deque()
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.flow: FlowControl  # from connection_made on
        self.queued_bytes = 0  # bodies of the requests in ``queue``
        self.backlog = b""  # received, not yet parsed: the queue is full (data_received)
        self.state = ConnectionState.ACTIVE
        self.discarding = False  # ignore further bytes (an error ended the connection)
        self.busy = False  # a request is being answered
        self.response: Response | None = None  # ... by this Responder
        self.counted = False  # in the server's per-address count
        # A new connection's first head must come within head_timeout_s.
        self.deadline = self.loop.time() + self.server.head_s
        # The request being parsed.
        self.current: _Request | None = None
        self.url = b""
        self.raw: list[tuple[bytes, bytes]] = []
        self.head_done = False  # its head is complete: what on_header sees are trailers
        self.continue_pending = False  # it expects 100 Continue, not sent yet
        self.head_size = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.in_message = False
        self.raw_left = 0  # body bytes still to come of an ignored Upgrade's request

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(transport)  # type: ignore[arg-type]
        peer = transport.get_extra_info("peername")
        remote = self.remote = peer[0] if isinstance(peer, tuple) else None
        server = self.server
        if server.max_connections and len(server.connections) >= server.max_connections:
            self._turn_away()
            return
        if server.max_per_ip and remote is not None:
            count = server.per_ip.get(remote, 0)
            if count >= server.max_per_ip and not server.exempt(remote):
                self._turn_away()
                return
            server.per_ip[remote] = count + 1
            self.counted = True
        server.connections.add(self)

    def _turn_away(self) -> None:
        """Over a connection cap: a 503 in OpenAI's shape, then close."""
        self.discarding = True
        Response(self, False, True).respond(_TOO_MANY.status, _TOO_MANY.head(),
                                             _TOO_MANY.body())
        self._close()

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        if self.raw_left:
            self._raw_body(data)
            return
        if self.backlog:
            data, self.backlog = self.backlog + data, b""
        # A read larger than FEED_SLICE is parsed a slice at a time, so that a flood
        # of pipelined requests stops being parsed (and queued) once MAX_PIPELINED
        # wait: the rest waits unparsed, reading paused, until they are answered. The
        # usual read (a request or a few) is one call, as before.
        size = len(data)
        start, stop = 0, min(size, FEED_SLICE)
        view: bytes | memoryview = data if stop == size else memoryview(data)
        parser = self.parser
        while True:
            try:
                parser.feed_data(view if stop == size and not start else view[start:stop])
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, _Refuse):
                    self._refuse(cause.error)
                    return
                raise
            except httptools.HttpParserUpgrade as exc:
                self._ignore_upgrade(bytes(view[start + exc.args[0]:]))
                return
            except httptools.HttpParserError as exc:
                self._refuse(BadRequest(f"Malformed HTTP request: {exc}."))
                return
            if stop == size or self.discarding:
                return
            if len(self.queue) > MAX_PIPELINED or self.queued_bytes > MAX_QUEUED_BYTES:
                self.backlog = bytes(view[stop:])
                self.flow.pause_reading()
                return
            start, stop = stop, min(stop + FEED_SLICE, size)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = ConnectionState.CLOSED
        self.parser = None  # it holds us: freed at once, not by the cyclic GC
        server = self.server
        server.connections.discard(self)
        if self.counted:
            self.counted = False
            remote = self.remote
            assert remote is not None
            left = server.per_ip.pop(remote, 1) - 1
            if left > 0:
                server.per_ip[remote] = left
        if self.task is not None:
            self.task.cancel()  # a request being answered: the client left
        self.flow.connection_lost()

    def pause_writing(self) -> None:
        self.flow.pause_writing(self.loop.time())

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # -- httptools callbacks -----------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = True
        self.current = None
        self.url = b""
        self.raw = []
        self.head_done = False
        self.continue_pending = False
        self.head_size = 0
        self.body = []
        self.body_size = 0
        self.deadline = self.loop.time() + self.server.head_s

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > MAX_HEAD:
            raise _Refuse(HeadersTooLarge("The request line and headers are too large."))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD:
            raise _Refuse(HeadersTooLarge("The request line and headers are too large."))
        if self.head_done:
            # A chunked body's trailer (llhttp reports it after the body): never a
            # header, so never an Authorization or an X-Forwarded-For. Dropped.
            return
        raw = self.raw
        if len(raw) >= MAX_HEADER_LINES:
            raise _Refuse(HeadersTooLarge(
                f"A request may have at most {MAX_HEADER_LINES} header lines."))
        raw.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        parser = self.parser
        method = parser.get_method()
        path = self.url.partition(b"?")[0]
        request = self.current = _Request(
            method.decode("ascii"), path.decode("utf-8", "surrogateescape"), self.raw,
            index_headers(self.raw), self.remote, parser.should_keep_alive(),
            parser.get_http_version() == "1.1")
        self.deadline = self.loop.time() + self.server.body_s
        length = request.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            self._too_large(request)
            return
        if (request.http11 and b"expect" in request.headers
                and request.headers[b"expect"].lower() == b"100-continue"):
            if self.busy or self.queue:
                # Another response is being written or is due first: a 100 now would
                # land inside it. Sent when this request's turn comes (_serve).
                self.continue_pending = True
            else:
                self.transport.write(_CONTINUE)  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        request = self.current
        if request is None or request.too_large:
            return
        self.body.append(body)
        self.body_size += len(body)
        if self.body_size > self.server.max_body:
            self._too_large(request)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.continue_pending = False  # the body came without it
        request, self.current = self.current, None
        if request is None or request.too_large:
            return  # a refusal already queued, or a too-large body already dispatched
        if self.parser.should_upgrade():
            # llhttp ends an Upgrade's message at its head; its body is read raw.
            length = request.headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > 0:
                self.current = request
                self.raw_left = int(length)
                return
        body = self.body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        self.queued_bytes += len(request.body)
        self.queue.append(request)
        self._start()

    # -- serving ------------------------------------------------------------------

    def _too_large(self, request: _Request) -> None:
        # Answered (413, or 401 first) without the body; the connection then closes
        # instead of reading the rest.
        request.too_large = True
        request.keep_alive = False
        self.body = []
        self.queue.append(request)
        self._start()
        self.discarding = True

    def _start(self) -> None:
        if self.task is None:
            self.task = self.loop.create_task(self._serve())
        else:
            waiter = self.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if len(self.queue) > MAX_PIPELINED or self.queued_bytes > MAX_QUEUED_BYTES:
            self.flow.pause_reading()

    async def _serve(self) -> None:
        """The connection's task: answer its requests one by one, in order."""
        handler = self.server.handler
        queue = self.queue
        try:
            while True:
                if not queue:
                    if self.state >= ConnectionState.LAST:
                        self._close()
                        return
                    if self.continue_pending:
                        # This request's turn, and nothing is being written.
                        self.continue_pending = False
                        assert self.transport is not None
                        self.transport.write(_CONTINUE)
                        # Its body comes only now: its time starts now.
                        self.deadline = self.loop.time() + self.server.body_s
                    self.waiter = self.loop.create_future()
                    try:
                        await self.waiter
                    finally:
                        self.waiter = None
                    continue
                item = queue.popleft()
                flow = self.flow
                if isinstance(item, _Request):
                    self.queued_bytes -= len(item.body)
                if (flow.read_paused and len(queue) <= MAX_PIPELINED // 2
                        and self.queued_bytes <= MAX_QUEUED_BYTES // 2):
                    if self.backlog:
                        backlog, self.backlog = self.backlog, b""
                        self.data_received(backlog)  # may leave a backlog again
                    if not self.backlog:
                        flow.resume_reading()
                self.busy = True
                if isinstance(item, FlintError):
                    Response(self, False, True).respond(item.status, item.head(), item.body())
                    self._close()
                    return
                keep_alive = item.keep_alive and self.state is ConnectionState.ACTIVE
                out = self.response = Response(self, keep_alive, item.http11)
                await handler(item, out)
                if flow.write_paused:
                    # A whole response was written without waiting: the next one waits
                    # until the client has read it (a pipelining client that does not
                    # read cannot make us buffer response after response).
                    await flow.drain()
                self.busy = False
                self.response = None
                if not out.done:
                    # A stream the handler did not end: its framing is broken, so
                    # the connection cannot carry another response.
                    self._abort()
                    return
                if not out.keep_alive:
                    self._close()
                    return
                if not self.in_message:  # else the next request's own deadline stands
                    self.deadline = self.loop.time() + self.server.idle_s
        except asyncio.CancelledError:
            return  # the client left, or the server is shutting down
        except ConnectionError:
            self._abort()
        except Exception:
            log.exception("unhandled error serving a connection")
            self._abort()
        finally:
            self.task = None

    # -- ending and handing over -----------------------------------------------------

    def _refuse(self, error: FlintError) -> None:
        """A request that cannot be parsed or served: answer in turn, then close."""
        self.discarding = True
        self.queue.append(error)
        self._start()

    def _close(self) -> None:
        """Close after what was written, reading (and dropping) a little longer, so a
        client still sending its body sees our answer, not a reset."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.state >= ConnectionState.ENDING:
            return
        self.state = ConnectionState.ENDING
        self.discarding = True
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _ignore_upgrade(self, rest: bytes) -> None:
        """llhttp stopped at an Upgrade: answer the request over HTTP/1.1, then close
        (what follows it on the wire would be the other protocol's)."""
        if self.current is not None:  # its body is still to come
            self._raw_body(rest)
            return
        self.discarding = True
        last = self.queue[-1] if self.queue else None
        if isinstance(last, _Request):
            last.keep_alive = False

    def _raw_body(self, data: bytes) -> None:
        take = data[:self.raw_left]
        self.raw_left -= len(take)
        self.body.append(take)
        if self.raw_left:
            return
        request, self.current = self.current, None
        assert request is not None
        request.body, self.body = b"".join(self.body), []
        request.keep_alive = False
        self.discarding = True
        self.queued_bytes += len(request.body)
        self.queue.append(request)
        self._start()

    def shut_down(self) -> None:
        """The server stops: close now if idle, else after the current response."""
        self.state = max(self.state, ConnectionState.LAST)
        if not self.busy and not self.queue:  # a request still arriving is dropped
            if self.task is not None:
                self.task.cancel()
            self._close()


class LeanServer:
    """The listening socket and its connections; every request goes to ``handler``."""

    def __init__(self, handler: Handler, config: ServerConfig,
                 uncapped: Collection[IPv4Network | IPv6Network] = ()) -> None:
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.max_body = config.max_body_bytes
        self.idle_s = config.keepalive_timeout_s
        self.head_s = config.head_timeout_s
        self.body_s = config.body_timeout_s
        self.write_s = config.write_timeout_s
        self.max_connections = config.max_connections
        self.max_per_ip = config.max_connections_per_ip
        # Addresses never capped per address (trusted proxies: every client behind one
        # shares its address).
        self._uncapped = tuple(uncapped)
        self.per_ip: dict[str, int] = {}  # open connections per address (memory only)
        self.connections: set[HttpProtocol] = set()
        self._date = b""
        self._date_at = 0
        self._server: asyncio.Server | None = None
        self._tasks = TaskGroup()  # the sweep

    def date(self) -> bytes:
        """The Date header line, remade once a second."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
        return self._date

    def exempt(self, remote: str) -> bool:
        """``remote`` is never capped per address (checked only once a cap is reached)."""
        if not self._uncapped:
            return False
        try:
            address = ip_address(remote)
        except ValueError:
            return False
        return any(address in net for net in self._uncapped)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        """Listen; ListenError (naming the address and why) if the socket cannot open.

        ``reuse_port``: SO_REUSEPORT, for ``serve --workers``: every worker listens on
        the same port and the kernel spreads new connections over them."""
        try:
            self._server = await self.loop.create_server(
                lambda: HttpProtocol(self), host, port, backlog=4096, reuse_address=True,
                reuse_port=reuse_port or None)
        except OSError as exc:
            raise ListenError.of(host, port, exc) from None
        self._tasks.every("connection sweep", SWEEP_S, self._sweep)

    @property
    def addresses(self) -> list[Any]:
        assert self._server is not None
        return [sock.getsockname() for sock in self._server.sockets]

    def _sweep(self) -> None:
        # One pass a second instead of a timer per request.
        now = self.loop.time()
        write_s = self.write_s
        for conn in list(self.connections):
            if conn.flow.stalled(now, write_s):
                conn._abort()  # reads nothing of what we write: cut (slowloris)
            elif (conn.busy or conn.queue or conn.state >= ConnectionState.ENDING
                  or conn.deadline >= now):
                continue
            elif conn.in_message and not conn.discarding:
                # A head or body still incomplete at its deadline.
                conn._refuse(RequestTimeout("The request was not received in time."))
            else:
                conn.shut_down()

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, let requests being answered finish (up to ``grace_s``), close."""
        if self._server is not None:
            self._server.close()
        await self._tasks.close()
        for conn in list(self.connections):
            conn.shut_down()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()  # still answering after the grace period: cut off
        # Cancelled, the relay settles each request (usage of what was relayed).
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self.connections):
            out = conn.response
            if out is not None and not out.done and conn.state is not ConnectionState.CLOSED:
                # A stream still open ends with an error event, properly framed.
                out.cut(_SHUTTING_DOWN)
                assert conn.transport is not None
                conn.transport.close()
            else:
                conn._abort()
