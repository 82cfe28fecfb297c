"""The access log: one JSON line per /v1 request, the promised fields, no content, no IP.

The lines are read from the sink the gateway really writes to (``AccessLog.sink``,
stdout under ``flintproxy serve``), after the flusher has written them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import openai
import orjson
import pytest

from flintproxy.ops.accesslog import DRAIN_TIMEOUT_S, LOGGER, _Clock
from tests.conftest import Gateway, MockServer, raw_config, start_gateway
from tests.support import to_toml

REPO = Path(__file__).resolve().parents[2]
MARKER = "CONTENT-MARKER-7f3a9c"
MESSAGES: list[Any] = [{"role": "user", "content": f"Say hello {MARKER}"}]
FIELDS = {"ts", "request_id", "method", "path", "status", "model", "upstream", "duration_ms",
          "ttfb_ms", "prompt_tokens", "completion_tokens", "outcome"}


class Tap:
    """A sink that keeps what is written to it: what stdout would have received."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0

    def write(self, data: bytes | bytearray, /) -> int:
        self.data += data
        self.writes += 1
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def lines(self) -> list[str]:
        return self.data.decode().splitlines()


T = TypeVar("T", bound=Tap)


class StuckTap(Tap):
    """A sink whose writes wait for ``release``: stdout piped to a reader that stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, data: bytes | bytearray, /) -> int:
        self.entered.set()
        self.release.wait(30)
        return super().write(data)


class FailingTap(Tap):
    """A sink that refuses writes while ``failing``: a full disk."""

    failing = True

    def write(self, data: bytes | bytearray, /) -> int:
        if self.failing:
            raise OSError(28, "No space left on device")
        return super().write(data)


def tap_access_log(gw: Gateway, tap: T) -> T:
    """Make ``tap`` ``gw``'s access log sink, as ``serve`` makes stdout; a gateway without
    an access log is left as it is."""
    access = gw.components.access_log
    if access is not None:
        access.sink = tap
    return tap


@pytest.fixture
def access_sink(gateway: Gateway) -> Tap:
    """The ``gateway`` fixture's access log sink."""
    return tap_access_log(gateway, Tap())


def sdk(gw: Gateway, key: str | None = None, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key or gw.key, max_retries=0,
                              default_headers=headers or None)


async def written(gw: Gateway, tap: Tap, n: int = 0) -> list[str]:
    """The lines in ``tap`` once ``gw``'s requests are over and (at least n) written."""
    relay = gw.components.relay
    access = gw.components.access_log
    for _ in range(300):
        if access is not None:
            await access.flush()  # what the flusher does every FLUSH_S, now
        if relay.streams.open == 0 and len(tap.lines) >= n:
            break
        await asyncio.sleep(0.01)
    return tap.lines


async def until(event: threading.Event) -> None:
    for _ in range(500):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_one_json_line_per_request_without_content_or_ip(
        gateway: Gateway, mock_upstream: MockServer, access_sink: Tap) -> None:
    async with sdk(gateway) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES)
        ok_id = raw.headers["x-request-id"]
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                      stream=True)
        _ = [c async for c in stream]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model=f"model-{MARKER}", messages=MESSAGES)
    async with sdk(gateway, key="sk-flint-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.embeddings.create(model="text-embedding-3-small", input=MARKER)
    async with sdk(gateway, **{"x-mock-fault": "http500"}) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            gateway.base_url + "/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {gateway.key}", "x-mock-fault": "endless",
                     "x-mock-delay-ms": "5"})
        await resp.content.readline()
        resp.close()
    access_lines = await written(gateway, access_sink, 6)

    assert len(access_lines) == 6
    for line in access_lines:
        for secret in (MARKER, gateway.key, "127.0.0.1", "@", "Say hello"):
            assert secret not in line
    entries = [json.loads(line) for line in access_lines]
    now = datetime.now(UTC)
    for e in entries:
        assert e.keys() >= FIELDS, e
        assert e["method"] == "POST"
        assert e["ts"].endswith("Z")
        assert now - timedelta(minutes=1) < datetime.fromisoformat(e["ts"]) <= now
        assert "client_ip" not in e
    ok, streamed, unknown, unauth, failed, gone = entries
    assert ok["request_id"] == ok_id
    assert (ok["path"], ok["status"], ok["model"], ok["upstream"], ok["outcome"]) == (
        "/v1/chat/completions", 200, "gpt-4o-mini", "local", "ok")
    assert ok["completion_tokens"] == 20 and ok["prompt_tokens"] > 0
    assert ok["duration_ms"] > 0 and ok["ttfb_ms"] > 0
    assert (streamed["model"], streamed["stream"], streamed["outcome"]) == ("gpt-4o", True, "ok")
    assert streamed["completion_tokens"] == 20
    # The unknown model name is the client's text: logged as "other", like the metric.
    assert (unknown["status"], unknown["model"], unknown["outcome"], unknown["error"]) == (
        404, "other", "rejected", "model_not_found")
    assert unknown["request_id"].startswith("req_")
    assert (unauth["status"], unauth["path"], unauth["request_id"]) == (
        401, "/v1/embeddings", None)
    assert (failed["status"], failed["outcome"], failed["ttfb_ms"]) == (
        502, "upstream_error", None)
    assert (gone["status"], gone["outcome"]) == (200, "client_disconnect")


def test_ts_is_written_as_orjson_writes_a_utc_datetime() -> None:
    clock = _Clock()
    base = 1_764_000_000 * 10**9  # an exact second: no fraction, like orjson
    for ns in (base, base + 1, base + 999, base + 1_000, base + 123_456_789,
               base + 999_999_999, base + 10**9, base + 86_400 * 10**9 + 5_000, 0):
        dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)
        expected = orjson.dumps(dt, option=orjson.OPT_UTC_Z).decode().strip('"')
        assert clock.format(ns) == expected


async def test_client_ip_only_when_opted_in(tmp_path: Path, mock_upstream: MockServer,
                                            gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["metrics"] = {"log_client_ip": True}
    gw = await gateway_factory(raw)
    access_sink = tap_access_log(gw, Tap())
    async with sdk(gw) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with sdk(gw, key="sk-flint-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    lines = await written(gw, access_sink, 2)
    assert [json.loads(line)["client_ip"] for line in lines] == ["127.0.0.1"] * 2


async def test_access_log_off(tmp_path: Path, mock_upstream: MockServer,
                              gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["metrics"] = {"access_log": False}
    gw = await gateway_factory(raw)
    access_sink = tap_access_log(gw, Tap())
    async with sdk(gw) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert gw.components.access_log is None  # nothing made, nothing buffered, nothing to flush
    assert await written(gw, access_sink) == []


async def test_non_v1_paths_are_not_logged(gateway: Gateway, access_sink: Tap) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.console_url + "/api/account") as resp:
            assert resp.status == 401
        async with http.get(gateway.url + "/v1/nothing-here") as resp:
            assert resp.status == 404
    lines = await written(gateway, access_sink, 1)
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert (entry["status"], entry["path"], entry["method"]) == (404, None, "GET")


async def test_stdout_as_the_sink_gets_bare_json_lines_and_none_turns_it_off(
        gateway: Gateway, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    async def refused() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.get(gateway.base_url + "/models") as resp:
                assert resp.status == 401

    access = gateway.components.access_log
    assert access.sink is None  # create_app leaves it off; serve sets stdout
    access.sink = sys.stdout.buffer  # what serve does (captured here)
    await refused()
    await refused()
    await access.flush()
    out = capsysbinary.readouterr().out
    assert out.endswith(b"\n") and out.count(b"\n") == 2
    assert [json.loads(line)["error"] for line in out.splitlines()] == [
        "missing_api_key"] * 2
    access.sink = None
    await refused()
    assert access.pending == 0  # not even formatted
    await access.flush()
    assert capsysbinary.readouterr().out == b""
    assert access.pending == 0


async def test_a_stuck_sink_neither_blocks_requests_nor_grows_without_bound(
        gateway: Gateway) -> None:
    tap = tap_access_log(gateway, StuckTap())
    try:
        access = gateway.components.access_log
        access.max_pending_bytes = 1_000  # ~3 lines of ~300 bytes
        async with sdk(gateway) as client:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            await until(tap.entered)  # the flusher's write of that line is stuck

            started = time.monotonic()
            for _ in range(20):
                await asyncio.wait_for(
                    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES),
                    timeout=5)
            assert time.monotonic() - started < 5
        assert tap.writes == 0 and not tap.release.is_set()  # still stuck, all served
        kept = access.pending
        assert 1 <= kept < 20
        assert access.dropped == 20 - kept

        tap.release.set()
        lines = await written(gateway, tap, 1 + kept)
        assert len(lines) == 1 + kept
        assert tap.writes == 2  # the stuck line, then all the buffered ones at once
        assert len({json.loads(line)["request_id"] for line in lines}) == 1 + kept
        assert access.dropped == 20 - kept
    finally:
        tap.release.set()


async def test_a_failing_sink_drops_and_counts_lines_and_recovers(
        gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    tap = tap_access_log(gateway, FailingTap())
    access = gateway.components.access_log
    async with sdk(gateway) as client:
        for _ in range(3):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        await written(gateway, tap)
        assert access.dropped == 3 and access.pending == 0
        assert any("No space left" in r.getMessage() for r in caplog.records
                   if r.name == LOGGER and r.levelno == logging.WARNING)
        tap.failing = False
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(await written(gateway, tap, 1)) == 1
    assert access.dropped == 3


@contextlib.asynccontextmanager
async def stuck_at_shutdown(tmp_path: Path, mock_upstream: MockServer, more: int
                            ) -> AsyncIterator[tuple[Gateway, StuckTap]]:
    """A gateway whose access-log flusher is stuck writing its first line, with ``more``
    requests answered after it; the test shuts the gateway down."""
    gw = await start_gateway(raw_config(tmp_path, {"local": mock_upstream.base_url}))
    tap = tap_access_log(gw, StuckTap())
    try:
        async with sdk(gw) as client:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            await until(tap.entered)  # the flusher is stuck on the first line
            for _ in range(more):
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        yield gw, tap
    finally:
        tap.release.set()


async def test_shutdown_writes_the_buffered_lines(tmp_path: Path,
                                                  mock_upstream: MockServer) -> None:
    async with stuck_at_shutdown(tmp_path, mock_upstream, 4) as (gw, tap):
        access = gw.components.access_log
        assert access.pending == 4  # these wait for the last write, at shutdown
        asyncio.get_running_loop().call_later(0.3, tap.release.set)
        await gw.server.shutdown()
        assert len(tap.lines) == 5 and tap.writes == 2
        assert access.pending == 0 and access.dropped == 0


async def test_shutdown_waits_for_a_write_in_flight(tmp_path: Path,
                                                    mock_upstream: MockServer) -> None:
    async with stuck_at_shutdown(tmp_path, mock_upstream, 0) as (gw, tap):
        access = gw.components.access_log
        assert access.pending == 0  # nothing left to flush...
        asyncio.get_running_loop().call_later(0.3, tap.release.set)
        await gw.server.shutdown()
        # ...but the write in flight is waited for: the thread, a daemon, would be cut
        # short by the process's exit.
        assert len(tap.lines) == 1 and tap.writes == 1
        assert access.dropped == 0


async def test_shutdown_gives_up_on_a_stuck_sink(tmp_path: Path,
                                                 mock_upstream: MockServer) -> None:
    async with stuck_at_shutdown(tmp_path, mock_upstream, 3) as (gw, tap):
        access = gw.components.access_log
        access.drain_timeout_s = 0.2
        started = time.monotonic()
        await gw.server.shutdown()
        assert time.monotonic() - started < 2
        assert access.dropped == 3 and access.pending == 0 and tap.writes == 0


def writer_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "flint-accesslog" and t not in before]


async def test_one_daemon_writer_thread_started_by_the_first_write_ended_by_close(
        tmp_path: Path, mock_upstream: MockServer) -> None:
    before = set(threading.enumerate())
    gw = await start_gateway(raw_config(tmp_path, {"local": mock_upstream.base_url}))
    tap = tap_access_log(gw, Tap())
    assert writer_threads(before) == []  # nothing written yet
    async with sdk(gw) as client:
        for n in range(1, 4):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert len(await written(gw, tap, n)) == n
    [thread] = writer_threads(before)  # one, for every write
    # A daemon: the interpreter does not join it at exit, so a write blocked for good
    # (a full pipe nobody reads) cannot hang the exit once close() has given up on it.
    assert thread.daemon
    await gw.server.shutdown()
    for _ in range(300):
        if not thread.is_alive():
            break
        await asyncio.sleep(0.01)
    assert not thread.is_alive()  # close() ended it: nothing left behind by a clean exit




@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="pipe sizes: fcntl F_GETPIPE_SZ, FIONREAD")
async def test_serve_writes_lines_to_stdout_and_exits_though_stdout_is_blocked(
        tmp_path: Path, mock_upstream: MockServer) -> None:
    """``flintproxy serve`` with stdout a pipe nobody reads: SIGTERM still ends it."""
    import fcntl  # Unix only, as is the test
    import termios

    config = tmp_path / "flintproxy.toml"
    config.write_text(to_toml(raw_config(tmp_path, {"local": mock_upstream.base_url})))
    read_end, write_end = os.pipe()
    capacity = fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flintproxy", "serve", "--config", str(config), cwd=REPO,
        stdout=write_end, stderr=asyncio.subprocess.PIPE)
    os.close(write_end)
    os.set_blocking(read_end, False)

    def in_pipe() -> int:
        return int(struct.unpack("i", fcntl.ioctl(read_end, termios.FIONREAD, b"\0" * 4))[0])

    try:
        assert proc.stderr is not None
        url = ""
        while not url:
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, "serve exited"
            if "listening on" in line:
                url = line.split("listening on ", 1)[1].strip()
        async with aiohttp.ClientSession() as http:

            async def refused() -> None:
                async with http.get(url + "/v1/models") as resp:
                    assert resp.status in (401, 429)  # missing key; then the IP limit

            # serve sends the lines, bare JSON, to stdout.
            await refused()
            out = b""
            for _ in range(300):
                with contextlib.suppress(BlockingIOError):
                    out += os.read(read_end, 1 << 16)
                if out.endswith(b"\n"):
                    break
                await asyncio.sleep(0.01)
            assert out.count(b"\n") == 1 and json.loads(out)["error"] == "missing_api_key"

            # Then nobody reads: enough lines to fill the pipe twice over.
            for _ in range(2 * capacity // len(out) + 10):
                await refused()
        for _ in range(300):  # the writer filled the pipe: blocked on the rest
            if in_pipe() >= capacity - len(out):
                break
            await asyncio.sleep(0.01)
        assert in_pipe() >= capacity - len(out)

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # close() gives up after DRAIN_TIMEOUT_S; then nothing may wait for the writer.
        _, err = await asyncio.wait_for(proc.communicate(), DRAIN_TIMEOUT_S + 10)
        assert time.monotonic() - started < DRAIN_TIMEOUT_S + 5
        assert proc.returncode == 0, err.decode()
        assert b"the sink is blocked; gave up on the last lines" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(read_end)
