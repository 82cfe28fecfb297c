"""The upstream HTTP/1.1 client (flintproxy.http.client) against real loopback servers.

aiohttp apps play well-behaved upstreams; raw ``asyncio.start_server`` servers play
the odd ones, where a test must control every byte and every close.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from aiohttp import web
from multidict import CIMultiDict

from flintproxy.http.client import (
    HIGH_WATER,
    Target,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamReadTimeout,
    UpstreamResponse,
)

CONNECT_S = 2.0  # timeouts for calls that are not meant to time out
READ_S = 2.0
SHORT_S = 0.2  # timeouts that are meant to expire
PATH = "/v1/chat/completions"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
StartRaw = Callable[[Handler], Awaitable["RawServer"]]
StartApp = Callable[[web.Application], Awaitable[str]]


# -- raw servers -------------------------------------------------------------------


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request as (head, body), or None when the client closed instead."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def ok(body: bytes = b"ok", *extra: bytes) -> bytes:
    """A 200 response framed by Content-Length, with extra raw header lines."""
    lines = [b"HTTP/1.1 200 OK", b"Content-Length: %d" % len(body), *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def until_eof(reader: asyncio.StreamReader) -> None:
    """Wait, answering nothing, until the client closes (or the test ends)."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class RawServer:
    """``asyncio.start_server`` on an ephemeral port, counting accepted connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.errors: list[BaseException] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def target(self, path: str = PATH) -> Target:
        return Target(f"http://127.0.0.1:{self.port}{path}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: what many tests provoke
        except Exception as exc:
            if not writer.transport.is_closing():  # else: torn down under the handler
                self.errors.append(exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            transport = writer.transport
            # Closing with nothing left to send means closed, or soon; aborting such a
            # transport can fail in asyncio (3.11) once it is gone.
            if not transport.is_closing() or transport.get_write_buffer_size():
                transport.abort()  # wakes handlers blocked in reads and drains
        await self.server.wait_closed()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        assert all(t.done() for t in self.tasks), "a raw server handler hung"
        assert not self.errors, self.errors


@contextlib.asynccontextmanager
async def raw_servers() -> AsyncIterator[StartRaw]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = await RawServer(handler).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.stop()


@pytest.fixture
async def raw() -> AsyncIterator[StartRaw]:
    async with raw_servers() as start:
        yield start


@pytest.fixture
async def app_server() -> AsyncIterator[StartApp]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        runners.append(runner)
        # A deep accept queue: 200 simultaneous connects must not hit SYN retransmits.
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def upstream_client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    try:
        yield c
    finally:
        c.close()
        for _ in range(3):
            await asyncio.sleep(0)  # let the aborted transports' connection_lost run


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with upstream_client() as c:
        yield c


# -- helpers -----------------------------------------------------------------------------


def head(headers: CIMultiDict[str]) -> bytes:
    """Header lines as the relay hands them to the client."""
    return b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())


def decoded(resp: UpstreamResponse) -> CIMultiDict[str]:
    """The response's raw headers, decoded, to assert on."""
    return CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in resp.raw_headers)


async def post(client: UpstreamClient, target: Target, body: bytes = b"{}", *,
               headers: CIMultiDict[str] | None = None,
               read_timeout: float = READ_S) -> UpstreamResponse:
    return await client.post(target, head(headers) if headers is not None else b"", body,
                             CONNECT_S, read_timeout)


async def fetch(client: UpstreamClient, target: Target, body: bytes = b"{}") -> tuple[int, bytes]:
    resp = await post(client, target, body)
    try:
        data = await resp.read()
    except BaseException:
        resp.close()
        raise
    resp.release()
    return resp.status, data


async def read_exactly(resp: UpstreamResponse, n: int) -> bytes:
    """readany() until n bytes came (a write may arrive in more than one read)."""
    got = b""
    while len(got) < n:
        data = await resp.readany()
        assert data, f"body ended after {len(got)} of {n} bytes"
        got += data
    assert len(got) == n
    return got


async def until(pred: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a condition that no awaitable signals (client-side socket state)."""
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def idle(client: UpstreamClient, target: Target) -> int:
    return len(client._idle.get(target.key, []))


def echo_app(seen: list[object] | None = None, path: str = PATH) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        if seen is not None and not any(t is request.transport for t in seen):
            seen.append(request.transport)
        return web.Response(body=await request.read(), headers={"X-Upstream": "echo"})

    app = web.Application()
    app.router.add_post(path, echo)
    return app


# -- (1) keep-alive ------------------------------------------------------------------------


async def test_sequential_posts_reuse_one_connection(client: UpstreamClient,
                                                     app_server: StartApp) -> None:
    transports: list[object] = []
    target = Target(await app_server(echo_app(transports)) + PATH)
    for i in range(20):
        body = b'{"i": %d}' % i
        assert await fetch(client, target, body) == (200, body)
    assert len(transports) == 1
    assert idle(client, target) == 1


async def test_sequential_posts_reuse_one_connection_raw(client: UpstreamClient,
                                                         raw: StartRaw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            writer.write(ok(req[1]))

    srv = await raw(handler)
    for i in range(20):
        body = b"%d" % i
        assert await fetch(client, srv.target(), body) == (200, body)
    assert srv.connections == 1


# -- (2) body framings -------------------------------------------------------------------------


async def test_content_length_response(client: UpstreamClient, app_server: StartApp) -> None:
    body = random.Random(2).randbytes(300_000)

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        headers: CIMultiDict[str] = CIMultiDict([("X-Multi", "a"), ("X-Multi", "b")])
        return web.Response(body=body, status=201, headers=headers)

    app = web.Application()
    app.router.add_post(PATH, handler)
    target = Target(await app_server(app) + PATH)
    resp = await post(client, target)
    assert resp.status == 201
    assert decoded(resp)["Content-Length"] == str(len(body))
    assert decoded(resp).getall("x-multi") == ["a", "b"]
    assert await resp.read() == body
    assert await resp.readany() == b""  # the end stays the end
    resp.release()
    assert idle(client, target) == 1


async def test_chunked_response_is_streamed_piecewise(client: UpstreamClient,
                                                      app_server: StartApp) -> None:
    pieces: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        while (piece := await pieces.get()) is not None:
            await resp.write(piece)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post(PATH, stream)
    target = Target(await app_server(app) + PATH)
    sent = [b"data: %d %s\n\n" % (i, b"x" * (i * 37)) for i in range(10)]
    pieces.put_nowait(sent[0])  # aiohttp sends the headers with the first write
    resp = await post(client, target)
    assert resp.status == 200
    assert decoded(resp)["Transfer-Encoding"] == "chunked"
    received = []
    for i, piece in enumerate(sent):
        if i:
            pieces.put_nowait(piece)  # the server sends the next piece only now
        received.append(await read_exactly(resp, len(piece)))
        assert received[-1] == piece  # data before the end of the body
    pieces.put_nowait(None)
    assert await resp.readany() == b""
    assert b"".join(received) == b"".join(sent)
    resp.release()
    assert idle(client, target) == 1  # a complete chunked response keeps the connection


async def test_close_delimited_response(client: UpstreamClient, raw: StartRaw) -> None:
    body = b"no length: the end of the body is the end of the connection"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body[:10])
        await writer.drain()
        writer.write(body[10:])
        # returning closes the connection

    srv = await raw(handler)
    for n in (1, 2):
        resp = await post(client, srv.target())
        assert resp.status == 200
        assert await resp.read() == body
        resp.release()
        assert idle(client, srv.target()) == 0
        assert srv.connections == n  # never reused


# -- (3) Connection: close ---------------------------------------------------------------------


async def test_connection_close_response_is_not_reused(client: UpstreamClient,
                                                       raw: StartRaw) -> None:
    closed_by_client = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Says "close" but keeps the connection open: the client must go by the header.
        while (req := await read_request(reader)) is not None:
            writer.write(ok(req[1], b"Connection: close"))
        closed_by_client.set()

    srv = await raw(handler)
    assert await fetch(client, srv.target(), b"1") == (200, b"1")
    assert idle(client, srv.target()) == 0
    await asyncio.wait_for(closed_by_client.wait(), 5)
    assert await fetch(client, srv.target(), b"2") == (200, b"2")
    assert srv.connections == 2


# -- (4) stale idle connections ----------------------------------------------------------------


async def test_idle_connection_closed_by_upstream_is_replaced(client: UpstreamClient,
                                                             raw: StartRaw) -> None:
    close_idle = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_request(reader)
        assert req is not None
        writer.write(ok(req[1]))  # keep-alive...
        await close_idle.wait()  # ...until the upstream's idle timeout

    srv = await raw(handler)
    target = srv.target()
    assert await fetch(client, target, b"1") == (200, b"1")
    (conn,) = client._idle[target.key]
    close_idle.set()
    await until(lambda: conn.closed)  # the client saw the FIN while the connection was idle
    assert await fetch(client, target, b"2") == (200, b"2")
    assert srv.connections == 2


async def test_reused_connection_closed_before_response_is_resent(client: UpstreamClient,
                                                                 raw: StartRaw) -> None:
    """The keep-alive race: the upstream closed the idle connection as the request left."""
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        while (req := await read_request(reader)) is not None:
            requests.append(req[1])
            if served == 1:
                return  # closes without a byte of response
            served += 1
            writer.write(ok(req[1]))

    srv = await raw(handler)
    target = srv.target()
    assert await fetch(client, target, b"1") == (200, b"1")
    assert await fetch(client, target, b"2") == (200, b"2")
    assert srv.connections == 2
    assert requests == [b"1", b"2", b"2"]  # sent once on the stale connection, once anew
    assert idle(client, target) == 1


async def test_fresh_connection_closed_before_response_is_not_resent(client: UpstreamClient,
                                                                    raw: StartRaw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # then close without answering

    srv = await raw(handler)
    with pytest.raises(UpstreamDisconnected):
        await post(client, srv.target())
    assert srv.connections == 1
    assert idle(client, srv.target()) == 0


async def test_reused_connection_closed_mid_head_is_not_resent(client: UpstreamClient,
                                                              raw: StartRaw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok())
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")  # a byte came back: no resend

    srv = await raw(handler)
    assert await fetch(client, srv.target()) == (200, b"ok")
    with pytest.raises(UpstreamDisconnected):
        await post(client, srv.target())
    assert srv.connections == 1


async def test_resend_after_stale_connection_uses_a_fresh_connection(
        client: UpstreamClient, raw: StartRaw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        while (req := await read_request(reader)) is not None:
            if served == 1:
                return  # the upstream timed the idle connection out as the request came
            served += 1
            writer.write(ok(req[1]))

    srv = await raw(handler)
    target = srv.target()
    # Two concurrent calls leave two idle connections, then both go stale together.
    assert list(await asyncio.gather(fetch(client, target), fetch(client, target))) \
        == [(200, b"{}")] * 2
    assert srv.connections == 2 and idle(client, target) == 2
    assert await fetch(client, target, b"3") == (200, b"3")
    assert srv.connections == 3


# -- (5) connect errors --------------------------------------------------------------------------


async def test_connect_refused(client: UpstreamClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        started = time.monotonic()
        with pytest.raises(UpstreamConnectError, match=f"127.0.0.1:{port}"):
            await client.post(Target(f"http://127.0.0.1:{port}{PATH}"), b"", b"{}",
                              CONNECT_S, READ_S)
    assert time.monotonic() - started < 1.0


async def test_connect_timeout(client: UpstreamClient) -> None:
    # A non-routable address (10.255.255.1) is answered at once by this sandbox's network,
    # so the hang is made locally: a listener whose accept queue is full drops new SYNs.
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        started = time.monotonic()
        with pytest.raises(UpstreamConnectError, match="timed out"):
            await client.post(Target(f"http://127.0.0.1:{port}{PATH}"), b"", b"{}",
                              SHORT_S, READ_S)
        elapsed = time.monotonic() - started
    assert SHORT_S * 0.9 <= elapsed < SHORT_S + 1.0


# -- (6) read timeouts -------------------------------------------------------------------------


async def test_read_timeout_waiting_for_headers(client: UpstreamClient, raw: StartRaw) -> None:
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await until_eof(reader)  # accepted, read, never answered
        gone.set()

    srv = await raw(handler)
    started = time.monotonic()
    with pytest.raises(UpstreamReadTimeout):
        await post(client, srv.target(), read_timeout=SHORT_S)
    elapsed = time.monotonic() - started
    assert SHORT_S * 0.9 <= elapsed < SHORT_S + 1.0
    await asyncio.wait_for(gone.wait(), 5)  # the timed-out connection was closed
    assert idle(client, srv.target()) == 0


async def test_read_timeout_mid_body(client: UpstreamClient, raw: StartRaw) -> None:
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")  # then stalls
        await until_eof(reader)
        gone.set()

    srv = await raw(handler)
    resp = await post(client, srv.target(), read_timeout=SHORT_S)
    assert await read_exactly(resp, 5) == b"12345"
    started = time.monotonic()
    with pytest.raises(UpstreamReadTimeout):
        await resp.readany()
    assert SHORT_S * 0.9 <= time.monotonic() - started < SHORT_S + 1.0
    resp.close()
    await asyncio.wait_for(gone.wait(), 5)


async def test_read_timeout_counts_from_the_last_data(client: UpstreamClient,
                                                      raw: StartRaw) -> None:
    # A slow stream whose total time exceeds the limit lives on, as long as no gap
    # between its pieces does.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        for piece in (b"a", b"b", b"c", b"d"):
            await asyncio.sleep(SHORT_S * 0.6)
            writer.write(piece)
        await until_eof(reader)

    srv = await raw(handler)
    started = time.monotonic()
    resp = await post(client, srv.target(), read_timeout=SHORT_S)
    assert await resp.read() == b"abcd"
    assert time.monotonic() - started > SHORT_S * 2
    resp.release()


async def test_a_shorter_read_timeout_on_a_reused_connection(client: UpstreamClient,
                                                             raw: StartRaw) -> None:
    # One pooled connection, first with a long limit, then a short one: the short one
    # is kept, not the timer the long one left armed.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_request(reader)  # then never answered
        await until_eof(reader)

    srv = await raw(handler)
    resp = await post(client, srv.target(), read_timeout=60.0)
    assert await resp.read() == b"ok"
    resp.release()
    started = time.monotonic()
    with pytest.raises(UpstreamReadTimeout, match=f"{SHORT_S:g}s"):
        await post(client, srv.target(), read_timeout=SHORT_S)
    assert SHORT_S * 0.9 <= time.monotonic() - started < SHORT_S + 1.0
    assert srv.connections == 1


# -- (7) connection lost mid-body --------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_connection_lost_mid_body(client: UpstreamClient, raw: StartRaw,
                                        framing: str, how: str) -> None:
    go = asyncio.Event()
    if framing == "chunked":
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        half = b"5\r\nhello\r\n"
    else:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
        half = b"hello"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head + half)
        await go.wait()
        if how == "rst":
            reset(writer)
        # else: returning closes the connection with a FIN

    srv = await raw(handler)
    resp = await post(client, srv.target())
    assert await read_exactly(resp, 5) == b"hello"
    go.set()
    with pytest.raises(UpstreamDisconnected):
        await resp.readany()
    with pytest.raises(UpstreamDisconnected):
        await resp.read()  # and it stays failed
    resp.release()  # a failed connection is never pooled
    assert idle(client, srv.target()) == 0


async def test_reset_truncating_close_delimited_body(client: UpstreamClient,
                                                     raw: StartRaw) -> None:
    go = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhalf")
        await go.wait()
        reset(writer)

    srv = await raw(handler)
    resp = await post(client, srv.target())
    try:
        assert await read_exactly(resp, 4) == b"half"
        go.set()
        with pytest.raises(UpstreamDisconnected):
            await resp.readany()
    finally:
        resp.close()


# -- (8) garbage -----------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS record where HTTP was expected
])
async def test_garbage_response_head(client: UpstreamClient, raw: StartRaw,
                                     garbage: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(garbage)
        await until_eof(reader)  # the client must not wait for a close

    srv = await raw(handler)
    with pytest.raises(UpstreamDisconnected, match="invalid HTTP response"):
        await post(client, srv.target())
    assert srv.connections == 1
    assert idle(client, srv.target()) == 0


async def test_garbage_in_chunked_body(client: UpstreamClient, raw: StartRaw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\nzz\r\nnot a chunk\r\n")
        await until_eof(reader)

    srv = await raw(handler)
    resp = await post(client, srv.target())
    with pytest.raises(UpstreamDisconnected):
        await resp.read()
    resp.release()
    assert idle(client, srv.target()) == 0


async def test_interim_1xx_response_is_skipped(client: UpstreamClient, raw: StartRaw) -> None:
    posted = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(posted.wait(), 0.3)  # keep the two heads apart
        writer.write(ok(b"final", b"X-Final: 1"))
        await until_eof(reader)

    srv = await raw(handler)
    resp = await post(client, srv.target())
    posted.set()
    try:
        assert resp.status == 200
        assert decoded(resp).get("X-Final") == "1"
        assert await resp.read() == b"final"
    finally:
        resp.close()


# -- (9) flow control --------------------------------------------------------------------------


async def test_backpressure_pauses_the_upstream(client: UpstreamClient, raw: StartRaw) -> None:
    total = 8 << 20
    body = random.Random(9).randbytes(total)
    piece = 64 << 10
    sent = 0
    in_drain = False

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent, in_drain
        # A fixed, small send buffer: where the upstream stalls then depends on the
        # client's buffers only, not on the kernel's autotuning of this one.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for i in range(0, total, piece):
            writer.write(body[i:i + piece])
            sent = i + piece
            in_drain = True
            await writer.drain()
            in_drain = False

    srv = await raw(handler)
    resp = await post(client, srv.target())
    conn = resp._conn
    assert conn is not None
    # > HIGH_WATER buffered: the socket is not read
    await until(lambda: conn.flow is not None and conn.flow.read_paused)
    assert conn.buffered > HIGH_WATER
    assert conn.buffered <= HIGH_WATER + (1 << 20)  # at most a read or so beyond it
    # The kernel buffers fill up, then the upstream's writes block for good: no
    # progress over a 50 ms look (nothing signals "nothing happens", so this polls).
    stalled_at = -1
    deadline = time.monotonic() + 5
    while sent != stalled_at or not in_drain:
        assert time.monotonic() < deadline, "the upstream never stalled"
        stalled_at = sent
        await asyncio.sleep(0.05)
    assert stalled_at < total
    assert conn.flow is not None and conn.flow.read_paused
    assert conn.buffered <= HIGH_WATER + (1 << 20)
    # Reading resumes the flow and everything arrives intact.
    parts = []
    while data := await resp.readany():
        assert len(data) <= HIGH_WATER + (1 << 20)
        parts.append(data)
    assert sent == total
    assert b"".join(parts) == body
    assert conn.flow is not None
    assert (conn.flow.read_paused, conn.buffered) == (False, 0)  # reading resumed for good
    resp.release()
    assert idle(client, srv.target()) == 1


# -- (10) abandoning a response ----------------------------------------------------------------


async def test_close_mid_stream_disconnects_upstream(client: UpstreamClient,
                                                     raw: StartRaw) -> None:
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"d\r\ndata: first\n\n\r\n")
        await until_eof(reader)  # would stream on; learns at once that the client left
        gone.set()

    srv = await raw(handler)
    resp = await post(client, srv.target())
    assert await read_exactly(resp, 13) == b"data: first\n\n"
    started = time.monotonic()
    resp.close()
    await asyncio.wait_for(gone.wait(), 5)
    assert time.monotonic() - started < 1.0
    assert await resp.readany() == b""  # a closed response reads as ended
    resp.release()  # harmless after close()
    assert idle(client, srv.target()) == 0


@pytest.mark.parametrize("read_first", [True, False])
async def test_release_of_unfinished_response_drops_connection(
        client: UpstreamClient, raw: StartRaw, read_first: bool) -> None:
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (await read_request(reader)) is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        if await read_request(reader) is None:
            gone.set()  # the first connection: dropped by the client, not reused
            return
        raise AssertionError("a half-read connection was reused")

    srv = await raw(handler)
    resp = await post(client, srv.target())
    if read_first:
        assert await read_exactly(resp, 5) == b"12345"
    resp.release()
    assert idle(client, srv.target()) == 0
    await asyncio.wait_for(gone.wait(), 5)
    resp = await post(client, srv.target())
    assert srv.connections == 2
    resp.close()


async def test_release_of_complete_but_unread_response_drops_connection(
        client: UpstreamClient, raw: StartRaw) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await read_request(reader)) is not None:
            writer.write(ok(b"unread"))

    srv = await raw(handler)
    resp = await post(client, srv.target())
    conn = resp._conn
    assert conn is not None
    await until(lambda: conn.complete)
    resp.release()  # the body was never taken
    assert idle(client, srv.target()) == 0
    assert await fetch(client, srv.target()) == (200, b"unread")
    assert srv.connections == 2


async def test_cancelled_post_closes_the_connection(client: UpstreamClient,
                                                    raw: StartRaw) -> None:
    arrived = asyncio.Event()
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()
        await until_eof(reader)
        gone.set()

    srv = await raw(handler)
    task = asyncio.create_task(post(client, srv.target()))
    await asyncio.wait_for(arrived.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(gone.wait(), 5)
    assert idle(client, srv.target()) == 0


# -- (11) the request on the wire --------------------------------------------------------------


async def test_request_bytes_on_the_wire(client: UpstreamClient, raw: StartRaw) -> None:
    captured: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            captured.append(req)
            writer.write(ok())

    srv = await raw(handler)
    target = srv.target(PATH + "?api-version=2024-06-01")
    headers: CIMultiDict[str] = CIMultiDict([
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer sk-upstream"),
        ("X-Request-Id", "req-1"),
        ("X-Multi", "a"),
        ("X-Multi", "b"),
    ])
    body = ('{"messages": [{"role": "user", "content": "h\u00e9llo \u2603\\r\\n"}]}'.encode()
            + b"\r\n\r\nHTTP/1.1 200 OK\r\n\x00\xff")  # bytes that must not be re-framed
    for sent in (body, b""):
        resp = await post(client, target, sent, headers=headers)
        assert await resp.read() == b"ok"
        resp.release()
    assert srv.connections == 1
    assert [b for _, b in captured] == [body, b""]
    for (head, _), sent in zip(captured, (body, b""), strict=True):
        request_line, *lines = head.decode("latin-1").removesuffix("\r\n\r\n").split("\r\n")
        assert request_line == "POST /v1/chat/completions?api-version=2024-06-01 HTTP/1.1"
        fields = [tuple(line.split(": ", 1)) for line in lines]
        names = [name.lower() for name, _ in fields]
        assert names.count("host") == 1 and names.count("content-length") == 1
        assert ("Host", f"127.0.0.1:{srv.port}") in fields
        assert ("Content-Length", str(len(sent))) in fields
        given = [f for f in fields if f[0].lower() not in ("host", "content-length")]
        assert given == list(headers.items())  # all of them, in order, nothing else


# -- (12) Target ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "host", "port", "tls", "line"), [
    pytest.param(
        "https://api.example.com/v1/chat/completions?api-version=1&x=y", "api.example.com",
        443, True,
        b"POST /v1/chat/completions?api-version=1&x=y HTTP/1.1\r\nHost: api.example.com\r\n",
        id="https-default-port-query"),
    pytest.param(
        "https://api.example.com:8443/v1/embeddings", "api.example.com", 8443, True,
        b"POST /v1/embeddings HTTP/1.1\r\nHost: api.example.com:8443\r\n",
        id="https-explicit-port"),
    pytest.param(
        "http://127.0.0.1:9001/v1/completions", "127.0.0.1", 9001, False,
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:9001\r\n", id="http-ip-port"),
    pytest.param(
        "http://upstream.internal", "upstream.internal", 80, False,
        b"POST / HTTP/1.1\r\nHost: upstream.internal\r\n", id="http-default-port-no-path"),
    pytest.param(
        "http://[::1]:8080/v1/x", "::1", 8080, False,
        b"POST /v1/x HTTP/1.1\r\nHost: [::1]:8080\r\n", id="ipv6-explicit-port"),
    pytest.param(
        "http://[::1]/v1/x", "::1", 80, False, b"POST /v1/x HTTP/1.1\r\nHost: [::1]\r\n",
        id="ipv6-default-port"),
    pytest.param(
        "https://user:secret@api.example.com:8443/v1/x", "api.example.com", 8443, True,
        b"POST /v1/x HTTP/1.1\r\nHost: api.example.com:8443\r\n",
        id="userinfo"),
])
def test_target_parsing(url: str, host: str, port: int, tls: bool, line: bytes) -> None:
    target = Target(url)
    assert target.request_line == line
    assert (target.host, target.port) == (host, port)
    assert target.key == (host, port, tls)
    if tls:
        assert isinstance(target.ssl, ssl.SSLContext)
        assert target.ssl.check_hostname and target.ssl.verify_mode == ssl.CERT_REQUIRED
        assert target.server_hostname == host
    else:
        assert target.ssl is None and target.server_hostname is None


# -- (13) concurrency ------------------------------------------------------------------------


async def test_many_concurrent_posts(client: UpstreamClient, app_server: StartApp) -> None:
    transports: list[object] = []
    target = Target(await app_server(echo_app(transports)) + PATH)
    n = 200

    async def wave(tag: bytes) -> None:
        bodies = [b'{"n": "%s-%d"}' % (tag, i) for i in range(n)]
        results = await asyncio.gather(*(fetch(client, target, b) for b in bodies))
        assert results == [(200, b) for b in bodies]

    await wave(b"a")
    opened = len(transports)
    assert 1 <= opened <= n
    assert idle(client, target) == opened
    await wave(b"b")
    assert len(transports) == opened  # the second wave ran on pooled connections
    assert idle(client, target) == opened <= n


# -- the production event loop ---------------------------------------------------------------


@pytest.mark.parametrize(("case", "kwargs"), [
    pytest.param(test_sequential_posts_reuse_one_connection_raw, {}, id="keep-alive"),
    pytest.param(test_close_delimited_response, {}, id="close-delimited"),
    pytest.param(test_reused_connection_closed_before_response_is_resent, {}, id="resend"),
    pytest.param(test_read_timeout_mid_body, {}, id="read-timeout"),
    pytest.param(test_connection_lost_mid_body, {"framing": "chunked", "how": "rst"},
                 id="rst-mid-body"),
    pytest.param(test_garbage_in_chunked_body, {}, id="garbage"),
    pytest.param(test_backpressure_pauses_the_upstream, {}, id="backpressure"),
    pytest.param(test_close_mid_stream_disconnects_upstream, {}, id="close-mid-stream"),
])
def test_on_uvloop(case: Callable[..., Awaitable[None]], kwargs: dict[str, Any]) -> None:
    """The gateway runs on uvloop: its transports must behave as the tests above expect."""

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async with upstream_client() as c, raw_servers() as start:
            await case(c, start, **kwargs)

    uvloop.run(main())
