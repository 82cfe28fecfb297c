"""``flintproxy admin rotate-key`` while a server serves logins and signups."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from flintproxy.app.runner import Server as GatewayServer
from flintproxy.config import load_config
from flintproxy.crypto import create_key_file
from flintproxy.errors import KeyringError
from tests.conftest import Gateway, MockServer, raw_config
from tests.support import to_toml
from tests.web.test_api import Browser


@pytest.mark.timeout(120)
async def test_rotating_the_key_under_traffic_loses_no_request_and_no_account(
        tmp_path: Path, mock_upstream: MockServer) -> None:
    key_file = tmp_path / "data.key"
    create_key_file(key_file)
    first_key = key_file.read_text()
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["crypto"] = {"key_file": str(key_file)}
    raw["limits"] = {"ip_rpm": 1_000_000}  # the traffic comes from one address
    path = tmp_path / "flintproxy.toml"
    path.write_text(to_toml(raw))
    config = load_config(path, {})
    gw = Gateway(server=GatewayServer(config), config=config, key="")
    await gw.server.startup("127.0.0.1", 0, console_port=0)
    emails: list[str] = []
    failures: list[tuple[str, int]] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        i = 0
        while not stop.is_set():
            b = Browser(gw)
            try:
                email = f"rot{i}@example.com"
                status, _, _ = await b.call("POST", "/api/signup", {
                    "email": email, "password": "correct horse battery"})
                if status != 201:
                    failures.append(("signup", status))
                else:
                    emails.append(email)
                for e in emails[-3:]:
                    status = await b.login(e, "correct horse battery")
                    if status != 200:
                        failures.append((e, status))
            finally:
                await b.http.close()
            i += 1

    try:
        for _ in range(5):
            b = Browser(gw)
            await b.call("POST", "/api/signup", {"email": f"before{_}@example.com",
                                                 "password": "correct horse battery"})
            await b.http.close()
            emails.append(f"before{_}@example.com")
        load = asyncio.create_task(traffic())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flintproxy", "admin", "--config", str(path), "rotate-key",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err
        await asyncio.sleep(1.5)  # a few more requests on the new key alone
        stop.set()
        await load
        assert failures == [] and len(emails) > 10
        assert key_file.read_text() != first_key and len(key_file.read_text().split()) == 1
        assert key_file.stat().st_mode & 0o777 == 0o600
        rows = await gw.components.accounts.db.fetch("SELECT email_sealed FROM accounts")
        ring = gw.components.accounts.pii.keyring
        assert ring is not None and all(ring.is_current(bytes(r[0])) for r in rows)
    finally:
        await gw.server.shutdown()
    # A restart on the new key serves every account; the old key no longer opens them.
    again = GatewayServer(load_config(path, {}))
    await again.startup("127.0.0.1", 0, console_port=0)
    try:
        for e in emails:
            assert (await again.components.accounts.by_email(e)).email == e
    finally:
        await again.shutdown()
    key_file.write_text(first_key)
    stale = GatewayServer(load_config(path, {}))
    with pytest.raises(KeyringError):
        await stale.startup("127.0.0.1", 0, console_port=0)
    await stale.shutdown()
