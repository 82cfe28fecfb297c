"""Nothing private leaves: hostile scenarios against a gateway process, then a scan.

Each scenario plants unique markers (in bodies, keys, passwords, headers) and sends
from a client address of its own (127.0.0.2: any loopback address works on Linux),
then ``LeakScanner`` looks for them in the data dir, the process's stdout/stderr and
what the upstream received. The gateway runs as ``flintproxy serve`` does, so the
logs scanned are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from flintproxy.tools.mock import MockSettings
from tests.conftest import MockServer, raw_config, start_mock
from tests.support import LeakScanner, LiveGateway, marker

CLIENT_IP = "127.0.0.2"  # the hostile client's address: it must reach no log or disk
SPOOFED_IP = "198.51.100.77"  # what it claims in forwarding headers


@pytest.fixture
async def upstream() -> AsyncIterator[MockServer]:
    server = await start_mock(MockSettings(chunks=5, record=True))
    yield server
    await server.runner.cleanup()


@pytest.fixture
async def live(tmp_path: Path, upstream: MockServer) -> AsyncIterator[LiveGateway]:
    gw = await asyncio.to_thread(
        LiveGateway(tmp_path, raw_config(tmp_path, {"local": upstream.base_url})).start)
    yield gw
    await asyncio.to_thread(gw.stop)


@pytest.fixture
def scanner(live: LiveGateway) -> LeakScanner:
    scan = LeakScanner()
    scan.add(CLIENT_IP, live.key, live.password)
    return scan


def sdk(gw: LiveGateway, key: str | None = None, **headers: str) -> openai.AsyncOpenAI:
    transport = httpx.AsyncHTTPTransport(local_address=CLIENT_IP)
    return openai.AsyncOpenAI(api_key=key or gw.key, base_url=gw.base_url, max_retries=0,
                              default_headers=headers or None,
                              http_client=httpx.AsyncClient(transport=transport, timeout=20))


def http(base: str) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=CLIENT_IP)
    return httpx.AsyncClient(transport=transport, base_url=base, timeout=20)


async def raw_exchange(port: int, data: bytes, wait: float = 3.0) -> bytes:
    """Send bytes from the client address; whatever comes back before close or ``wait``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=(CLIENT_IP, 0))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), wait)
    except (TimeoutError, ConnectionError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def settle(gw: LiveGateway) -> None:
    """Stop the gateway as an operator does (SIGTERM): the usage writer drains and the
    logs are complete, so the scan sees everything it will ever write."""
    assert gw.alive(), gw.stderr[-3000:]
    assert await asyncio.to_thread(gw.stop) == 0, gw.stderr[-3000:]


def everywhere_but_upstream(gw: LiveGateway) -> dict[str, object]:
    return {"data_dirs": [gw.data_dir], "logs": gw.logs()}


async def test_content_and_keys_reach_neither_disk_nor_logs(
        live: LiveGateway, upstream: MockServer, scanner: LeakScanner) -> None:
    body = marker("body")
    scanner.add(body)
    async with sdk(live) as client:
        done = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": body}])
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": body}], stream=True,
            stream_options={"include_usage": True})
        async for _ in stream:
            pass
        await client.embeddings.create(model="text-embedding-3-small", input=[body, body])
        await client.completions.create(model="gpt-4o-mini", prompt=body)
    await settle(live)
    assert done.choices[0].message.content and len(upstream.stats.received) == 4
    scanner.assert_clean(**everywhere_but_upstream(live))


async def test_bad_keys_and_passwords_are_never_written(
        live: LiveGateway, scanner: LeakScanner) -> None:
    bad_key, bad_pw, new_pw = marker("key"), marker("pw"), marker("newpw")
    scanner.add(bad_key, bad_pw, new_pw)
    async with sdk(live, key=bad_key) as client:
        for _ in range(3):
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
    async with http(live.console_url) as console:
        wrong = await console.post("/api/login", json={"email": live.email, "password": bad_pw})
        assert wrong.status_code in (401, 429)
        other = f"{marker('email').lower()}@example.com"
        made = await console.post("/api/signup", json={"email": other, "password": new_pw})
        assert made.status_code < 500
        right = await console.post("/api/login",
                                   json={"email": live.email, "password": live.password})
        assert right.status_code < 500
    await settle(live)
    scanner.assert_clean(**everywhere_but_upstream(live))


async def test_upstream_failures_and_disconnects_leak_nothing(
        live: LiveGateway, upstream: MockServer, scanner: LeakScanner) -> None:
    body = marker("body")
    scanner.add(body)
    messages = [{"role": "user", "content": body}]
    async with http(live.url) as client:
        auth = {"Authorization": f"Bearer {live.key}"}
        for fault in ("http500", "http429", "malformed", "reset:2"):
            for stream in (False, True):
                answer = await client.post(
                    "/v1/chat/completions", headers=auth | {"x-mock-fault": fault},
                    json={"model": "gpt-4o-mini", "messages": messages, "stream": stream})
                assert body not in answer.text
    # A client that leaves mid-stream.
    async with sdk(live, **{"x-mock-delay-ms": "200", "x-mock-chunks": "50"}) as slow:
        chunks = await slow.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                    stream=True)
        async for _ in chunks:
            break
        await chunks.close()
    await settle(live)
    scanner.assert_clean(**everywhere_but_upstream(live))


async def test_malformed_requests_on_the_data_plane_leak_nothing(
        live: LiveGateway, scanner: LeakScanner) -> None:
    body = marker("body")
    scanner.add(body)
    auth = f"Authorization: Bearer {live.key}\r\n".encode()
    port = port_of(live.url)
    hostile = [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n" + body.encode(),
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + body.encode() + b"\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Bad\x00Header: "
        + body.encode() + b"\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Length: 40\r\n\r\n{\"model\": \"" + body.encode(),
        b"GARBAGE " + body.encode() + b" HTTP/9.9\r\n" + auth + b"\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Length: 30\r\n\r\n{\"model\": [\"" + body.encode() + b"\"]}",
        # Oversized: refused before it is read.
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Length: 99999999\r\n\r\n" + body.encode() * 1000,
        # The client leaves halfway through its upload.
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Length: 500\r\n\r\n{\"model\": \"gpt-4o-mini\", \"x\": \"" + body.encode(),
    ]
    for data in hostile:
        answer = await raw_exchange(port, data, wait=2.0)
        assert body.encode() not in answer
    async with http(live.url) as client:
        assert (await client.get("/healthz")).status_code == 200
    await settle(live)
    scanner.assert_clean(**everywhere_but_upstream(live))


async def test_malformed_requests_on_the_control_plane_leak_nothing(
        live: LiveGateway, scanner: LeakScanner) -> None:
    body = marker("body")
    scanner.add(body)
    auth = f"Authorization: Bearer {live.key}\r\n".encode()
    port = port_of(live.console_url)
    # aiohttp's 400 quotes the offending header line back to the client that sent it:
    # not a leak to anyone else, so only disk and logs are checked here.
    hostile = [
        b"POST /api/login HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n" + body.encode(),
        b"POST /api/login HTTP/1.1\r\nHost: x\r\n" + auth + b"Bad\x00Header: "
        + body.encode() + b"\r\n\r\n",
        b"POST /api/login HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + body.encode() + b"\r\n",
        b"GARBAGE " + body.encode() + b" HTTP/9.9\r\n" + auth + b"\r\n",
        b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
        + b"Content-Length: 30\r\n\r\n{\"email\": [\"" + body.encode() + b"\"]}",
    ]
    for data in hostile:
        await raw_exchange(port, data, wait=2.0)
    async with http(live.console_url) as client:
        assert (await client.get("/api/account")).status_code == 401
    await settle(live)
    scanner.assert_clean(**everywhere_but_upstream(live))


async def test_forwarding_headers_and_client_address_stay_off_disk_and_logs(
        live: LiveGateway, scanner: LeakScanner) -> None:
    note, agent = marker("header"), marker("agent")
    scanner.add(SPOOFED_IP, note, agent)
    spoof = {"X-Forwarded-For": SPOOFED_IP, "X-Real-IP": SPOOFED_IP,
             "CF-Connecting-IP": SPOOFED_IP, "True-Client-IP": SPOOFED_IP,
             "Forwarded": f"for={SPOOFED_IP}", "X-Note": note, "User-Agent": agent}
    async with sdk(live, **spoof) as client:
        await client.chat.completions.create(model="gpt-4o-mini",
                                             messages=[{"role": "user", "content": "hi"}])
    async with sdk(live, key="sk-wrong", **spoof) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    await settle(live)
    scanner.assert_clean(**everywhere_but_upstream(live))


async def test_the_upstream_never_learns_who_the_client_is(
        live: LiveGateway, upstream: MockServer) -> None:
    org, project = marker("org"), marker("project")
    scanner = LeakScanner()
    scanner.add(CLIENT_IP, SPOOFED_IP, live.key, org, project)
    headers = {"X-Forwarded-For": SPOOFED_IP, "X-Real-IP": SPOOFED_IP,
               "CF-Connecting-IP": SPOOFED_IP, "True-Client-IP": SPOOFED_IP,
               "Forwarded": f"for={SPOOFED_IP}", "OpenAI-Organization": org,
               "OpenAI-Project": project}
    async with sdk(live, **headers) as client:
        await client.chat.completions.create(model="gpt-4o-mini",
                                             messages=[{"role": "user", "content": "hi"}])
    assert upstream.stats.received
    scanner.assert_clean(upstream_headers=[r.headers for r in upstream.stats.received])


async def test_the_upstream_never_sees_the_clients_key_or_address(
        live: LiveGateway, upstream: MockServer) -> None:
    scanner = LeakScanner()
    scanner.add(CLIENT_IP, live.key)
    async with sdk(live) as client:
        await client.chat.completions.create(model="gpt-4o-mini",
                                             messages=[{"role": "user", "content": "hi"}])
        await client.embeddings.create(model="text-embedding-3-small", input="hi")
    received = upstream.stats.received
    assert len(received) == 2
    scanner.assert_clean(upstream_headers=[r.headers for r in received],
                         upstream_bodies=[r.body for r in received])


def test_the_scanner_finds_what_was_planted_in_the_wal_logs_and_upstream(
        tmp_path: Path) -> None:
    secret, ip = marker("planted"), "192.0.2.55"
    scanner = LeakScanner()
    scanner.add(secret, ip)
    con = sqlite3.connect(tmp_path / "x.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")
    con.execute("CREATE TABLE t (v TEXT)")
    con.execute("INSERT INTO t VALUES (?)", (secret,))
    con.commit()
    try:
        leaks = scanner.scan(data_dirs=[tmp_path], logs={"stderr": f"from {ip}\n"},
                             upstream_headers=[[("X-Real-IP", ip)]],
                             upstream_bodies=[secret.lower().encode()])
    finally:
        con.close()
    where = {leak.where.rsplit("/", 1)[-1] for leak in leaks}
    assert {"x.db-wal", "stderr", "upstream request headers #0",
            "upstream request body #0"} <= where
    with pytest.raises(AssertionError, match="leaked"):
        scanner.assert_clean(logs={"stderr": secret})


async def test_the_responses_and_messages_routes_leak_nothing_native_or_translated(
        tmp_path: Path, upstream: MockServer) -> None:
    raw = raw_config(tmp_path, {"local": upstream.base_url})
    raw["upstreams"].append({"name": "claude", "kind": "anthropic", "api_key_env": "CK",
                             "base_url": upstream.base_url, "models": ["claude-sonnet-4-5"],
                             "forward_headers": ["x-mock-*"]})
    raw["models"]["claude-sonnet-4-5"] = {"input_usd_per_mtok": "3", "output_usd_per_mtok": "15"}
    live = await asyncio.to_thread(LiveGateway(tmp_path, raw, env={"CK": "sk-ant-x"}).start)
    body, bad_key = marker("body"), marker("key")
    scanner = LeakScanner()
    scanner.add(CLIENT_IP, live.key, live.password, body, bad_key)
    messages = [{"role": "user", "content": body}]
    try:
        async with http(live.url) as client:
            for model in ("claude-sonnet-4-5", "gpt-4o-mini"):  # native, translated
                for stream in (False, True):
                    answer = await client.post("/v1/messages", headers={"x-api-key": live.key},
                                               json={"model": model, "max_tokens": 50,
                                                     "stream": stream, "messages": messages})
                    assert answer.status_code == 200, answer.text
                for fault in ("malformed", "reset:1", "http500"):
                    await client.post("/v1/messages", json={
                        "model": model, "max_tokens": 50, "stream": True, "messages": messages},
                        headers={"x-api-key": live.key, "x-mock-fault": fault})
            await client.post("/v1/messages/count_tokens", headers={"x-api-key": live.key},
                              json={"model": "claude-sonnet-4-5", "messages": messages})
            refused = await client.post("/v1/messages", headers={"x-api-key": bad_key},
                                        json={"model": "claude-sonnet-4-5", "max_tokens": 5,
                                              "messages": messages})
            assert refused.status_code == 401
            for stream in (False, True):
                answer = await client.post(
                    "/v1/responses", headers={"Authorization": f"Bearer {live.key}"},
                    json={"model": "gpt-4o-mini", "input": body, "stream": stream})
                assert answer.status_code == 200, answer.text
            chat = await client.post(
                "/v1/chat/completions", headers={"Authorization": f"Bearer {live.key}"},
                json={"model": "claude-sonnet-4-5", "messages": messages, "stream": True})
            assert chat.status_code == 200 and "[DONE]" in chat.text
    finally:
        await settle(live)
    scanner.assert_clean(**everywhere_but_upstream(live))
    received = upstream.stats.received
    scanner.secrets.discard(body)  # the upstream needs the content, and nothing else
    scanner.assert_clean(upstream_headers=[r.headers for r in received])
