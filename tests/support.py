"""Helpers for the adversarial suite: a leak scanner and a gateway run as a process.

``LeakScanner`` is the privacy promises as a test: after a hostile scenario, nothing
the clients sent that must stay private (content markers, client IPs, API keys,
passwords) may be found on disk under the data dir (the SQLite DB with its ``-wal``
and ``-shm``, any other file), in the process's stdout/stderr, or in what the
upstream received (headers always; bodies where content is not expected there).

``LiveGateway`` runs ``python -m flintproxy serve`` as a subprocess, exactly as an
operator does, so its logs are the real ones (logging set up by the CLI, aiohttp's
and asyncio's loggers included) and its data dir is a real directory to scan.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.engines import free_port

__all__ = ["Leak", "LeakScanner", "LiveGateway", "LiveMock", "marker", "to_toml"]

_LISTEN = re.compile(r"flintproxy (data|control) plane .* listening on (http://\S+)")
_START_TIMEOUT_S = 20.0


def marker(kind: str = "secret") -> str:
    """A unique, greppable string to plant in a hostile request."""
    return f"LEAK{kind.upper()}{secrets.token_hex(6)}"


# -- TOML (the config is written the way an operator writes it) -----------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _toml_table(lines: list[str], name: str, table: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)
               and not (isinstance(v, list) and v and isinstance(v[0], dict))}
    if name:
        lines.append(f"[{name}]")
    lines += [f'"{k}" = {_toml_value(v)}' for k, v in scalars.items()]
    for key, value in table.items():
        sub = f'{name}."{key}"' if name else f'"{key}"'
        if isinstance(value, dict):
            _toml_table(lines, sub, value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"[[{sub}]]")
                lines += [f'"{k}" = {_toml_value(v)}' for k, v in item.items()]


def to_toml(raw: Mapping[str, Any]) -> str:
    """The TOML text of a ``raw_config``-shaped dict (tables, arrays of tables, scalars)."""
    lines: list[str] = []
    _toml_table(lines, "", raw)
    return "\n".join(lines) + "\n"


# -- the leak scanner -----------------------------------------------------------------


@dataclass(frozen=True)
class Leak:
    """One secret found where it must never be."""

    secret: str
    where: str
    context: str

    def __str__(self) -> str:
        return f"{self.secret!r} in {self.where}: …{self.context}…"


@dataclass
class LeakScanner:
    """Collects what must not leak, then looks for it everywhere it could have gone.

    ``secrets`` are searched as UTF-8 bytes and, for the text ones, lower-cased too
    (a header value may be re-cased on its way), in every file under ``data_dirs``,
    in ``logs`` (captured stdout/stderr text) and in the upstream's received
    ``upstream_headers`` (and ``upstream_bodies``, for scenarios whose bodies carry
    no content the upstream needs).
    """

    secrets: set[str] = field(default_factory=set)

    def add(self, *values: str) -> None:
        """Remember values that must not leak (markers, IPs, keys, passwords)."""
        self.secrets.update(v for v in values if v)

    def _search(self, blob: bytes, where: str) -> Iterator[Leak]:
        low = blob.lower()
        for secret in self.secrets:
            needle = secret.encode()
            at = blob.find(needle)
            if at < 0:
                at = low.find(needle.lower())
            if at >= 0:
                ctx = blob[max(0, at - 60): at + len(needle) + 60]
                yield Leak(secret, where, ctx.decode("utf-8", "replace"))

    def scan_dir(self, root: Path) -> list[Leak]:
        """Every file under ``root`` (the DB, -wal, -shm, anything else written there)."""
        found: list[Leak] = []
        for path in sorted(root.rglob("*")):
            if path.is_file():
                found += self._search(path.read_bytes(), str(path))
        return found

    def scan_text(self, text: str | bytes, where: str) -> list[Leak]:
        blob = text.encode() if isinstance(text, str) else text
        return list(self._search(blob, where))

    def scan_headers(self, requests: Iterable[Sequence[tuple[str, str]]],
                     where: str = "upstream request headers") -> list[Leak]:
        found: list[Leak] = []
        for i, headers in enumerate(requests):
            blob = "\n".join(f"{k}: {v}" for k, v in headers).encode()
            found += self._search(blob, f"{where} #{i}")
        return found

    def scan(self, *, data_dirs: Iterable[Path] = (), logs: Mapping[str, str | bytes] = {},
             upstream_headers: Iterable[Sequence[tuple[str, str]]] = (),
             upstream_bodies: Iterable[bytes] = ()) -> list[Leak]:
        """All leaks found, in every place given."""
        found: list[Leak] = []
        for root in data_dirs:
            found += self.scan_dir(root)
        for name, text in logs.items():
            found += self.scan_text(text, name)
        found += self.scan_headers(upstream_headers)
        for i, body in enumerate(upstream_bodies):
            found += self._search(body, f"upstream request body #{i}")
        return found

    def assert_clean(self, **places: Any) -> None:
        """Fail with every leak listed, if any."""
        assert self.secrets, "nothing to look for: the scenario planted no secrets"
        leaks = self.scan(**places)
        assert not leaks, "leaked:\n" + "\n".join(map(str, leaks))


# -- the gateway as a process ---------------------------------------------------------


@dataclass
class LiveGateway:
    """``python -m flintproxy serve`` in a subprocess, its data dir under ``tmp``.

    ``start()`` writes the config, creates a funded account (with a password) and a
    key through ``flintproxy admin``, starts the server on ephemeral ports and reads
    both planes' URLs from its log. ``stdout``/``stderr`` are captured in files.
    """

    tmp: Path
    raw: dict[str, Any]
    email: str = field(default_factory=lambda: f"owner-{secrets.token_hex(4)}@example.com")
    password: str = field(default_factory=lambda: "pw-" + secrets.token_urlsafe(12))
    credit_usd: str = "100.00"
    env: dict[str, str] = field(default_factory=dict)
    # More ``serve`` arguments, e.g. ("--workers", "2"): then both ports are fixed
    # free ones (the workers share them), not 0.
    serve_args: Sequence[str] = ()
    # A fixed console port (from ``free_port``), for configs that must name the
    # console's address before it starts ([email] public_url, [payments] return_url).
    console_port: int = 0
    key: str = ""
    url: str = ""
    console_url: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.tmp / "data"

    @property
    def config_path(self) -> Path:
        return self.tmp / "flintproxy.toml"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "flintproxy.db"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLINTPROXY")}
        return env | {"PYTHONUNBUFFERED": "1"} | self.env

    def admin(self, *args: str, stdin: str | None = None) -> str:
        """Run ``flintproxy admin`` on this gateway's config; its stdout."""
        done = subprocess.run(
            [sys.executable, "-m", "flintproxy", "admin", "--config", str(self.config_path),
             *args], input=stdin.encode() if stdin is not None else None,
            capture_output=True, env=self._env(), timeout=60, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return done.stdout.decode()

    def start(self) -> LiveGateway:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.raw.setdefault("storage", {})["path"] = str(self.db_path)
        fixed = bool(self.serve_args)
        self.raw["server"] = self.raw.get("server", {}) | {
            "host": "127.0.0.1", "port": free_port() if fixed else 0}
        self.raw["console"] = self.raw.get("console", {}) | {
            "host": "127.0.0.1", "port": self.console_port or (free_port() if fixed else 0)}
        self.config_path.write_text(to_toml(self.raw))
        self.admin("create-account", self.email, "--password-stdin", stdin=self.password + "\n")
        if self.credit_usd:
            self.admin("credit", self.email, self.credit_usd)
        self.key = self.admin("create-key", self.email).strip().splitlines()[-1]
        with (self.tmp / "stdout.log").open("wb") as out, \
                (self.tmp / "stderr.log").open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flintproxy", "serve", "--config",
                 str(self.config_path), *self.serve_args],
                stdout=out, stderr=err, env=self._env(), start_new_session=True)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not (self.url and self.console_url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("gateway did not start:\n" + self.stderr)
            for plane, url in _LISTEN.findall(self.stderr):
                if plane == "data":
                    self.url = url
                else:
                    self.console_url = url
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def stdout(self) -> str:
        path = self.tmp / "stdout.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def stderr(self) -> str:
        path = self.tmp / "stderr.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL past ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def logs(self) -> dict[str, str]:
        return {"gateway stdout": self.stdout, "gateway stderr": self.stderr}


@dataclass
class LiveMock:
    """``python -m flintproxy mock-upstream`` in a subprocess, on an ephemeral port."""

    tmp: Path
    args: Sequence[str] = ()
    base_url: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LiveMock:
        log = self.tmp / "mock.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flintproxy", "mock-upstream", "--port", "0",
                 *self.args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.base_url:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("mock upstream did not start:\n" + log.read_text())
            found = re.search(r"listening on (http://\S+)", log.read_text())
            if found:
                self.base_url = found.group(1)
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
