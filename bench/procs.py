"""Process plumbing for the bench: start pinned children, stop them, read /proc.

Every child starts in its own session (process group) so that stopping it also
stops what it spawned (nginx workers); the bench only ever signals the groups it
created, by id.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def raise_nofile() -> int:
    """Lift RLIMIT_NOFILE to its hard limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def have(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.access(p, os.X_OK)), None)


def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    """``cmd`` under ``taskset -c cpus`` when taskset exists and more than one CPU does."""
    if cpus is None or not have("taskset") or (os.cpu_count() or 1) < 2:
        return list(cmd)
    return ["taskset", "-c", cpus, *cmd]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    cpus: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        """The child and its descendants (nginx master + workers)."""
        return [self.pid, *descendants(self.pid)]

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


_children: list[Child] = []


def start(name: str, cmd: Sequence[str], logdir: Path, cpus: str | None = None,
          env: dict[str, str] | None = None) -> Child:
    log = logdir / f"{name}.log"
    full = pinned(cmd, cpus)
    with log.open("ab") as out:
        out.write(f"$ {' '.join(full)}\n".encode())
        out.flush()
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **(env or {})})
    child = Child(name, proc, log, cpus)
    child.extra["cmd"], child.extra["env"], child.extra["logdir"] = list(cmd), env, logdir
    _children.append(child)
    return child


def restart(child: Child) -> Child:
    """Stop ``child`` and start the same command again (a fresh process, fresh RSS)."""
    child.stop()
    forget(child)
    new = start(child.name, child.extra["cmd"], child.extra["logdir"], child.cpus,
                child.extra["env"])
    new.extra.update({k: v for k, v in child.extra.items() if k not in new.extra})
    return new


def stop_all() -> None:
    while _children:
        _children.pop().stop(5)


def all_pids() -> list[int]:
    return [p for c in _children for p in c.pids()]


def forget(child: Child) -> None:
    if child in _children:
        _children.remove(child)


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def tcp_counters() -> dict[str, int]:
    """Kernel TCP counters that explain slow connects: accept-queue overflows, SYN retries."""
    out: dict[str, int] = {}
    want = {"ListenOverflows", "ListenDrops", "TCPSynRetrans", "TCPTimeouts", "TCPAbortOnData",
            "TCPAbortOnClose", "TCPAbortOnMemory", "RetransSegs", "AttemptFails",
            "EstabResets"}
    for name in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            lines = Path(name).read_text().splitlines()
        except OSError:
            continue
        for head, vals in zip(lines[::2], lines[1::2], strict=False):
            keys, nums = head.split()[1:], vals.split()[1:]
            for k, v in zip(keys, nums, strict=False):
                if k in want:
                    out[k] = int(v)
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime+stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        total += int(fields[1]) * PAGE_KIB
    return total


class Sampler:
    """Samples RSS (KiB) and CPU seconds of some processes every ``interval`` s in a thread."""

    def __init__(self, pids: Sequence[int], interval: float = 0.05) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.samples: list[tuple[float, int, float]] = []  # (monotonic, rss KiB, cpu s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), rss_kib(self.pids), cpu_seconds(self.pids)))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_http(url: str, timeout: float = 20.0, child: Child | None = None,
              headers: dict[str, str] | None = None) -> int:
    """Poll ``url`` until it answers at all; returns its status."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n{child.tail()}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code
        except OSError as e:
            last = e
            time.sleep(0.1)
    tail = child.tail() if child else ""
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s ({last})\n{tail}")


def wait_port(port: int, timeout: float = 10.0, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n{child.tail()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening after {timeout:.0f}s"
                       + (f"\n{child.tail()}" if child else ""))


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run(cmd: Sequence[str], timeout: float = 120.0, cpus: str | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pinned(cmd, cpus), capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
