"""cli: `python -m flintproxy` as an operator runs it (real subprocesses)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp

from flintproxy import __version__

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config" / "flintproxy.toml"


def flintproxy(*args: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flintproxy", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=30, check=False,
                          env={**os.environ, **(env or {})})


def test_version() -> None:
    done = flintproxy("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"flintproxy {__version__}"


def test_serve_with_a_bad_config_prints_the_error_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(SHIPPED.read_text().replace("port = 8080", 'port = "eighty"'))
    done = flintproxy("serve", "--config", str(bad))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "config error: server.port = 'eighty': must be an integer in [0, 65535]")
    assert "Traceback" not in done.stderr


def test_serve_with_a_missing_config_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    done = flintproxy("serve", "--config", str(missing))
    assert done.returncode == 2
    assert str(missing) in done.stderr and "not found" in done.stderr


def test_serve_with_a_bad_port_in_env_exits_2() -> None:
    done = flintproxy("serve", "--config", str(SHIPPED), env={"FLINTPROXY_PORT": "http"})
    assert done.returncode == 2, done.stderr
    assert "FLINTPROXY_PORT" in done.stderr


def test_no_command_is_a_usage_error() -> None:
    done = flintproxy()
    assert done.returncode == 2
    assert "usage: flintproxy" in done.stderr


def test_admin_help() -> None:
    done = flintproxy("admin", "--help")
    assert done.returncode == 0, done.stderr
    assert "create-key" in done.stdout and "list-accounts" in done.stdout


def test_admin_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(SHIPPED.read_text().replace("weight = 1 ", "weight = 0 "))
    done = flintproxy("admin", "--config", str(bad), "list-accounts")
    assert done.returncode == 2
    assert "upstreams[0].weight = 0" in done.stderr


async def test_mock_upstream_on_port_0_prints_its_port_and_serves() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flintproxy", "mock-upstream", "--port", "0", "--chunks", "3",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode()
        match = re.fullmatch(r"mock upstream listening on (http://127\.0\.0\.1:(\d+)/v1)\n",
                             line)
        assert match, line
        assert int(match.group(2)) > 0  # the bound port, not 0
        base_url = match.group(1)
        async with aiohttp.ClientSession() as http:
            async with http.get(base_url + "/models") as resp:
                assert resp.status == 200
                models = await resp.json()
            assert models["object"] == "list" and models["data"]
            body = {"model": models["data"][0]["id"],
                    "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(base_url + "/chat/completions", json=body) as resp:
                assert resp.status == 200
                completion = await resp.json()
        assert completion["object"] == "chat.completion"
        assert completion["usage"]["completion_tokens"] > 0
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=20)


_FD_CHECK = """
import os, re
from flintproxy.cli import reserve_fd_table

def fd_size():
    return int(re.search(r"FDSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

held = os.open(os.devnull, os.O_RDONLY)
at_top = os.dup2(held, 1023)  # an open descriptor where the reservation probes
open_before = sorted(os.listdir("/proc/self/fd"))
assert fd_size() < 2048, fd_size()
assert reserve_fd_table(2048) == 2048
assert fd_size() >= 2048, fd_size()
assert sorted(os.listdir("/proc/self/fd")) == open_before  # nothing left open
os.fstat(at_top)  # and nothing closed
print("ok")
"""


def test_reserve_fd_table_grows_the_table_once_and_leaves_descriptors_alone() -> None:
    out = subprocess.run([sys.executable, "-c", _FD_CHECK], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
