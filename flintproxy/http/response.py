"""How the lean server answers one request: the ``Responder`` of its connections.

A whole response is one ``transport.write`` (status line, head, framing, Date,
Connection, body); a stream is chunked (HTTP/1.1) or ends with the connection
(HTTP/1.0), and waits in the connection's ``FlowControl.drain`` while the client's
socket is full. ``cut`` ends what the server can no longer finish (shutdown).
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Protocol

from flintproxy.errors import FlintError
from flintproxy.http.flow import FlowControl

__all__ = ["Connection", "Response"]

_STATUS = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("ascii"))
           for s in HTTPStatus}
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"  # said to HTTP/1.0 clients only
_CHUNKED = b"Transfer-Encoding: chunked\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


def _status_line(status: int) -> bytes:
    return _STATUS.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status


class _DateLine(Protocol):
    def date(self) -> bytes:
        """The ``Date:`` header line, with its CRLF."""


class Connection(Protocol):
    """What a Response needs of its connection (``server.HttpProtocol``), read-only."""

    @property
    def transport(self) -> asyncio.Transport | None: ...

    @property
    def flow(self) -> FlowControl: ...

    @property
    def server(self) -> _DateLine: ...


class Response:
    """The Responder of one request on a lean connection."""

    __slots__ = ("chunked", "conn", "done", "http11", "keep_alive", "started")

    def __init__(self, conn: Connection, keep_alive: bool, http11: bool) -> None:
        self.conn = conn
        self.keep_alive = keep_alive
        self.http11 = http11
        self.started = False
        self.chunked = False
        self.done = False

    def _connection(self) -> bytes:
        if not self.keep_alive:
            return _CLOSE
        return b"" if self.http11 else _KEEP_ALIVE

    def respond(self, status: int, head: bytes, body: bytes) -> None:
        self.done = True
        transport = self.conn.transport
        if transport is None or self.conn.flow.closed:
            return  # the client left; nothing to tell it
        transport.write(b"".join((_status_line(status), head,
                                  b"Content-Length: %d\r\n" % len(body),
                                  self.conn.server.date(), self._connection(), b"\r\n",
                                  body)))

    async def stream(self, status: int, head: bytes, first: bytes = b"",
                     end: bool = False) -> None:
        conn = self.conn
        if conn.flow.closed or conn.transport is None:
            raise ConnectionResetError("the client closed the connection")
        self.started = True
        if not self.http11:
            self.keep_alive = False  # the end of the body is the end of the connection
            conn.transport.write(b"".join((_status_line(status), head, conn.server.date(),
                                           _CLOSE, b"\r\n", first)))
        else:
            self.chunked = True
            # The first chunk is framed by its neighbours in the one join, not copied
            # into a framed chunk first (a stream's whole body when it came in one
            # block: 0.53 -> 0.28 us for the canned 5.4 KB stream).
            size, crlf = (b"%x\r\n" % len(first), b"\r\n") if first else (b"", b"")
            conn.transport.write(b"".join((
                _status_line(status), head, conn.server.date(), self._connection(),
                _CHUNKED, size, first, crlf, _LAST_CHUNK if end else b"")))
        self.done = end
        if conn.flow.write_paused:
            await conn.flow.drain()

    async def write(self, data: bytes) -> None:
        conn = self.conn
        if conn.flow.closed or conn.transport is None:
            raise ConnectionResetError("the client closed the connection")
        if not data:
            return  # an empty chunk would end the body
        conn.transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if conn.flow.write_paused:
            await conn.flow.drain()

    async def end(self, last: bytes = b"") -> None:
        conn = self.conn
        if conn.flow.closed or conn.transport is None:
            raise ConnectionResetError("the client closed the connection")
        if self.chunked:
            conn.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(last), last) if last
                                 else _LAST_CHUNK)
        elif last:
            conn.transport.write(last)
        self.done = True

    def cut(self, error: FlintError) -> None:
        """End what the server can no longer finish: a stream with ``error`` as its last
        event (its chunked body properly ended), a response not begun with ``error``."""
        conn = self.conn
        transport = conn.transport
        if self.done or conn.flow.closed or transport is None:
            return
        if not self.started:
            self.keep_alive = False
            self.respond(error.status, error.head(), error.body())
            return
        event = error.sse_event()
        transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event) if self.chunked
                        else event)
        self.done = True
