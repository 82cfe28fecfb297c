"""``flintproxy admin`` as a separate process, against a running server."""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from flintproxy.app.runner import Server as GatewayServer
from flintproxy.config import load_config
from flintproxy.tools import admin
from tests.conftest import Gateway, MockServer, raw_config
from tests.support import to_toml

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]




@pytest.fixture
def config_path(tmp_path: Path, mock_upstream: MockServer) -> Path:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["accounts"] = {"bcrypt_cost": 4, "change_poll_s": 0.25}
    path = tmp_path / "flintproxy.toml"
    path.write_text(to_toml(raw))
    return path


@pytest.fixture
async def server(config_path: Path) -> AsyncIterator[Gateway]:
    config = load_config(config_path, {})
    gw = Gateway(server=GatewayServer(config), config=config, key="")
    await gw.server.startup("127.0.0.1", 0, console_port=0)
    yield gw
    await gw.server.shutdown()


Run = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def run(config_path: Path) -> Run:
    async def run_admin(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flintproxy", "admin", "--config", str(config_path), *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(stdin.encode() if stdin is not None else b"")
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    return run_admin


async def chat(gw: Gateway, key: str) -> str | None:
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as c:
        resp = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    return resp.choices[0].message.content


async def eventually_fails(gw: Gateway, key: str, exc: type[Exception]) -> float:
    """Seconds until requests with ``key`` fail with ``exc``; fails the test after 1 s."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while loop.time() - t0 < 1.0:
        try:
            await chat(gw, key)
        except exc:
            return loop.time() - t0
        await asyncio.sleep(0.02)
    pytest.fail("the change did not reach the running server within one second")


async def test_admin_changes_reach_a_running_server(server: Gateway, run: Run) -> None:
    code, out, _ = await run("create-account", "Ops@Example.com")
    assert code == 0 and "ops@example.com" in out
    code, out, _ = await run("credit", "ops@example.com", "5.00")
    assert code == 0 and "balance 5.00 USD" in out
    code, out, err = await run("create-key", "ops@example.com", "--name", "ci")
    assert code == 0
    key = out.splitlines()[-1]
    assert key.startswith("sk-flint-") and out == key + "\n"
    key_id = int(err.split("created key ")[1].split()[0])
    assert await chat(server, key)

    code, _, _ = await run("disable-account", "ops@example.com")
    assert code == 0
    await eventually_fails(server, key, openai.PermissionDeniedError)
    code, _, _ = await run("enable-account", "ops@example.com")
    assert code == 0
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while True:
        try:
            assert await chat(server, key)
            break
        except openai.PermissionDeniedError:
            assert loop.time() - t0 < 1.0
            await asyncio.sleep(0.02)

    code, out, _ = await run("revoke-key", str(key_id))
    assert code == 0 and f"revoked key {key_id}" in out
    await eventually_fails(server, key, openai.AuthenticationError)

    code, out, _ = await run("list-accounts")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["ID", "EMAIL", "STATUS", "BALANCE_USD", "KEYS", "CREATED"]
    email, status, balance, keys = row.split()[1:5]
    assert (email, status, keys) == ("ops@example.com", "active", "0")
    # The chats above were billed (the usage writer debits within one flush).
    assert Decimal("4.99") < Decimal(balance) < Decimal("5.00")
    code, out, _ = await run("list-keys", "ops@example.com")
    assert code == 0 and "ci" in out and key not in out


async def test_delete_account_reaches_a_running_server(server: Gateway, run: Run) -> None:
    await run("create-account", "del@example.com")
    await run("credit", "del@example.com", "1.00")
    _, out, _ = await run("create-key", "del@example.com")
    key = out.splitlines()[-1]
    assert await chat(server, key)
    code, _, _ = await run("delete-account", "del@example.com")
    assert code == 0
    await eventually_fails(server, key, openai.AuthenticationError)


async def test_password_stdin_allows_login(server: Gateway, run: Run) -> None:
    code, _, _ = await run("create-account", "p@example.com", "--password-stdin",
                           stdin="a long password\n")
    assert code == 0
    async with aiohttp.ClientSession() as http, http.post(
            server.console_url + "/api/login",
            json={"email": "p@example.com", "password": "a long password"}) as resp:
        assert resp.status == 200
    repo = server.components.accounts
    row = await repo.db.fetchrow("SELECT password_hash FROM accounts")
    assert row is not None and row[0].startswith("$2b$04$")


async def test_errors_and_exit_codes(config_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # In-process, as cli.py calls it (in a thread: admin.main runs its own event loop).
    async def main(*args: str, stdin: str = "") -> tuple[int, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = await asyncio.to_thread(admin.main, ["--config", str(config_path), *args])
        return code, capsys.readouterr().err

    assert (await main("credit", "nobody@example.com", "1.00"))[0] == 1
    assert (await main("create-account", "not an email"))[0] == 2
    assert (await main("create-account", "a@example.com"))[0] == 0
    code, err = await main("create-account", "a@example.com")
    assert code == 1 and "already exists" in err
    code, err = await main("credit", "a@example.com", "1.5e-12")
    assert code == 2 and "invalid amount" in err
    assert (await main("credit", "a@example.com", "-3"))[0] == 2
    code, err = await main("revoke-key", "424242")
    assert code == 1 and "No API key" in err
    code, err = await main("create-account", "b@example.com", "--password-stdin",
                           stdin="short\n")
    assert code == 2 and "at least 10" in err
    code, err = await main("create-key", "a@example.com", "--models", "unknown-model")
    assert code == 2 and "unknown model" in err
    code, err = await main("create-key", "a@example.com", "--models", "gpt-4o-mini")
    assert code == 0
    assert admin.main(["--config", str(config_path.parent / "missing.toml"),
                       "list-accounts"]) == 2
    assert "not found" in capsys.readouterr().err
