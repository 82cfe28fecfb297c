"""``flintproxy serve --workers N``: refused where it cannot be exact, supervised
where it runs (real processes, real signals)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.conftest import MockServer, migrated_dsn, raw_config
from tests.support import LiveGateway, to_toml

MESSAGES = [{"role": "user", "content": "hi"}]
_WORKER = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def serve(tmp_path: Path, raw: dict[str, object], *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "flintproxy.toml"
    path.write_text(to_toml(raw))
    return subprocess.run([sys.executable, "-m", "flintproxy", "serve", "--config", str(path),
                           *args], capture_output=True, text=True, timeout=60, check=False)


def test_two_workers_on_the_embedded_store_are_refused_with_what_to_configure(
        tmp_path: Path) -> None:
    raw = raw_config(tmp_path, {"local": "http://127.0.0.1:9/v1"})
    done = serve(tmp_path, raw, "--workers", "2")
    assert done.returncode == 2
    err = done.stderr
    assert "--workers 2 is refused" in err
    assert "SQLite" in err and "per process" in err
    assert '[storage] backend = "postgresql"' in err
    assert "[cluster] redis_url" in err
    assert "Running more than one process" in err


def test_redis_alone_does_not_make_sqlite_workers_exact(tmp_path: Path) -> None:
    raw = raw_config(tmp_path, {"local": "http://127.0.0.1:9/v1"})
    raw["cluster"] = {"redis_url": "redis://:hunter2@127.0.0.1:6399/0"}
    done = serve(tmp_path, raw, "--workers", "3")
    assert done.returncode == 2
    assert '[storage] backend = "postgresql"' in done.stderr
    assert "[cluster] redis_url (or" not in done.stderr  # that one is configured
    assert "hunter2" not in done.stderr


def test_zero_workers_is_a_clear_error(tmp_path: Path) -> None:
    done = serve(tmp_path, raw_config(tmp_path, {"local": "http://127.0.0.1:9/v1"}),
                 "--workers", "0")
    assert done.returncode == 2
    assert "--workers 0: must be at least 1" in done.stderr


def workers(gw: LiveGateway) -> list[tuple[int, int]]:
    return [(int(n), int(pid)) for n, pid in _WORKER.findall(gw.stderr)]


async def wait_for(check: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.1)


async def healthy(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


@pytest.fixture
def supervised(tmp_path: Path, mock_upstream: MockServer) -> LiveGateway:
    gw = LiveGateway(tmp_path, raw_config(tmp_path, {"local": mock_upstream.base_url}),
                     serve_args=("--workers", "1"))
    gw.start()
    yield gw  # type: ignore[misc]
    gw.stop()


@pytest.mark.timeout(90)
async def test_a_sigkilled_worker_is_replaced_and_the_port_keeps_serving(
        supervised: LiveGateway) -> None:
    gw = supervised
    ((_, pid),) = workers(gw)
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0) as cl:
        await cl.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        os.kill(pid, signal.SIGKILL)

        async def replaced() -> bool:
            return len(workers(gw)) == 2 and await healthy(gw.url)

        await wait_for(replaced)
        assert f"worker 1 (pid {pid}) exited with signal 9" in gw.stderr
        assert workers(gw)[1][1] != pid
        await cl.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert gw.alive()


@pytest.mark.timeout(90)
async def test_sigterm_drains_every_worker_and_exits_0(supervised: LiveGateway) -> None:
    gw = supervised
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0) as cl:
        slow = asyncio.create_task(cl.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers={"x-mock-first-delay-ms": "1500"}))
        await asyncio.sleep(0.5)  # admitted, waiting on the upstream
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        answer = await slow  # the in-flight request finishes
    assert answer.choices[0].message.content
    assert await asyncio.to_thread(gw.proc.wait, 30) == 0
    assert "draining 1 workers" in gw.stderr
    assert not await healthy(gw.url)


def established_on(pid: int, port: int) -> int:
    """Server-side TCP connections on ``port`` that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


@pytest.mark.timeout(120)
async def test_two_workers_on_postgresql_and_redis_serve_and_both_take_requests(
        tmp_path: Path, mock_upstream: MockServer, redis_url: str,
        request: pytest.FixtureRequest) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["storage"] = {"backend": "postgresql", "dsn": await migrated_dsn(request)}
    raw["cluster"] = {"redis_url": redis_url, "nodes": 2}
    gw = LiveGateway(tmp_path, raw, serve_args=("--workers", "2"))
    await asyncio.to_thread(gw.start)
    try:
        async def both_listening() -> bool:
            return gw.stderr.count("data plane (/v1, /healthz, /readyz) listening") == 2

        await wait_for(both_listening)
        pids = [pid for _, pid in workers(gw)]
        assert len(pids) == 2
        # Each client its own keep-alive connection; the kernel spreads them.
        clients = [openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0)
                   for _ in range(24)]
        try:
            for cl in clients:
                answer = await cl.chat.completions.create(model="gpt-4o-mini",
                                                          messages=MESSAGES)  # type: ignore[arg-type]
                assert answer.choices[0].message.content
            port = int(gw.url.rsplit(":", 1)[1])
            held = [established_on(pid, port) for pid in pids]
            assert sum(held) == 24
            assert all(n > 0 for n in held), held
        finally:
            for cl in clients:
                await cl.close()
        # Any worker's /metrics reports both (the supervisor's multiprocess directory;
        # each worker writes its numbers there once a second).
        async def all_counted() -> bool:
            async with aiohttp.ClientSession() as http, \
                    http.get(gw.console_url + "/metrics") as r:
                text = await r.text()
            served = sum(float(v) for v in re.findall(
                r'^flintproxy_requests_total\{model="gpt-4o-mini",status="2xx"\} (\S+)$',
                text, re.M))
            assert served <= 24
            return served == 24

        await wait_for(all_counted, 10.0)
        assert gw.stop(30) == 0
    finally:
        gw.stop()
