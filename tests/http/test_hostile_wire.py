"""Hostile clients against the lean server (issue 12: the wire): one test per defect.

Raw sockets against the real gateway, with small deadlines configured per test so
that each scenario ends in a second or two: trailers, slowloris heads and bodies,
clients that stop reading, pipelined floods, connection caps, 100 Continue in the
middle of a stream, header floods, a port already taken, and shutdown with live
streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from flintproxy.http.exchange import index_headers
from flintproxy.http.server import FEED_SLICE, MAX_HEADER_LINES, MAX_PIPELINED
from flintproxy.tools.mock import MockSettings
from tests.conftest import Gateway, MockServer, raw_config, start_mock
from tests.http.test_server import CHAT, STREAM, Conn, Opener, Response, connect, get, post

__all__ = ["connect"]  # the fixture, imported to be used here

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def slow_upstream() -> AsyncIterator[MockServer]:
    """A mock whose streams last about 20 s (100 chunks, 200 ms apart)."""
    server = await start_mock(MockSettings(chunks=100, delay_ms=200))
    yield server
    await server.runner.cleanup()


@pytest.fixture
async def endless_upstream() -> AsyncIterator[MockServer]:
    """A mock whose streams outrun any client (200,000 chunks, no delay)."""
    server = await start_mock(MockSettings(chunks=200_000))
    yield server
    await server.runner.cleanup()


async def small_window(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose client-side receive buffer is tiny: it fills at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
    return await asyncio.open_connection(sock=sock, limit=1 << 24)


async def until(predicate: Any, limit_s: float = 10.0) -> bool:
    """Poll ``predicate`` every 50 ms up to ``limit_s``; its last value."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def usage_rows(gw: Gateway) -> list[sqlite3.Row]:
    db = sqlite3.connect(f"file:{gw.config.storage.path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM usage ORDER BY id").fetchall()
    finally:
        db.close()


def chunked(head: bytes, parts: list[bytes], trailer: bytes = b"") -> bytes:
    return (head + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts)
            + b"0\r\n" + trailer + b"\r\n")


def unauthenticated_head(path: bytes = b"/v1/chat/completions") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


# -- 6. trailers ---------------------------------------------------------------------


async def test_a_trailer_never_authenticates(gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    trailer = b"Authorization: Bearer " + gateway.key.encode() + b"\r\n"
    conn.send(chunked(unauthenticated_head(), [CHAT[:20], CHAT[20:]], trailer))
    resp = await conn.response()
    assert resp.status == 401, resp.body
    assert resp.json()["error"]["code"] == "missing_api_key"
    # The same request with the header where it belongs is served on that connection.
    conn.send(chunked(unauthenticated_head() + trailer, [CHAT]))
    assert (await conn.response()).status == 200


async def test_a_trailer_never_reaches_the_upstream(
        gateway: Gateway, mock_upstream: MockServer, connect: Opener) -> None:
    conn = await connect(gateway)
    head = post(gateway, body=b"").partition(b"Content-Length")[0]
    conn.send(chunked(head, [CHAT], b"X-Forwarded-For: 203.0.113.9\r\nX-Trailer-Mark: 1\r\n"))
    assert (await conn.response()).status == 200
    seen = mock_upstream.stats.last_headers
    assert "x-trailer-mark" not in seen
    assert "203.0.113.9" not in repr(seen)


async def test_trailers_are_bounded_in_size(gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    head = post(gateway, body=b"").partition(b"Content-Length")[0]
    trailer = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80))
    conn.send(chunked(head, [CHAT], trailer))
    resp = await conn.response()
    assert resp.status == 431
    assert resp.json()["error"]["code"] == "request_header_fields_too_large"
    assert await conn.closed()


# -- 7. slowloris, stalled readers, pipelined floods, connection caps -----------------


async def test_a_head_dribbled_byte_by_byte_is_refused_408_after_the_head_timeout(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any,
        connect: Opener) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["head_timeout_s"] = 0.5
    gw = await gateway_factory(raw)
    conn = await connect(gw)
    head = post(gw)

    async def dribble() -> None:
        for byte in head:  # one byte every 50 ms: the head would take ~20 s
            conn.send(bytes([byte]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(dribble())
    try:
        resp = await conn.response()
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    assert resp.status == 408
    assert resp.json()["error"] == {"message": "The request was not received in time.",
                                    "type": "invalid_request_error", "param": None,
                                    "code": "request_timeout"}
    assert await conn.closed()
    # The server still serves.
    conn = await connect(gw)
    conn.send(post(gw))
    assert (await conn.response()).status == 200


async def test_a_body_that_never_arrives_is_refused_408_after_the_body_timeout(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any,
        connect: Opener) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["body_timeout_s"] = 0.5
    gw = await gateway_factory(raw)
    conn = await connect(gw)
    conn.send(post(gw).partition(b"\r\n\r\n")[0].replace(
        b"Content-Length: %d" % len(CHAT), b"Content-Length: 100") + b"\r\n\r\n{\"mo")
    resp = await conn.response()
    assert resp.status == 408 and resp.json()["error"]["code"] == "request_timeout"
    assert await conn.closed()
    assert gw.server.data_plane.connections == set() or await until(
        lambda: not gw.server.data_plane.connections, 5)


async def test_many_slow_heads_at_once_are_all_refused_while_others_are_served(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any,
        connect: Opener) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"].update(head_timeout_s=0.5, max_connections_per_ip=0)
    gw = await gateway_factory(raw)
    slow = [await connect(gw) for _ in range(60)]
    for conn in slow:
        conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    fresh = await connect(gw)
    fresh.send(post(gw))
    assert (await fresh.response()).status == 200
    answers = await asyncio.gather(*(conn.response() for conn in slow))
    assert {resp.status for resp in answers} == {408}
    assert await until(lambda: len(gw.server.data_plane.connections) == 1, 5)


async def test_a_client_that_stops_reading_a_stream_is_cut_and_billed_for_what_was_relayed(
        tmp_path: Path, endless_upstream: MockServer, gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": endless_upstream.base_url})
    raw["server"]["write_timeout_s"] = 0.5
    gw = await gateway_factory(raw)
    _, writer = await small_window(gw)
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    # A limit far above what fills the client's window (and under the TPM limit).
    writer.write(post(gw, body=STREAM[:-1] + b', "max_tokens": 150000}'))
    lean = gw.server.data_plane
    assert await until(lambda: any(c.flow.write_paused for c in lean.connections))
    # Cut within the write timeout (plus the one-second sweep), not held for ever.
    assert await until(lambda: not lean.connections, 10), "a stalled reader held its stream"
    # The upstream stream was let go of too, and the request billed.
    assert await until(lambda: endless_upstream.stats.active_streams == 0, 10)
    assert await until(lambda: len(usage_rows(gw)) == 1, 10)
    row = usage_rows(gw)[0]
    assert row["outcome"] == "client_disconnect" and row["stream"] == 1
    assert row["completion_tokens"] > 0 and row["cost_nano"] > 0
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_pipelined_requests_from_a_client_that_never_reads_do_not_stay_queued(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["write_timeout_s"] = 0.5
    gw = await gateway_factory(raw)
    _, writer = await small_window(gw)
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    one = get("/healthz")
    writer.write(one * (4_600_000 // len(one)))  # 4.6 MB of requests, never a read
    lean = gw.server.data_plane
    assert await until(lambda: bool(lean.connections), 5)
    most = 0

    def gone() -> bool:
        nonlocal most
        most = max([most, *(len(c.queue) for c in lean.connections)])
        return not lean.connections

    assert await until(gone, 10), "the flood stayed queued"
    # Bounded: what waits is at most MAX_PIPELINED plus one parsed slice's worth.
    assert most <= MAX_PIPELINED + FEED_SLICE // len(one) + 1
    writer.transport.abort()


async def test_connections_over_the_per_address_cap_are_refused_503(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any,
        connect: Opener) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["max_connections_per_ip"] = 2
    gw = await gateway_factory(raw)
    held = [await connect(gw), await connect(gw)]
    for conn in held:
        conn.send(get("/healthz"))
        assert (await conn.response()).status == 200
    extra = await connect(gw)
    resp = await extra.response()
    assert resp.status == 503 and resp.headers["connection"] == "close"
    assert resp.json()["error"]["code"] == "too_many_connections"
    assert resp.json()["error"]["type"] == "server_error"
    assert await extra.closed()
    await held[0].close()
    assert await until(lambda: len(gw.server.data_plane.connections) == 1, 5)
    again = await connect(gw)
    again.send(post(gw))
    assert (await again.response()).status == 200


async def test_a_trusted_proxy_is_never_capped_per_address(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any,
        connect: Opener) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["max_connections_per_ip"] = 1
    raw["limits"] = {"trusted_proxies": ["127.0.0.0/8"]}
    gw = await gateway_factory(raw)
    conns = [await connect(gw) for _ in range(3)]  # every client behind the proxy
    for conn in conns:
        conn.send(get("/healthz"))
        assert (await conn.response()).status == 200


async def test_connections_over_the_global_cap_are_refused_503_and_zero_is_off(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any,
        connect: Opener) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["max_connections"] = 1
    gw = await gateway_factory(raw)
    first = await connect(gw)
    first.send(get("/healthz"))
    assert (await first.response()).status == 200
    refused = await connect(gw)
    resp = await refused.response()
    assert resp.status == 503 and resp.json()["error"]["code"] == "too_many_connections"
    raw["server"].update(max_connections=0, max_connections_per_ip=0)
    open_gw = await gateway_factory(raw)
    conns = [await connect(open_gw) for _ in range(300)]
    for conn in conns[-3:]:
        conn.send(get("/healthz"))
        assert (await conn.response()).status == 200


# -- 9. 100 Continue -----------------------------------------------------------------


async def test_100_continue_is_never_written_into_another_response(
        gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    waiting = post(gateway, extra=b"Expect: 100-continue\r\n").partition(b"\r\n\r\n")[0]
    # A stream, and pipelined behind it the head of a request that awaits 100 Continue.
    conn.send(post(gateway, body=STREAM) + waiting + b"\r\n\r\n")
    data = b""
    end = b"data: [DONE]\n\n\r\n0\r\n\r\n"
    while end not in data:
        got = await asyncio.wait_for(conn.reader.read(65536), 5)
        assert got, "closed early"
        data += got
    first, _, rest = data.partition(end)
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"100 Continue" not in first
    continued = b"HTTP/1.1 100 Continue\r\n\r\n"
    while len(rest) < len(continued):
        rest += await asyncio.wait_for(conn.reader.read(65536), 5)
    assert rest.startswith(continued)
    conn.buffer = rest[len(continued):]
    conn.send(CHAT)
    assert (await conn.response()).status == 200


async def test_100_continue_is_sent_at_once_when_nothing_else_is_due(
        gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    conn.send(post(gateway, extra=b"Expect: 100-continue\r\n").partition(b"\r\n\r\n")[0]
              + b"\r\n\r\n")
    got = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 5)
    assert got == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.send(CHAT)
    resp = await conn.response()
    assert resp.status == 200 and resp.interim == []


# -- 12. header floods ---------------------------------------------------------------


async def test_twelve_thousand_repeated_header_lines_are_refused_431(
        gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    # Short lines: 12,000 of them fit in MAX_HEAD, so only the line cap refuses them.
    conn.send(post(gateway, extra=b"A:\r\n" * 12_000))
    resp = await conn.response()
    assert resp.status == 431
    assert resp.json()["error"]["code"] == "request_header_fields_too_large"
    assert await conn.closed()


async def test_header_lines_up_to_the_cap_are_served(gateway: Gateway, connect: Opener) -> None:
    conn = await connect(gateway)
    base = post(gateway).count(b"\r\n") - 2  # its own header lines
    fill = MAX_HEADER_LINES - base
    conn.send(post(gateway, extra=b"X-A: 1\r\n" * fill))
    assert (await conn.response()).status == 200
    conn.send(post(gateway, extra=b"X-A: 1\r\n" * (fill + 1)))
    assert (await conn.response()).status == 431


def test_repeated_headers_are_joined_once_in_order() -> None:
    raw = [(b"X-A", b"1"), (b"Host", b"h"), (b"x-a", b"2"), (b"X-A", b"3"), (b"X-B", b"")]
    assert index_headers(raw) == {b"x-a": b"1, 2, 3", b"host": b"h", b"x-b": b""}
    many = [(b"X-A", b"%d" % i) for i in range(12_000)]
    assert index_headers(many)[b"x-a"] == b", ".join(b"%d" % i for i in range(12_000))


# -- 13. a port already taken --------------------------------------------------------


def _config_file(tmp_path: Path, port: int, console_port: int, upstream: str,
                 extra: str = "") -> Path:
    path = tmp_path / "flintproxy.toml"
    path.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
{extra}
[console]
host = "127.0.0.1"
port = {console_port}

[storage]
path = "{tmp_path / 'flintproxy.db'}"

[[upstreams]]
name = "local"
base_url = "{upstream}"
models = ["gpt-4o-mini"]

[models."gpt-4o-mini"]
input_usd_per_mtok = "0.15"
output_usd_per_mtok = "0.60"

[accounts]
bcrypt_cost = 4
bootstrap_demo = true
""")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("taken", ["data plane", "control plane"])
async def test_serve_exits_1_with_a_clear_message_when_its_port_is_taken(
        tmp_path: Path, taken: str) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    busy = int(squatter.getsockname()[1])
    free = _free_port()
    port, console = (busy, free) if taken == "data plane" else (free, busy)
    config = _config_file(tmp_path, port, console, "http://127.0.0.1:9/v1")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flintproxy", "serve", "--config", str(config),
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError("serve hung with its port taken") from None
    finally:
        squatter.close()
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert lines[-1] == f"error: cannot listen on 127.0.0.1:{busy} (Address already in use)"
    assert "Traceback" not in err.decode()


# -- graceful shutdown ---------------------------------------------------------------


async def _read_to_end(conn: Conn) -> bytes:
    data = conn.buffer
    while True:
        try:
            got = await asyncio.wait_for(conn.reader.read(65536), 10)
        except ConnectionError:
            break
        if not got:
            break
        data += got
    return data


async def test_shutdown_ends_a_stream_still_open_with_an_error_event_and_bills_it(
        tmp_path: Path, slow_upstream: MockServer, gateway_factory: Any,
        connect: Opener) -> None:
    raw = raw_config(tmp_path, {"local": slow_upstream.base_url})
    raw["server"]["shutdown_timeout_s"] = 0.5
    gw = await gateway_factory(raw)
    conn = await connect(gw)
    conn.send(post(gw, body=STREAM))
    head = await asyncio.wait_for(conn.reader.readuntil(b"data: "), 5)
    assert head.startswith(b"HTTP/1.1 200")
    waiting = await connect(gw)  # a non-streamed request in flight too
    waiting.send(post(gw, extra=b""))
    await gw.server.shutdown()
    resp = Response()
    resp.parser.feed_data(head + await _read_to_end(conn))
    assert resp.complete, "the chunked body was not ended"
    events = [e for e in resp.body.split(b"\n\n") if e.strip()]
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "server_shutting_down"
    assert last["error"]["type"] == "server_error"
    assert b"[DONE]" not in resp.body
    rows = usage_rows(gw)
    streamed = [r for r in rows if r["stream"] == 1]
    assert len(streamed) == 1 and streamed[0]["completion_tokens"] > 0


async def test_sigterm_lets_streams_finish_within_the_grace_period_and_exits_0(
        tmp_path: Path) -> None:
    mock = await start_mock(MockSettings(chunks=10, delay_ms=100))  # 1 s streams
    port = _free_port()
    config = _config_file(tmp_path, port, _free_port(), mock.base_url,
                          "shutdown_timeout_s = 5.0\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flintproxy", "serve", "--config", str(config), cwd=ROOT,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        out = b""
        while not re.search(rb"shown once:\n(\S+)\n", out):
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "serve ended before it was ready"
            out += line
        match = re.search(rb"shown once:\n(\S+)\n", out)
        assert match is not None
        key = match.group(1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = Conn(reader, writer)
        conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + key + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                  % len(STREAM) + STREAM)
        head = await asyncio.wait_for(reader.readuntil(b"data: "), 10)
        proc.send_signal(signal.SIGTERM)
        resp = Response()
        resp.parser.feed_data(head + await _read_to_end(conn))
        assert resp.complete and resp.body.endswith(b"data: [DONE]\n\n")
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await conn.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await mock.runner.cleanup()
    db = sqlite3.connect(tmp_path / "flintproxy.db")
    try:
        outcomes = [r[0] for r in db.execute("SELECT outcome FROM usage WHERE stream = 1")]
    finally:
        db.close()
    assert outcomes == ["ok"]
