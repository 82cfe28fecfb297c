"""The lean server: framing, keep-alive, pipelining, limits, hand-over to aiohttp, shutdown.

Raw sockets against the real gateway, so every byte on the wire is the server's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httptools
import orjson
import pytest

from flintproxy.tools.mock import expected_content
from tests.conftest import Gateway, MockServer, raw_config, start_gateway

CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
STREAM = (b'{"model": "gpt-4o-mini", "stream": true, '
          b'"messages": [{"role": "user", "content": "hi"}]}')


class Response:
    """One response read off a raw connection with llhttp."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.interim: list[int] = []
        self.complete = False
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.interim.append(status)
            self.headers = {}
        self.status = status

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.status >= 200:
            self.complete = True

    def json(self) -> Any:
        return orjson.loads(self.body)


class Conn:
    """A raw client connection; responses are read in order, leftovers kept."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self) -> Response:
        resp = Response()
        while not resp.complete:
            data = self.buffer or await asyncio.wait_for(self.reader.read(65536), 5)
            self.buffer = b""
            if not data:
                framed = "content-length" in resp.headers or "transfer-encoding" in resp.headers
                if resp.status and not framed:
                    break  # a body delimited by the close
                raise ConnectionError("closed mid-response")
            # Tests send a request only once the previous response is read (pipelining
            # tests read raw bytes), so a read never holds two responses.
            resp.parser.feed_data(data)
        return resp

    async def closed(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), 5) == b""
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


Opener = Callable[[Gateway], Awaitable[Conn]]


@pytest.fixture
async def connect() -> AsyncIterator[Opener]:
    """Open raw connections to a gateway; all are closed after the test."""
    opened: list[Conn] = []

    async def opener(gw: Gateway) -> Conn:
        conn = Conn(*await asyncio.open_connection("127.0.0.1", gw.port))
        opened.append(conn)
        return conn

    yield opener
    for conn in opened:
        await conn.close()


def post(gw: Gateway, path: str = "/v1/chat/completions", body: bytes = CHAT,
         extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return (b"POST " + path.encode() + b" " + version + b"\r\nHost: x\r\n"
            b"Authorization: Bearer " + gw.key.encode() + b"\r\n"
            b"Content-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"


def sse_content(body: bytes) -> str:
    text = ""
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            choices = orjson.loads(line[6:])["choices"]
            if choices:
                text += choices[0]["delta"].get("content") or ""
    return text


async def test_keep_alive_serves_many_requests_on_one_connection(
        gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    for _ in range(5):
        conn.send(post(gateway))
        resp = await conn.response()
        assert resp.status == 200
        assert resp.json()["choices"][0]["message"]["content"] == expected_content(20)
        assert resp.headers["content-length"] == str(len(resp.body))
        assert "date" in resp.headers and "connection" not in resp.headers
        assert resp.headers["x-request-id"]
    conn.send(post(gateway, body=STREAM))
    resp = await conn.response()
    assert resp.headers["transfer-encoding"] == "chunked"
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert sse_content(resp.body) == expected_content(20)
    assert resp.body.endswith(b"data: [DONE]\n\n")


async def test_a_connection_that_starts_elsewhere_is_handed_to_aiohttp(
        gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    conn.send(get("/healthz"))
    resp = await conn.response()
    assert resp.status == 200 and resp.json() == {"status": "ok"}
    # aiohttp now serves this connection, /v1 included (app.v1_route).
    conn.send(post(gateway))
    resp = await conn.response()
    assert resp.status == 200
    assert resp.json()["choices"][0]["message"]["content"] == expected_content(20)
    assert resp.headers["x-request-id"]
    conn.send(post(gateway, body=STREAM))
    resp = await conn.response()
    assert sse_content(resp.body) == expected_content(20)
    conn.send(post(gateway, body=b'{"model": "nope"}'))
    resp = await conn.response()
    assert resp.status == 404 and resp.json()["error"]["code"] == "model_not_found"


async def test_one_connection_serves_v1_health_and_unknown_routes_in_turn(
        gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    conn.send(post(gateway))
    assert (await conn.response()).status == 200
    conn.send(get("/healthz"))
    assert (await conn.response()).status == 200
    conn.send(get("/api/account"))  # the control plane is on the console port only
    resp = await conn.response()
    assert resp.status == 404 and resp.json()["error"]["type"] == "invalid_request_error"
    conn.send(get("/v1/chat/completions"))
    assert (await conn.response()).status == 405
    conn.send(get("/v1/models", b"Authorization: Bearer " + gateway.key.encode() + b"\r\n"))
    resp = await conn.response()
    assert {m["id"] for m in resp.json()["data"]} >= {"gpt-4o-mini"}


async def test_pipelined_v1_requests_are_answered_in_order(
        gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    auth = b"Authorization: Bearer " + gateway.key.encode() + b"\r\n"
    conn.send(post(gateway) + get("/v1/models", auth) + post(gateway, body=b"{bad"))
    data = b""
    while data.count(b"HTTP/1.1 ") < 3 or not data.rstrip().endswith(b"}"):
        data += await asyncio.wait_for(conn.reader.read(65536), 5)
    first, second, third = (b"HTTP/1.1 " + part for part in data.split(b"HTTP/1.1 ")[1:])
    assert first.startswith(b"HTTP/1.1 200") and b"chat.completion" in first
    assert second.startswith(b"HTTP/1.1 200") and b'"object":"list"' in second
    assert third.startswith(b"HTTP/1.1 400") and b"invalid_json" in third


async def test_pipelined_health_and_v1_requests_are_answered_in_order(
        gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    conn.send(post(gateway) + get("/healthz"))
    data = b""
    while not await_eof(data):
        data += await asyncio.wait_for(conn.reader.read(65536), 5)
    first, second = (b"HTTP/1.1 " + part for part in data.split(b"HTTP/1.1 ")[1:])
    assert first.startswith(b"HTTP/1.1 200") and b"chat.completion" in first
    assert second.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in second


def await_eof(data: bytes) -> bool:
    return data.count(b"HTTP/1.1 ") >= 2 and data.rstrip().endswith(b"}")


async def test_malformed_requests_get_an_openai_error_and_a_close(
        gateway: Gateway, connect: Opener) -> None:
    for raw in (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                b"\x00\x01garbage\r\n\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nBad Header\r\n\r\n"):
        conn = await connect(gateway)
        conn.send(raw)
        resp = await conn.response()
        assert resp.status == 400
        assert resp.json()["error"]["type"] == "invalid_request_error"
        assert resp.headers["connection"] == "close"
        assert await conn.closed()
    conn = await connect(gateway)  # the server still serves
    conn.send(post(gateway))
    assert (await conn.response()).status == 200


async def test_oversized_headers_get_431(gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    conn.send(post(gateway, extra=b"X-Big: " + b"a" * 70_000 + b"\r\n"))
    resp = await conn.response()
    assert resp.status == 431
    assert resp.json()["error"]["code"] == "request_header_fields_too_large"
    assert await conn.closed()


async def test_expect_100_continue(gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    request = post(gateway, extra=b"Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    conn.send(head + b"\r\n\r\n")
    interim = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.send(body)
    resp = await conn.response()
    assert resp.status == 200


async def test_too_large_body_is_not_read_and_unauthenticated_comes_first(
        gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/json\r\nContent-Length: 99999999\r\n\r\n{")
    resp = await conn.response()
    assert resp.status == 401
    assert resp.headers["connection"] == "close"
    assert await conn.closed()


async def test_http_1_0_clients(gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    conn.send(post(gateway, version=b"HTTP/1.0"))
    resp = await conn.response()
    assert resp.status == 200 and resp.headers["connection"] == "close"
    assert await conn.closed()
    conn = await connect(gateway)
    conn.send(post(gateway, version=b"HTTP/1.0", extra=b"Connection: keep-alive\r\n"))
    resp = await conn.response()
    assert resp.headers["connection"] == "keep-alive"
    # A stream to an HTTP/1.0 client: no chunked framing, the close ends it.
    conn.send(post(gateway, version=b"HTTP/1.0", body=STREAM,
                   extra=b"Connection: keep-alive\r\n"))
    resp = await conn.response()
    assert "transfer-encoding" not in resp.headers
    assert sse_content(resp.body) == expected_content(20)
    assert await conn.closed()


async def test_idle_connections_close_after_the_keepalive_timeout(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any, connect: Opener) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["keepalive_timeout_s"] = 0.3
    raw["server"]["head_timeout_s"] = 0.3
    gw = await gateway_factory(raw)
    conn = await connect(gw)
    conn.send(post(gw))
    assert (await conn.response()).status == 200
    started = time.monotonic()
    assert await conn.closed()
    assert time.monotonic() - started < 3.0
    # A request head that never completes is cut off too (head_timeout_s: a 408).
    conn = await connect(gw)
    conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    resp = await conn.response()
    assert resp.status == 408 and resp.json()["error"]["code"] == "request_timeout"
    assert await conn.closed()


async def test_shutdown_lets_a_stream_finish_and_closes_idle_connections(
        tmp_path: Path, mock_upstream: MockServer, connect: Opener) -> None:
    gw = await start_gateway(raw_config(tmp_path, {"local": mock_upstream.base_url}))
    idle = await connect(gw)
    idle.send(post(gw))
    assert (await idle.response()).status == 200
    busy = await connect(gw)
    busy.send(post(gw, body=STREAM, extra=b"X-Mock-Delay-Ms: 20\r\n"))
    first = await asyncio.wait_for(busy.reader.readuntil(b"\r\n\r\n"), 5)
    assert first.startswith(b"HTTP/1.1 200")
    await gw.server.shutdown()
    assert await idle.closed()
    rest = await asyncio.wait_for(busy.reader.read(), 5)
    assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


async def test_requests_leave_no_reference_cycles_behind(gateway: Gateway,
                                                         connect: Opener) -> None:
    # serve() makes full collections rare on the strength of this: what a /v1 request
    # leaves behind is freed by reference counting, not left for the cyclic GC.
    def ours(obj: object) -> bool:
        return type(obj).__module__.startswith("flintproxy")

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for body in (CHAT, STREAM, b'{"model": "nope"}', b"{bad"):
            conn = await connect(gateway)
            for _ in range(3):
                conn.send(post(gateway, body=body))
                await conn.response()
            await conn.close()
        conn = await connect(gateway)
        conn.send(b"\x00garbage\r\n\r\n")  # refused and closed by the server
        assert (await conn.response()).status == 400
        assert await conn.closed()
        await asyncio.sleep(0.3)  # connections closed, their callbacks run
        gc.collect()
        leaked = [type(o).__qualname__ for o in gc.garbage if ours(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leaked == []


async def test_a_client_that_does_not_read_pauses_its_stream(gateway: Gateway) -> None:
    # The client's socket fills: the connection's writes pause (the relay waits in
    # drain instead of buffering), and resume once the client reads again.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    writer.transport.pause_reading()
    # A long answer, and a max_tokens that allows it (the upstream is held to it).
    long_stream = STREAM[:-1] + b', "max_tokens": 150000}'
    writer.write(post(gateway, body=long_stream, extra=b"X-Mock-Chunks: 500000\r\n"))
    lean = gateway.server.data_plane
    assert lean is not None
    for _ in range(500):
        paused = [c for c in lean.connections if c.flow.write_paused]
        if paused:
            break
        await asyncio.sleep(0.02)
    assert paused, "the gateway kept writing to a client that reads nothing"
    conn = paused[0]
    assert conn.transport is not None
    most = 0
    for _ in range(25):  # while the client still reads nothing, nothing piles up
        most = max(most, conn.transport.get_write_buffer_size())
        await asyncio.sleep(0.02)
    assert most < 256 * 1024
    writer.transport.resume_reading()
    received = 0
    while received < 4 << 20:  # and the stream goes on once it reads again
        received += len(await asyncio.wait_for(reader.read(1 << 20), 5))
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_an_h2c_upgrade_is_ignored(gateway: Gateway, connect: Opener) -> None:
    # curl --http2 on http:// asks to upgrade; HTTP/1.1 answers, body and all.
    conn = await connect(gateway)
    conn.send(post(gateway, extra=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                  b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"))
    resp = await conn.response()
    assert resp.status == 200
    assert resp.json()["choices"][0]["message"]["content"] == expected_content(20)


async def test_a_chunked_body_and_connection_close(gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    head = post(gateway, body=b"").partition(b"Content-Length")[0]
    conn.send(head + b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"".join(b"%x\r\n%b\r\n" % (len(part), part)
                         for part in (CHAT[:10], CHAT[10:40], CHAT[40:]))
              + b"0\r\n\r\n")
    resp = await conn.response()
    assert resp.status == 200 and resp.headers["connection"] == "close"
    assert resp.json()["choices"][0]["message"]["content"] == expected_content(20)
    assert await conn.closed()
