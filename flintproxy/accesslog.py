"""The access log: one JSON line per /v1 request on the ``flintproxy.access`` logger.

Fields: ts, request_id, method, path, status, model, upstream, duration_ms, ttfb_ms,
prompt_tokens, completion_tokens, outcome (ok | client_disconnect | upstream_error |
error | rejected), plus ``error`` (the OpenAI error code) on refused requests.
Never the request or response content, never a key, account or email, and never the
client IP, unless ``[metrics] log_client_ip = true`` (an opt-in for abuse
investigations; off by default) adds ``client_ip``. ``model`` is a configured model
name or "other", like the metrics label, so a client cannot write arbitrary text
into the log; ``path`` is the matched route, or null for an unknown URL.

Lines of admitted requests are written as they finish (a ServiceGate finish
observer), those refused before admission by the error middleware; aiohttp's own
access log stays off (it records IPs). ``configure`` (called by ``serve``) sends the
logger to stdout; left unconfigured it propagates to the root logger, and nothing is
even formatted unless INFO is enabled for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TextIO

import orjson
from aiohttp import web

from flintproxy.config import Config, MetricsConfig
from flintproxy.errors import FlintError
from flintproxy.gate import Admission, Exchange, Outcome
from flintproxy.limiter import client_ip

LOGGER = "flintproxy.access"
_PATHS = {ep: f"/v1/{ep}" for ep in ("chat/completions", "completions", "embeddings")}
_DUMPS_OPTS = orjson.OPT_UTC_Z


class AccessLog:
    """Formats and emits the lines; cheap when the logger is off."""

    def __init__(self, config: Config) -> None:
        self._log = logging.getLogger(LOGGER)
        self._models = frozenset(config.models)
        self._log_ip = config.metrics.log_client_ip
        self._trusted = config.limits.trusted_proxies

    def finished(self, admission: Admission, outcome: Outcome, cost_nano: int) -> None:
        """An admitted request ended (a ServiceGate finish observer)."""
        log = self._log
        if not log.isEnabledFor(logging.INFO):
            return
        call = admission.call
        ttfb = outcome.ttfb_s
        line = {
            "ts": datetime.now(UTC),
            "request_id": call.request_id,
            "method": "POST",
            "path": _PATHS.get(call.endpoint),
            "status": outcome.status,
            "model": call.model if call.model in self._models else "other",
            "upstream": outcome.upstream,
            "duration_ms": round(outcome.duration_s * 1000.0, 3),
            "ttfb_ms": None if ttfb is None else round(ttfb * 1000.0, 3),
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "outcome": outcome.outcome,
            "stream": call.stream,
        }
        if self._log_ip and admission.exchange is not None:
            line["client_ip"] = self._ip(admission.exchange)
        _emit(log, line)

    def rejected(self, request: Exchange, err: FlintError) -> None:
        """A /v1 request answered with an error without being admitted."""
        log = self._log
        if not log.isEnabledFor(logging.INFO) or not request.path.startswith("/v1/"):
            return
        call = request.call
        line: dict[str, object] = {
            "ts": datetime.now(UTC),
            "request_id": call.request_id if call is not None else None,
            "method": request.method,
            "path": request.route,
            "status": err.status,
            "model": call.model if call is not None and call.model in self._models
            else "other",
            "upstream": None,
            "duration_ms": None,
            "ttfb_ms": None,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "outcome": "rejected",
            "error": err.code,
        }
        if self._log_ip:
            line["client_ip"] = self._ip(request)
        _emit(log, line)

    def _ip(self, request: Exchange) -> str:
        return client_ip(request.remote, request.header(b"x-forwarded-for"), self._trusted)


def _emit(log: logging.Logger, line: dict[str, object]) -> None:
    # A ready-made record: logger.info() would walk the stack for the caller's file
    # and line (~1.5 µs), which an access line has no use for.
    msg = orjson.dumps(line, option=_DUMPS_OPTS).decode()
    log.handle(log.makeRecord(LOGGER, logging.INFO, "", 0, msg, (), None))


class _AccessHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines without a flush (a syscall) per line; see ``flush_periodically``.

    Also marks the handler ``configure`` installed, so a second call does not add
    another. A line waits at most FLUSH_S in the stream's buffer.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._last_flush = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            now = time.monotonic()
            if now - self._last_flush >= FLUSH_S:
                self._last_flush = now
                self.stream.flush()
        except Exception:
            self.handleError(record)


FLUSH_S = 0.5


async def flush_periodically(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: push buffered access lines out at least every FLUSH_S."""

    def flush() -> None:
        for h in logging.getLogger(LOGGER).handlers:
            h.flush()

    async def loop() -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            flush()

    task = asyncio.get_running_loop().create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    flush()


def configure(cfg: MetricsConfig, stream: TextIO | None = None) -> None:
    """Send access lines, bare JSON, to ``stream`` (stdout), or silence them."""
    logger = logging.getLogger(LOGGER)
    logger.propagate = False  # not also through the root logger's stderr handler
    for h in [h for h in logger.handlers if isinstance(h, _AccessHandler)]:
        logger.removeHandler(h)
    if not cfg.access_log:
        logger.setLevel(logging.CRITICAL + 1)
        return
    handler = _AccessHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
