"""The control plane under hostile clients: raw sockets against ``gateway.console_url``.

Slow heads and bodies are cut at their deadlines, connection caps refuse cleanly,
malformed requests get a 4xx in the API's error shape and leave no client address,
no key and no body bytes in any log line (in process and from ``flintproxy serve``),
bad parameters are 4xx, and the hardening of issue 14 (Server header, Secure cookies,
private database files, disabled accounts) holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from flintproxy.ops.logfilter import redact, scrub
from tests.conftest import Gateway, MockServer, raw_config, start_gateway
from tests.web.test_api import PASSWORD, Browser

# Clients connect from this loopback address, so it appearing anywhere in a log means
# a client address was logged (the server's own addresses are 127.0.0.1).
CLIENT_IP = "127.0.0.3"
StartConsole = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start(tmp_path: Path, mock_upstream: MockServer) -> AsyncIterator[StartConsole]:
    started: list[Gateway] = []

    async def factory(console: dict[str, Any] | None = None, **sections: Any) -> Gateway:
        raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
        raw["console"] = {"host": "127.0.0.1", "port": 0, "head_timeout_s": 0.5,
                          "body_timeout_s": 0.5, **(console or {})}
        for name, table in sections.items():
            raw[name] = {**raw.get(name, {}), **table}
        gw = await start_gateway(raw)
        started.append(gw)
        return gw

    yield factory
    for gw in reversed(started):
        await gw.server.shutdown()


def console_port(gw: Gateway) -> int:
    return int(gw.server.console_addresses[0][1])


async def connect(port: int, ip: str = CLIENT_IP
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))


async def exchange(port: int, raw: bytes, ip: str = CLIENT_IP) -> bytes:
    """Send ``raw``, then read until the server closes (bounded)."""
    reader, writer = await connect(port, ip)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(1 << 20), 10)
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded)."""
    data = b""
    while chunk := await asyncio.wait_for(reader.read(65536), 10):
        data += chunk
    return data


def status_and_error(response: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, orjson.loads(body)["error"]


async def get(port: int, path: str, ip: str = CLIENT_IP) -> bytes:
    return await exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                                "Connection: close\r\n\r\n".encode(), ip)


# --- slowloris: deadlines ----------------------------------------------------------------


async def test_a_body_that_never_comes_is_cut_at_the_body_deadline(start: StartConsole) -> None:
    gw = await start()
    reader, writer = await connect(console_port(gw))
    writer.write(b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"email\"")
    await writer.drain()
    assert await closed_by_server(reader) == b""  # cut, without an answer to wait for
    writer.close()
    assert await get(console_port(gw), "/api/account")  # and the console still serves


async def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_head_deadline(
        start: StartConsole) -> None:
    gw = await start()
    reader, writer = await connect(console_port(gw))

    async def trickle() -> None:
        for byte in b"GET /api/account HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    dripping = asyncio.ensure_future(trickle())
    try:
        assert await closed_by_server(reader) == b""
    finally:
        dripping.cancel()
        writer.close()


async def test_an_idle_connection_is_closed_after_the_head_deadline(start: StartConsole) -> None:
    gw = await start()
    reader, writer = await connect(console_port(gw))
    writer.write(b"GET /api/account HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive
    response = await closed_by_server(reader)
    assert response.startswith(b"HTTP/1.1 401 ")
    writer.close()


async def test_a_slow_body_within_its_deadline_is_served(start: StartConsole) -> None:
    gw = await start({"body_timeout_s": 5.0})
    body = orjson.dumps({"email": "nobody@example.com", "password": "wrong password"})
    reader, writer = await connect(console_port(gw))
    writer.write(b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 8):
        writer.write(body[i:i + 8])
        await asyncio.sleep(0.05)
    status, error = status_and_error(await closed_by_server(reader))
    writer.close()
    assert status == 401 and error["code"] == "invalid_credentials"


# --- connection caps -----------------------------------------------------------------------


async def test_connections_over_the_per_ip_cap_get_a_503_and_the_rest_still_serve(
        start: StartConsole) -> None:
    gw = await start({"head_timeout_s": 30.0, "max_connections_per_ip": 3})
    port = console_port(gw)
    held = [await connect(port) for _ in range(3)]
    refused = await exchange(port, b"")
    status, error = status_and_error(refused)
    assert status == 503 and error["code"] == "too_many_connections"
    assert b"\r\nX-Content-Type-Options: nosniff\r\n" in refused  # as every console answer
    # Another address is not affected, nor is the data plane.
    assert (await get(port, "/api/account", ip="127.0.0.4")).startswith(b"HTTP/1.1 401 ")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 200 ")
    writer.close()
    # A slot freed is a slot usable.
    held.pop()[1].close()
    for _ in range(100):
        if gw.server._runners[0].server.open_connections < 3:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.02)
    assert (await get(port, "/api/account")).startswith(b"HTTP/1.1 401 ")
    for _, w in held:
        w.close()


async def test_connections_over_the_global_cap_get_a_503(start: StartConsole) -> None:
    gw = await start({"head_timeout_s": 30.0, "max_connections": 3,
                      "max_connections_per_ip": 2})
    port = console_port(gw)
    held = [await connect(port, "127.0.0.3"), await connect(port, "127.0.0.3"),
            await connect(port, "127.0.0.4")]
    status, error = status_and_error(await exchange(port, b"", ip="127.0.0.5"))
    assert status == 503 and error["type"] == "server_error"
    for _, w in held:
        w.close()


async def test_a_trusted_proxy_counts_towards_the_global_cap_only(start: StartConsole) -> None:
    # Everyone behind a reverse proxy shares its address: a per-IP cap would be global.
    gw = await start({"head_timeout_s": 30.0, "max_connections": 4,
                      "max_connections_per_ip": 1},
                     limits={"trusted_proxies": [f"{CLIENT_IP}/32"]})
    port = console_port(gw)
    held = [await connect(port) for _ in range(3)]
    # The proxy's 4th connection is served, though the per-IP cap is 1...
    reader, writer = await connect(port)
    writer.write(b"GET /api/account HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(
        b"HTTP/1.1 401 ")
    # ...and counts towards the global cap: a 5th connection, from anyone, is refused.
    status, _ = status_and_error(await exchange(port, b"", ip="127.0.0.4"))
    assert status == 503
    for _, w in [*held, (reader, writer)]:
        w.close()


async def test_a_hundred_and_ten_stalled_logins_do_not_starve_anyone(
        start: StartConsole) -> None:
    # The reported attack: 110 connections holding POST /api/login without a body.
    # ip_rpm high: each login reaches its body read instead of an early 429.
    gw = await start({"body_timeout_s": 1.0, "max_connections_per_ip": 20},
                     limits={"ip_rpm": 100_000})
    port = console_port(gw)
    stalled = []
    for _ in range(110):
        r, w = await connect(port)
        w.write(b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        stalled.append((r, w))
    assert (await get(port, "/api/account", ip="127.0.0.9")).startswith(b"HTTP/1.1 401 ")
    for r, w in stalled:
        await closed_by_server(r)  # each one cut or refused, none held
        w.close()


# --- malformed requests: 4xx in the API's shape, nothing in the logs -----------------------


def hostile_requests(marker: str, key: str) -> list[bytes]:
    m, k = marker.encode(), key.encode()
    return [
        b"GET /api/account HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + k
        + b"\r\nX-Bad\x00Name: " + m + b"\r\n\r\n",
        b"POST /api/login HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + k
        + b"\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n" + m,
        m + b" /api/login HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/" + m + b" HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /api/account HTTP/1.1\r\nHost: x\r\nX-Big: " + m + b"a" * 20000 + b"\r\n\r\n",
        b"POST /api/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz" + m + b"\r\n" + k + b"\r\n0\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + m + k + os.urandom(64),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + m,
        b"GET /api/account HTTP/1.1\r\nHost: x\r\nCookie: flint_session=" + k
        + b"\r\n X-Folded: " + m + b"\r\n\r\n",
        b"GET /api/account HTTP/1.1\r\n" + b"X-Many: " + m + b"\r\n" * 1 + b"A: b\r\n" * 300
        + b"\r\n",
    ]


def assert_clean(text: str, marker: str, key: str) -> None:
    assert marker not in text
    assert key not in text and key[:20] not in text
    assert CLIENT_IP not in text


async def test_malformed_requests_are_4xx_in_the_api_shape_and_never_logged(
        start: StartConsole, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await start()
    marker = "MARKER-" + secrets.token_hex(8)
    port = console_port(gw)
    for raw in hostile_requests(marker, gw.key):
        response = await exchange(port, raw)
        if response:  # an answer, when there is one, is ours: 4xx, JSON, no echo
            status, error = status_and_error(response)
            assert 400 <= status < 500, response
            assert set(error) == {"message", "type", "param", "code"}
            assert b"Server: flintproxy" in response
            assert marker.encode() not in response
    assert (await get(port, "/api/account")).startswith(b"HTTP/1.1 401 ")
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.exc_info or ''}"
                       for r in caplog.records)
    assert_clean(logged + caplog.text, marker, gw.key)


def test_third_party_records_lose_their_arguments_and_tracebacks() -> None:
    # What aiohttp's own handle_error logs, were it ever reached.
    logger = logging.getLogger("aiohttp.server")
    try:
        raise ValueError(b"Authorization: Bearer sk-flint-abcdefgh MARKER")
    except ValueError as exc:
        record = logger.makeRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                   "Error handling request from %s", ("203.0.113.9",),
                                   (type(exc), exc, exc.__traceback__))
    text = logging.Formatter().format(scrub(record))
    assert "203.0.113.9" not in text and "MARKER" not in text and "sk-flint" not in text
    assert "Error handling request from" in text and "ValueError" in text
    assert redact("from 2001:db8::1 and ::ffff:10.0.0.1 Bearer abc") .count("<redacted>") == 3


def test_a_third_party_dump_keeps_only_its_first_line() -> None:
    # asyncio's exception handler lists the context, exceptions' reprs included.
    record = logging.getLogger("asyncio").makeRecord(
        "asyncio", logging.ERROR, __file__, 1,
        "Task exception was never retrieved\nfuture: <Task exception=ValueError(b'MARKER')>",
        None, None)
    text = scrub(record).getMessage()
    assert text.startswith("Task exception was never retrieved") and "MARKER" not in text


def test_our_own_records_are_left_as_they_are() -> None:
    record = logging.getLogger("flintproxy.web").makeRecord(
        "flintproxy.web", logging.INFO, __file__, 1, "listening on %s:%d", ("127.0.0.1", 8081),
        None)
    assert scrub(record).getMessage() == "listening on 127.0.0.1:8081"


@pytest.mark.slow
async def test_flintproxy_serve_logs_nothing_of_a_malformed_request(
        tmp_path: Path, mock_upstream: MockServer) -> None:
    marker = "MARKER-" + secrets.token_hex(8)
    key = "sk-flint-" + secrets.token_hex(20)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    config = tmp_path / "flintproxy.toml"
    config.write_text(f"""
[server]
host = "127.0.0.1"
port = {ports[0]}
[console]
host = "127.0.0.1"
port = {ports[1]}
head_timeout_s = 0.5
body_timeout_s = 0.5
[storage]
path = "{tmp_path / 'var' / 'flintproxy.db'}"
[[upstreams]]
name = "local"
base_url = "{mock_upstream.base_url}"
models = ["gpt-4o-mini"]
[models."gpt-4o-mini"]
input_usd_per_mtok = "0.15"
output_usd_per_mtok = "0.60"
[accounts]
bcrypt_cost = 4
""")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flintproxy", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONASYNCIODEBUG": "1"})
    try:
        for _ in range(200):
            try:
                await get(ports[1], "/api/account")
                break
            except OSError:
                await asyncio.sleep(0.05)
        for raw in hostile_requests(marker, key):
            await exchange(ports[1], raw)
        await exchange(ports[1], b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                                 b"\r\nAuthorization: Bearer " + key.encode() + b"\r\n\r\n"
                                 + marker.encode())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert b"listening" in err  # the log was captured
    assert_clean(out.decode("utf-8", "replace") + err.decode("utf-8", "replace"), marker, key)


# --- parameters and bodies: 4xx, never 500 -------------------------------------------------


@pytest.fixture
async def user(start: StartConsole) -> AsyncIterator[Browser]:
    gw = await start()
    b = Browser(gw)
    await b.signup("hostile@example.com")
    yield b
    await b.http.close()


@pytest.mark.parametrize("query", [
    "since=99999999999999999999", "until=99999999999999999999", "since=-1",
    "since=%C2%B2", "since=0001-01-01T00:00:00%2B23:59", "until=9999-12-31T23:59:59-23:59",
    "since=" + "9" * 5000, "cursor=9999999999999999999_9999999999999999999",
    "limit=99999999999999999999999", "limit=%D9%A5", "since=%FF%FE",
])
async def test_out_of_range_usage_parameters_are_400(user: Browser, query: str) -> None:
    paged = query.startswith(("cursor=", "limit="))  # the export reads neither
    for path in ("/api/usage",) if paged else ("/api/usage", "/api/usage/export"):
        status, body, _ = await user.call("GET", f"{path}?{query}")
        assert status == 400, (path, query, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}


def nested(depth: int) -> bytes:
    return b'{"email":' * depth + b'"x"' + b"}" * depth


@pytest.mark.parametrize("body", [
    nested(300), b"[" * 300 + b"]" * 300, nested(5000), b'{"email": ' + b"[" * 300
    + b"]" * 300 + b', "password": {"a": {"b": 1}}}',
    b'{"name": 1e999, "expires_in_days": 1e308}', b'{"allowed_models": [[[[["x"]]]]]}',
    b'{"expires_at": 99999999999999999999999999}', b"\xff\xfe{}", b'"just a string"',
    b'{"email": 5, "password": 5}', b'{"email": null, "password": ["x"]}',
    b'{"name": {"a": 1}}', b'{"allowed_models": "gpt-4o-mini"}',
    b'{"new_email": ["a@b.c"], "password": null}', b'{"expires_in_days": true}',
    b'{"current_password": 1, "new_password": {"x": 1}}',
])
async def test_hostile_json_bodies_are_4xx(user: Browser, body: bytes) -> None:
    for path in ("/api/login", "/api/signup", "/api/keys", "/api/account/email",
                 "/api/account/password"):
        async with user.http.post(user.gw.console_url + path, data=body, headers={
                "Content-Type": "application/json", "X-CSRF-Token": user.csrf or ""}) as resp:
            payload = await resp.json()
        assert 400 <= resp.status < 500, (path, body[:40], payload)
        assert set(payload["error"]) == {"message", "type", "param", "code"}


# --- issue 14: Server header, Secure cookies, private files, disabled accounts -------------


async def test_console_responses_say_server_flintproxy(start: StartConsole) -> None:
    gw = await start()
    for path in ("/api/account", "/nowhere", "/metrics"):
        response = await get(console_port(gw), path)
        assert b"\r\nServer: flintproxy\r\n" in response
        assert b"aiohttp" not in response and b"Python/" not in response
    response = await exchange(console_port(gw), b"\x00\x01garbage\r\n\r\n")
    assert b"aiohttp" not in response and b"Python/" not in response


@pytest.mark.parametrize(("proto", "trusted", "secure"), [
    (None, False, False), ("https", False, False), ("https", True, True),
    ("http", True, False),
])
async def test_session_cookies_are_secure_when_the_request_came_over_https(
        start: StartConsole, proto: str | None, trusted: bool, secure: bool) -> None:
    gw = await start(limits={"trusted_proxies": ["127.0.0.0/8"]} if trusted else {})
    b = Browser(gw)
    try:
        _, _, resp = await b.call("POST", "/api/signup",
                                  {"email": "c@example.com", "password": PASSWORD},
                                  headers={"X-Forwarded-Proto": proto} if proto else None)
        cookies = resp.headers.getall("Set-Cookie")
    finally:
        await b.http.close()
    assert len(cookies) == 2
    assert all(("Secure" in c) is secure for c in cookies)


async def test_secure_cookies_false_turns_them_off_behind_an_https_proxy(
        start: StartConsole) -> None:
    gw = await start(accounts={"secure_cookies": False},
                     limits={"trusted_proxies": ["127.0.0.0/8"]})
    b = Browser(gw)
    try:
        _, _, resp = await b.call("POST", "/api/signup",
                                  {"email": "d@example.com", "password": PASSWORD},
                                  headers={"X-Forwarded-Proto": "https"})
    finally:
        await b.http.close()
    assert not any("Secure" in c for c in resp.headers.getall("Set-Cookie"))


async def test_the_database_and_its_directory_are_private(
        tmp_path: Path, mock_upstream: MockServer) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    data_dir = tmp_path / "fresh" / "var"
    raw["storage"] = {"path": str(data_dir / "flintproxy.db")}
    old = os.umask(0o022)
    try:
        gw = await start_gateway(raw)
    finally:
        os.umask(old)
    try:
        files = sorted(p.name for p in data_dir.iterdir())
        assert {"flintproxy.db", "flintproxy.db-wal", "flintproxy.db-shm"} <= set(files)
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        for p in data_dir.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (p.name, oct(p.stat().st_mode))
    finally:
        await gw.server.shutdown()


async def test_a_disabled_account_cannot_log_in_or_change_anything_but_keeps_its_data_rights(
        start: StartConsole) -> None:
    gw = await start()
    b = Browser(gw)
    try:
        body = await b.signup("off@example.com")
        account_id = body["account"]["id"]
        await gw.components.accounts.set_status(account_id, "disabled")
        for method, path, payload in (
                ("POST", "/api/account/email", {"new_email": "new@example.com",
                                                "password": PASSWORD}),
                ("POST", "/api/account/password", {"current_password": PASSWORD,
                                                   "new_password": "another long one"}),
                ("POST", "/api/keys", {"name": "k"}),
                ("DELETE", "/api/keys/1", None)):
            status, err, _ = await b.call(method, path, payload)
            assert status == 403 and err["error"]["code"] == "account_disabled", (path, err)
        status, account, _ = await b.call("GET", "/api/account")
        assert status == 200 and account["email"] == "off@example.com"
        status, _, _ = await b.call("GET", "/api/usage/export?format=json")
        assert status == 200
        # A new login is refused, clearly, to whoever knows the password...
        fresh = Browser(gw)
        try:
            status, err, _ = await fresh.call("POST", "/api/login",
                                              {"email": "off@example.com", "password": PASSWORD})
            assert status == 403 and err["error"]["code"] == "account_disabled"
            status, err, _ = await fresh.call("POST", "/api/login",
                                              {"email": "off@example.com",
                                               "password": "not the password"})
            assert status == 401  # ...and to no one else
        finally:
            await fresh.http.close()
        status, _, _ = await b.call("DELETE", "/api/account", {"password": PASSWORD})
        assert status == 204
    finally:
        await b.http.close()
