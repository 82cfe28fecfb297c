"""``flintproxy keygen`` and ``flintproxy mock-smtp`` as an operator runs them."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import aiosmtplib

from flintproxy.config import CryptoConfig
from flintproxy.crypto import load_keyring
from tests.test_cli import flintproxy


def test_keygen_creates_a_0600_key_file_once_and_prints_a_key_with_a_dash(
        tmp_path: Path) -> None:
    path = tmp_path / "var" / "data.key"
    done = flintproxy("keygen", str(path))
    assert done.returncode == 0 and "mode 0600" in done.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    key = path.read_text()
    assert flintproxy("keygen", str(path)).returncode == 0 and path.read_text() == key
    assert load_keyring(CryptoConfig(key_file=path)) is not None
    printed = flintproxy("keygen", "-")
    assert printed.returncode == 0 and printed.stdout.strip() != key.strip()
    assert load_keyring(CryptoConfig(key_env="K", key_text=printed.stdout)) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_mock_smtp_prints_every_message_it_receives() -> None:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flintproxy", "mock-smtp", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert f"listening on 127.0.0.1:{port}" in line.decode()
        await aiosmtplib.send("Subject: hello\r\n\r\nthe body\r\n", sender="a@flint.test",
                              recipients=["b@example.com"], hostname="127.0.0.1", port=port,
                              start_tls=False, timeout=10)
        seen = b""
        async with asyncio.timeout(20):
            while b"the body" not in seen:
                seen += await proc.stdout.readline()
        assert b"to b@example.com" in seen and b"Subject: hello" in seen
    finally:
        proc.terminate()
        await proc.wait()
