"""``flintproxy serve --workers N``: refused where it cannot be exact, supervised
where it runs (real processes, real signals)."""

from __future__ import annotations

import asyncio
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

from tests.conftest import MockServer, raw_config
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
