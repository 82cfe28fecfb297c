"""A lean HTTP/1.1 client for upstream calls: the relay's one pooled connection layer.

Why not aiohttp's client: under load its per-request machinery (request object,
auto headers, a task per request to write the body, a payload writer) was the
largest single cost of the gateway's event loop (bench/hotpath.py). Here a request
is one ``transport.write`` of pre-joined bytes on a kept-alive connection, the
response is parsed in C by llhttp (httptools, the parser uvicorn uses), and the body
is handed to the relay as the socket delivers it. No task is created per request.

- Pool: idle keep-alive connections per (host, port, tls); unbounded, like the
  relay's streams; an idle connection the upstream closed is dropped when found.
- A request on a reused connection that the upstream closed before sending a single
  byte back (a keep-alive race) is sent again once on a fresh connection.
- Flow control: a response body buffered beyond HIGH_WATER pauses reading from the
  socket until the relay has taken it (backpressure all the way to the upstream).
- Timeouts: connect, and read (headers, and each wait for more body).
- Bounds: a response head larger than MAX_HEAD fails as UpstreamTooLarge (checked
  once per socket read, before llhttp's buffer can grow further); ``read`` takes a
  bound for a whole body. A hostile upstream cannot make us hold more than that.
- Errors: UpstreamConnectError (could not connect), UpstreamDisconnected (closed,
  reset or unparsable mid-response), UpstreamReadTimeout. ``relay.upstream_failure``
  turns them into the client-visible errors.

Why one module of this size: the protocol, the pool and the response reader share one
connection object whose life (pooled, reading, released at end) they hand between them.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import httptools

from flintproxy.http.flow import FlowControl

HIGH_WATER = 1 << 20
# An upstream's status line and headers together; real ones send a few KiB.
MAX_HEAD = 64 * 1024
# ``read``'s bound when the caller names none (the relay passes its configured one).
MAX_BODY = 32 * 1024 * 1024


class UpstreamConnectError(ConnectionError):
    """The upstream could not be reached."""


class UpstreamDisconnected(ConnectionError):
    """The upstream closed, reset or garbled the connection before the response ended."""


class UpstreamTooLarge(UpstreamDisconnected):
    """The upstream's head, body or one SSE event exceeded its bound; the connection
    is abandoned (a subclass of UpstreamDisconnected: it is handled as one)."""


class UpstreamReadTimeout(TimeoutError):
    """The upstream sent nothing for longer than the read timeout."""


class Target:
    """A parsed endpoint URL, prepared once per upstream and endpoint."""

    __slots__ = ("host", "key", "port", "request_line", "server_hostname", "ssl")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if tls else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if tls else None
        self.server_hostname = self.host if tls else None
        self.key = (self.host, self.port, tls)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        # From the host name, never the netloc: that may carry user:password@.
        host_header = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None:
            host_header += f":{parts.port}"
        self.request_line = f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n".encode("ascii")


class _Connection(asyncio.Protocol):
    """One upstream socket and the response being read from it."""

    __slots__ = ("buffered", "chunks", "closed", "complete", "connection", "deadline",
                 "error", "flow", "head_bytes", "headers_done", "interim", "keep_alive",
                 "limit_s", "loop", "parser", "pool", "pool_timer", "raw_headers", "received",
                 "status", "timer", "timer_at", "transport", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.closed = False
        self.parser: Any = None
        # The read timeout: one timer per connection, re-armed lazily (see wait).
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.deadline = 0.0
        self.limit_s = 0.0
        # Set by release_at_end: where to go once the response ends, and until when.
        self.pool: list[_Connection] | None = None
        self.pool_timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.connection: bytes | None = None
        self.headers_done = False
        self.head_bytes = 0
        self.interim = False
        self.keep_alive = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.received = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def begin(self) -> None:
        self._reset()
        # Only clean connections are reused, and llhttp is ready for the next message
        # once one completes: one parser per connection.
        if self.parser is None:
            self.parser = httptools.HttpResponseParser(self)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamDisconnected(f"invalid HTTP response: {exc}"))
            self.abort()
            return
        if not self.headers_done:  # once per read: llhttp holds a partial head itself
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._fail(UpstreamTooLarge(f"response head over {MAX_HEAD} bytes"))
                self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        if self.pool_timer is not None:
            self.pool_timer.cancel()
            self.pool_timer = None
        self.pool = None
        self.parser = None  # it holds us: freed at once, not by the cyclic GC
        if self.complete:
            return
        framed = (b"content-length", b"transfer-encoding")
        if (exc is None and self.headers_done
                and not any(n.lower() in framed for n, _ in self.raw_headers)):
            self.complete = True  # a body delimited by closing the connection (RFC 9112 §6.3)
            self._wake()
        else:
            self._fail(UpstreamDisconnected("connection closed before the response ended"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))
        if len(name) == 10 and name.lower() == b"connection":
            self.connection = value

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim response (103 Early Hints, 100 Continue): the real one follows.
            self.raw_headers = []
            self.connection = None
            self.interim = True
            return
        self.status = status
        # Read here: llhttp forgets it once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.pool is not None:
            return  # released at end: the rest is discarded
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.flow is not None:
            self.flow.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:  # the end of an interim response, not of ours
            self.interim = False
            return
        self.complete = True
        if self.pool is not None:
            self._pool_now()
        self._wake()

    # helpers
    def _pool_now(self) -> None:
        pool, self.pool = self.pool, None
        if self.pool_timer is not None:
            self.pool_timer.cancel()
            self.pool_timer = None
        if pool is not None and self.keep_alive and not self.closed and self.error is None:
            pool.append(self)
        else:
            self.abort()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def failure(self) -> BaseException:
        """A fresh copy of ``error``, to raise.

        Raising the stored exception would tie its traceback (the raising frames,
        which hold this connection) to the connection that holds it: a reference
        cycle per failed response, which the server's GC tuning keeps alive for long
        (tests/test_fault_cycles.py).
        """
        assert self.error is not None
        return type(self.error)(*self.error.args)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, limit_s: float) -> None:
        # This runs for every block of every stream: rather than a timer per wait, a
        # deadline moves, and the connection's one timer, when it fires early, is set
        # again for the deadline of the moment.
        waiter = self.waiter = self.loop.create_future()
        self.limit_s = limit_s
        self.deadline = self.loop.time() + limit_s
        if self.timer is None or self.deadline < self.timer_at:  # none, or too late
            self._arm()
        try:
            await waiter
        finally:
            self.waiter = None

    def _arm(self) -> None:
        self._stop_timer()
        self.timer_at = self.deadline
        self.timer = self.loop.call_at(self.deadline, self._expire)

    def _expire(self) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # not waiting: the next wait arms the timer again
        if self.loop.time() < self.deadline:
            self._arm()
            return
        waiter.set_exception(
            UpstreamReadTimeout(f"no data from the upstream for {self.limit_s:g}s"))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.flow is not None:
            self.flow.resume_reading()
        return data

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def abort(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """The response of one upstream call; release() or close() it exactly once."""

    __slots__ = ("_client", "_conn", "_key", "_read_timeout", "connection", "raw_headers",
                 "status")

    def __init__(self, client: UpstreamClient, conn: _Connection, key: tuple[str, int, bool],
                 read_timeout: float) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self._key = key
        self._read_timeout = read_timeout
        self.status: int = conn.status
        self.raw_headers = conn.raw_headers  # as received, in order
        self.connection = conn.connection  # the Connection header's value, if any


    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some), or b"" at the end."""
        conn = self._conn
        if conn is None:
            return b""
        while True:
            if conn.chunks:
                return conn.take()
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.failure()
            await conn.wait(self._read_timeout)

    @property
    def at_eof(self) -> bool:
        """The response is complete and all of its body has been read."""
        conn = self._conn
        return conn is None or (conn.complete and not conn.chunks)

    async def read(self, limit: int = MAX_BODY) -> bytes:
        """The whole remaining body; UpstreamTooLarge once it exceeds ``limit`` bytes
        (the connection is then abandoned)."""
        parts = []
        size = 0
        while data := await self.readany():
            size += len(data)
            if size > limit:
                self.close()
                raise UpstreamTooLarge(f"response body over {limit} bytes")
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Done with the response: keep the connection if it is clean, else drop it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.reusable() and not conn.chunks:
            self._client._idle.setdefault(self._key, []).append(conn)
        else:
            conn.abort()

    def release_at_end(self, grace_s: float) -> None:
        """Done with a response whose end has not arrived yet (a stream's ``[DONE]``
        came before its terminator): the rest of its body is discarded, and the
        connection joins the pool when the end comes within ``grace_s``, else closes."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.chunks.clear()
        conn.buffered = 0
        if conn.closed or conn.error is not None or not conn.keep_alive:
            conn.abort()
            return
        conn.pool = self._client._idle.setdefault(self._key, [])
        if conn.complete:
            conn._pool_now()
            return
        conn.pool_timer = conn.loop.call_later(grace_s, conn.abort)
        if conn.flow is not None:
            conn.flow.resume_reading()

    def close(self) -> None:
        """Abandon the response: the upstream sees its connection closed at once."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()


class UpstreamClient:
    """The pool of upstream connections, shared by every request."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._loop = asyncio.get_running_loop()

    async def _connect(self, target: Target, limit_s: float) -> _Connection:
        try:
            async with asyncio.timeout(limit_s):
                _, conn = await self._loop.create_connection(
                    lambda: _Connection(self._loop), target.host, target.port,
                    ssl=target.ssl, server_hostname=target.server_hostname)
        except TimeoutError:
            raise UpstreamConnectError(f"connect to {target.host}:{target.port} timed out"
                                       ) from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {target.host}:{target.port}: "
                                       f"{exc.strerror or exc}") from None
        return conn

    def _idle_connection(self, key: tuple[str, int, bool]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def post(self, target: Target, head: bytes, body: bytes,
                   connect_timeout: float, read_timeout: float) -> UpstreamResponse:
        """Send a POST and wait for the response's status and headers.

        ``head``: serialized header lines (``b"Name: value\\r\\n"``...) besides Host
        and Content-Length, which are added here.
        """
        payload = b"".join((target.request_line, b"Content-Length: %d\r\n" % len(body),
                            head, b"\r\n", body))
        for attempt in range(2):
            conn = self._idle_connection(target.key) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(target, connect_timeout)
            conn.begin()
            assert conn.transport is not None
            conn.transport.write(payload)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.failure()
                    await conn.wait(read_timeout)
            except UpstreamDisconnected:
                conn.abort()
                if reused and attempt == 0 and not conn.received:
                    continue  # the upstream had closed the idle connection: resend once
                raise
            except BaseException:
                conn.abort()
                raise
            return UpstreamResponse(self, conn, target.key, read_timeout)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close every idle connection (at shutdown)."""
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()
