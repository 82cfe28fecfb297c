"""Throwaway PostgreSQL and Redis servers for the tests, on loopback, started on demand.

The shared mode (issue 14) must be tested against the real engines, not fakes: each
test session that needs one starts its own instance in a temporary directory on a
free port (``initdb`` + ``postgres`` from Debian's ``postgresql`` package, and
``redis-server``), and stops it at the end. Nothing listens beyond 127.0.0.1 and
nothing is written outside the temporary directory.

PostgreSQL refuses to run as root, so as root (CI, the dev machine) the server runs
as the ``postgres`` system user the Debian package creates. Each test gets a fresh
database (``PostgresServer.new_database``) and each Redis user a fresh key prefix or
database number, so tests never see each other's state.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bindir() -> Path | None:
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(found, "initdb").exists():
            return Path(found)
    which = shutil.which("initdb")
    return Path(which).parent if which else None


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S}s")


@dataclass
class PostgresServer:
    """One PostgreSQL cluster in a temporary directory; ``dsn(db)`` for each database."""

    port: int
    root: Path
    proc: subprocess.Popen[bytes]
    user: str = "postgres"
    _names: count[int] = field(default_factory=lambda: count(1))

    @classmethod
    def start(cls) -> PostgresServer:
        bindir = _pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        root = Path(tempfile.mkdtemp(prefix="flintproxy-pg-"))
        data = root / "data"
        run_as: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(root, account.pw_uid, account.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
             "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port = free_port()
        proc = subprocess.Popen(
            [*run_as, str(bindir / "postgres"), "-D", str(data), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}",
             "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=300",
             "-c", "shared_preload_libraries=pg_stat_statements",
             "-c", "log_min_messages=fatal"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = cls(port=port, root=root, proc=proc)
        try:
            _wait_port(port, proc, "postgres")
            server._wait_ready()
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            done = self.psql("postgres", "SELECT 1", check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready: {done.stderr!r}")
            time.sleep(0.1)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def psql(self, database: str, sql: str, *, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", self.dsn(database),
             "-c", sql], check=check, capture_output=True, text=True)

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database for one test; returns its DSN."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        self.psql("postgres", f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: "smart" shutdown; fine for a throwaway
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class RedisServer:
    """One redis-server with no persistence, in a temporary directory."""

    port: int
    root: Path
    proc: subprocess.Popen[bytes]
    _dbs: count[int] = field(default_factory=lambda: count(1))

    @classmethod
    def start(cls) -> RedisServer:
        root = Path(tempfile.mkdtemp(prefix="flintproxy-redis-"))
        port = free_port()
        server = cls(port=port, root=root, proc=cls._spawn(port, root))
        try:
            _wait_port(port, server.proc, "redis-server")
        except BaseException:
            server.stop()
            raise
        return server

    @staticmethod
    def _spawn(port: int, root: Path) -> subprocess.Popen[bytes]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        return subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(root), "--databases", "256",
             "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), keeping its port and directory for
        ``restart``: a Redis outage as clients see it."""
        self.proc.kill()
        self.proc.wait(5)

    def restart(self) -> None:
        """Start again on the same port (empty: no persistence), after ``kill``."""
        self.proc = self._spawn(self.port, self.root)
        _wait_port(self.port, self.proc, "redis-server")

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def new_url(self) -> str:
        """A URL on a database number no other test of this session uses."""
        db = next(self._dbs)
        if db >= 256:
            raise RuntimeError("more than 255 Redis users in one test session")
        return self.url(db)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)
