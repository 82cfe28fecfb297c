"""``flintproxy serve --workers N``: N worker processes on one data port and one
console port, supervised.

Why processes: one flintproxy process holds about 10k requests/s on one core; more
cores need more processes. Each worker is a complete ``flintproxy serve`` that opens
both listeners with SO_REUSEPORT, so the kernel spreads new connections over the
workers (no accept lock, no hand-off). What must be shared between them (accounts,
balances, the ledger, limits) is shared through the engines: PostgreSQL and Redis.
The embedded mode's SQLite store and in-memory limits are per process, so N > 1 is
refused there (``refusal``): N workers would each admit a key's whole limit and
spend from their own copy of a balance.

The supervisor itself serves nothing and imports no layer's machinery:
    start     N workers, each ``python -m flintproxy serve ... --reuse-port``; with a
              fresh PROMETHEUS_MULTIPROC_DIR (unless one is set), so any worker's
              /metrics reports all of them (ops.metrics)
    watch     a worker that exits is logged and started again after a backoff: 0.5 s,
              doubling per quick death (alive < 10 s) up to 30 s
    stop      SIGTERM/SIGINT: SIGTERM to every worker, each drains (its graceful
              shutdown: in-flight streams finish, usage written, limits released);
              SIGKILL past ``shutdown_timeout_s`` + 5 s; exit 0
Workers die with the supervisor (PR_SET_PDEATHSIG) rather than linger unsupervised.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flintproxy.config import Config, StorageBackend

__all__ = ["Supervisor", "refusal", "worker_argv"]

log = logging.getLogger("flintproxy.supervisor")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 10.0  # a worker alive this long resets its slot's backoff
TICK_S = 0.1
KILL_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


def refusal(config: Config, workers: int) -> str | None:
    """Why ``--workers`` cannot run with this config, or None when it can."""
    if workers < 1:
        return f"--workers {workers}: must be at least 1"
    if workers == 1:
        return None
    missing = []
    if config.storage.backend is not StorageBackend.POSTGRESQL:
        missing.append('[storage] backend = "postgresql" with a dsn (balances, keys and '
                       "the ledger shared by every worker)")
    if config.cluster.redis_url is None:
        missing.append("[cluster] redis_url (or redis_url_env) (rate limits shared by "
                       "every worker)")
    if not missing:
        if config.server.port == 0 or config.console.port == 0:
            return (f"--workers {workers} needs fixed ports: every worker listens on the "
                    "same [server] port and [console] port (SO_REUSEPORT); 0 would give "
                    "each its own")
        return None
    return (f"--workers {workers} is refused: the embedded store (SQLite) and in-memory "
            "rate limits are per process, so each worker would admit a key's whole limit "
            "and spend from its own copy of a balance. Run one process (no --workers), "
            "or configure the shared mode: " + "; ".join(missing) + ". See README "
            '"Running more than one process".')


@dataclass
class _Slot:
    number: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = BACKOFF_MIN_S
    restart_at: float = 0.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: workers outlive a SIGKILLed supervisor; SIGTERM still drains


class Supervisor:
    """Runs ``argv`` (a worker's command line) ``workers`` times; see the module doc."""

    def __init__(self, argv: Sequence[str], workers: int, shutdown_timeout_s: float,
                 env: Mapping[str, str] | None = None) -> None:
        self._argv = list(argv)
        self._slots = [_Slot(i + 1) for i in range(workers)]
        self._grace = shutdown_timeout_s + KILL_GRACE_S
        self._env = dict(os.environ if env is None else env)
        self._stopping = False
        self._metrics_dir: str | None = None

    def run(self) -> int:
        """Until SIGTERM/SIGINT; then drain every worker and return 0."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM,
                                                                    signal.SIGINT)}
        if not self._env.get("PROMETHEUS_MULTIPROC_DIR"):
            self._metrics_dir = tempfile.mkdtemp(prefix="flintproxy-metrics-")
            self._env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        log.info("flintproxy supervisor (pid %d) starting %d workers", os.getpid(),
                 len(self._slots))
        try:
            for slot in self._slots:
                self._start(slot)
            while not self._stopping:
                time.sleep(TICK_S)
                self._watch()
            log.info("flintproxy supervisor: draining %d workers", len(self._slots))
            self._drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        return 0

    def _stop(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _start(self, slot: _Slot) -> None:
        # Our own command line (worker_argv), never a client's input.
        slot.proc = subprocess.Popen(self._argv, env=self._env,  # noqa: S603
                                     preexec_fn=_die_with_parent)
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d)", slot.number, slot.proc.pid)

    def _watch(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            proc = slot.proc
            if proc is None:
                if now >= slot.restart_at and not self._stopping:
                    self._start(slot)
                continue
            code = proc.poll()
            if code is None:
                continue
            lived = now - slot.started
            slot.backoff = BACKOFF_MIN_S if lived >= STABLE_S else min(
                slot.backoff * 2, BACKOFF_MAX_S)
            slot.restart_at = now + slot.backoff
            slot.proc = None
            how = f"signal {-code}" if code < 0 else f"status {code}"
            log.error("worker %d (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                      slot.number, proc.pid, how, lived, slot.backoff)

    def _drain(self) -> None:
        procs = [s.proc for s in self._slots if s.proc is not None and s.proc.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not drain within %.0f s: killed", proc.pid,
                          self._grace)
                proc.kill()
                proc.wait()
        for proc in procs:
            if proc.returncode not in (0, -signal.SIGTERM):
                log.warning("worker pid %d ended with status %s", proc.pid, proc.returncode)


def worker_argv(config_path: str, host: str | None, port: int | None) -> list[str]:
    """A worker's command line: this ``serve`` without ``--workers``, sharing the port."""
    argv = [sys.executable, "-m", "flintproxy", "serve", "--config", config_path,
            "--reuse-port"]
    if host is not None:
        argv += ["--host", host]
    if port is not None:
        argv += ["--port", str(port)]
    return argv
