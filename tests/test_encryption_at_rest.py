"""Account data encrypted at rest, end to end: with a data key configured, no
plaintext email anywhere in the data directory after signups, logins, a password reset
through the outbox and a redemption; a wrong key stops the start with a clear message."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from flintproxy.app.runner import Server as GatewayServer
from flintproxy.config import build_config
from flintproxy.crypto import generate_key
from flintproxy.errors import KeyringError
from flintproxy.store.codes import Codes
from flintproxy.tools.mock_smtp import MockSmtp
from tests.conftest import MockServer, raw_config, start_gateway
from tests.support import LeakScanner
from tests.web.test_api import Browser


async def test_no_plaintext_email_reaches_the_data_directory_with_encryption_on(
        tmp_path: Path, mock_upstream: MockServer) -> None:
    data = tmp_path / "data"
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["storage"] = {"path": str(data / "flintproxy.db")}
    raw["crypto"] = {"key_env": "FLINT_DATA_KEY"}
    sink = MockSmtp()
    await sink.start()
    raw["email"] = {"host": "127.0.0.1", "port": sink.port, "starttls": False,
                    "from": "noreply@flint.test", "max_per_second": 100}
    env = {"FLINT_DATA_KEY": generate_key()}
    marker = f"leak{secrets.token_hex(6)}"
    emails = [f"{marker}{i}@example.com" for i in range(3)]
    gw = await start_gateway(raw, env)
    try:
        for email in emails:
            b = Browser(gw)
            try:
                await b.signup(email)
                assert await b.login(email) == 200
                (code,) = await Codes(gw.components.accounts).create(1, 10**9)
                assert (await b.call("POST", "/api/redeem", {"code": code}))[0] == 200
                status, _, _ = await b.call("POST", "/api/password-reset", {"email": email})
                assert status == 202
                _, account, _ = await b.call("GET", "/api/account")
                assert account["email"] == email  # read back through the key
            finally:
                await b.http.close()
        got = await sink.wait_for(len(emails))
        assert sorted(m.recipients[0] for m in got) == sorted(emails)
    finally:
        await gw.server.shutdown()
        await sink.close()
    scanner = LeakScanner()
    scanner.add(marker, *emails)
    scanner.assert_clean(data_dirs=[data])


async def test_a_wrong_key_stops_the_start_with_a_message_naming_the_problem(
        tmp_path: Path, mock_upstream: MockServer) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["crypto"] = {"key_env": "K"}
    gw = await start_gateway(raw, {"K": generate_key()})
    await gw.server.shutdown()
    for env, needle in (({"K": generate_key()}, "not the one the account data was encrypted"),
                        ({}, "environment variable K is not set")):
        server = GatewayServer(build_config(raw, env))
        with pytest.raises(KeyringError, match=needle):
            await server.startup("127.0.0.1", 0, console_port=0)
        await server.shutdown()
