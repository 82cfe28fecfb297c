"""The access log: one JSON line per /v1 request, on stdout.

Fields: ts, request_id, method, path, status, model, upstream, duration_ms, ttfb_ms,
prompt_tokens, completion_tokens, outcome (ok | client_disconnect | upstream_error |
error | rejected), plus ``error`` (the OpenAI error code) on refused requests.
Never the request or response content, never a key, account or email, and never the
client IP, unless ``[metrics] log_client_ip = true`` (an opt-in for abuse
investigations; off by default) adds ``client_ip``. ``model`` is a configured model
name or "other", like the metrics label, so a client cannot write arbitrary text
into the log; ``path`` is the matched route, or null for an unknown URL.

Lines of admitted requests are made as they finish (a ServiceGate finish observer),
those refused before admission by the error middleware; aiohttp's own access log stays
off (it records IPs).

The request path pays only for formatting the line (orjson, to bytes) and appending it
to an in-memory buffer: a bytearray, as keeping orjson's own bytes objects alive until
the flush costs ~2 µs more per line, in malloc. The composition root's periodic task
writes the buffer every FLUSH_S, in one write, on the
access log's own thread: a slow or blocked stdout (a full pipe, a full disk) never
stalls the event loop. That thread is a daemon, so a write blocked for good cannot hold
up the process's exit either. The buffer is bounded (``max_pending_bytes``): beyond it
lines are dropped and counted in ``AccessLog.dropped`` (and in the metric
``flintproxy_access_log_dropped_lines_total``). Shutdown writes what is left.
``flintproxy serve`` gives stdout as the sink; while the sink is None, nothing is even
formatted.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Protocol

import orjson

from flintproxy.config import Config
from flintproxy.errors import FlintError
from flintproxy.gate.gate import Admission, Ending, Outcome
from flintproxy.gate.ipguard import client_ip
from flintproxy.http.exchange import Exchange
from flintproxy.relay.routes import ENDPOINT_PATHS

# The access log's own troubles (a failing sink); access lines never go through logging.
LOGGER = "flintproxy.access"
FLUSH_S = 0.5
# ~25,000 lines: 12 s of a 2,000 req/s gateway whose stdout has stopped draining.
MAX_PENDING_BYTES = 8 << 20
# How long shutdown waits for a blocked sink to take the last lines.
DRAIN_TIMEOUT_S = 5.0

log = logging.getLogger(LOGGER)


class Sink(Protocol):
    """Where the lines go: a binary stream (``sys.stdout.buffer``, a file, io.BytesIO)."""

    def write(self, data: bytes | bytearray, /) -> object: ...

    def flush(self) -> None: ...


# A batch for the access log's thread, and how the loop hears that it was written.
_Job = tuple[Sink, bytearray, Future[None]]


# The fraction of a second, 3 + 3 digits, by table look-up: formatting the integer
# cost more than the rest of ``ts`` together.
_MS = [f".{i:03d}" for i in range(1000)]
_US_Z = [f"{i:03d}Z" for i in range(1000)]


class _Clock:
    """``ts``: ISO-8601 UTC to the microsecond, exactly as orjson writes an aware datetime
    with OPT_UTC_Z ("2024-05-01T12:00:00.123456Z"; no fraction when it is zero), but the
    date and time of day are formatted once per second, not per line."""

    __slots__ = ("_prefix", "_sec")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def format(self, ns: int) -> str:
        # Floor to the µs, like datetime.now(): the same instant gives the same text.
        sec, us = divmod(ns // 1000, 1_000_000)
        if sec != self._sec:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self._sec = sec
        if not us:
            return self._prefix + "Z"
        return self._prefix + _MS[us // 1000] + _US_Z[us % 1000]


class AccessLog:
    """Formats the lines into a bounded in-memory buffer; ``flush`` writes them out.

    ``sink`` is where they go (``flintproxy serve``: stdout); while it is None,
    the log is off and nothing is even formatted. It may be changed at any time: lines
    still buffered go to the new sink at the next flush (none: they are discarded).
    ``dropped`` counts the lines lost: made while ``max_pending_bytes`` of lines were
    waiting, refused by a failing sink, or still unwritten when shutdown gave up.
    """

    def __init__(self, config: Config, sink: Sink | None = None) -> None:
        self.sink = sink
        self._models = frozenset(config.models)
        self._log_ip = config.metrics.log_client_ip
        self._trusted = config.limits.trusted_proxies
        self._clock = _Clock()
        self._buffer = bytearray()
        self._lines = 0  # in the buffer
        self.max_pending_bytes = MAX_PENDING_BYTES
        self.drain_timeout_s = DRAIN_TIMEOUT_S
        self.dropped = 0
        # A thread of its own: a write stuck on a full pipe holds it alone, never the
        # loop nor a worker of the default executor (which resolves upstream names).
        # Not a ThreadPoolExecutor: its workers are joined at interpreter exit, so a
        # write blocked for good would hang the exit after ``close`` gave up on it.
        # Started by the first write, so that a log never written starts none.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # One batch in flight at a time, so a blocked sink holds at most one batch
        # besides the bounded buffer.
        self._writing = asyncio.Lock()
        # The last batch handed to the thread, and its number of lines.
        self._last_write: tuple[Future[None], int] | None = None
        self._sink_failing = False
        self._format_failed = False
        self._closed = False  # close() was called (it runs once)
        self._stopped = False  # the thread was told to end (close's last write is over)

    @property
    def pending(self) -> int:
        """Lines made but not yet handed to the sink."""
        return self._lines

    def finished(self, admission: Admission, outcome: Outcome, cost_nano: int) -> None:
        """An admitted request ended (a ServiceGate finish observer). Never raises."""
        if self.sink is None:
            return
        try:
            call = admission.call
            ttfb = outcome.ttfb_s
            line: dict[str, object] = {
                "ts": self._clock.format(time.time_ns()),
                "request_id": call.request_id,
                "method": "POST",
                "path": ENDPOINT_PATHS.get(call.endpoint),
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
            self._append(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        except Exception:
            self._unformattable()

    def rejected(self, request: Exchange, err: FlintError) -> None:
        """A /v1 request answered with an error without being admitted. Never raises."""
        if self.sink is None or not request.path.startswith("/v1/"):
            return
        try:
            call = request.call
            line: dict[str, object] = {
                "ts": self._clock.format(time.time_ns()),
                "request_id": call.request_id if call is not None else None,
                "method": request.method,
                "path": request.route,  # never the client's text; None for a 404, 405
                "status": err.status,
                "model": call.model if call is not None and call.model in self._models
                else "other",
                "upstream": None,
                "duration_ms": None,
                "ttfb_ms": None,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "outcome": Ending.REJECTED,
                "error": err.code,
            }
            if self._log_ip:
                line["client_ip"] = self._ip(request)
            self._append(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        except Exception:
            self._unformattable()

    def _ip(self, request: Exchange) -> str:
        return client_ip(request.remote, request.header(b"x-forwarded-for"), self._trusted)

    def _append(self, line: bytes) -> None:
        if len(self._buffer) + len(line) > self.max_pending_bytes:
            self.dropped += 1  # the sink is not keeping up: shed, never wait
            return
        self._buffer += line
        self._lines += 1

    def _unformattable(self) -> None:
        # A bug, not a condition: counted every time, told once (with the traceback)
        # rather than once per request.
        self.dropped += 1
        if not self._format_failed:
            self._format_failed = True
            log.exception("access log: a line could not be made; counted in dropped")

    async def flush(self) -> None:
        """Hand the buffered lines to the sink in one write, on the access log's thread.

        Waits for a write already in flight first. Lines a failing sink refuses are
        counted in ``dropped``, and so are lines flushed after ``close``; if ``sink``
        has been set to None since they were made, they are discarded.
        """
        async with self._writing:
            batch, lines, sink = self._buffer, self._lines, self.sink
            if not lines:
                return
            # The thread owns the batch from here: the loop appends to a new buffer.
            self._buffer = bytearray()
            self._lines = 0
            if sink is None:
                return
            if self._stopped:
                self.dropped += lines
                return
            work: Future[None] = Future()
            if self._thread is None:
                self._thread = threading.Thread(target=_work, args=(self._jobs,),
                                                name="flint-accesslog", daemon=True)
                self._thread.start()
            self._jobs.put((sink, batch, work))
            self._last_write = work, lines
            try:
                await asyncio.wrap_future(work)
            except asyncio.CancelledError:
                # Still queued behind a blocked write: it never will be (the thread
                # skips it). One already running may yet complete.
                if work.cancel():
                    self.dropped += lines
                raise
            except Exception as exc:
                self.dropped += lines
                if not self._sink_failing:  # once per failing spell, not per flush
                    self._sink_failing = True
                    log.warning("access log: writing failed (%s); lines dropped until it "
                                "recovers", exc)
                return
            if self._sink_failing:
                self._sink_failing = False
                log.warning("access log: writing again; %d lines dropped so far",
                            self.dropped)

    async def close(self) -> None:
        """Write what is buffered (one last write), then stop the thread.

        Also waits for a write already in flight. Gives up after ``drain_timeout_s``
        when the sink is blocked, so that it cannot hang shutdown; the lines not written
        are counted in ``dropped``, and so are any made later: the log is closed for
        good. A thread stuck in a write is left behind: a daemon, it does not delay the
        process's exit.
        """
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._last_writes(), self.drain_timeout_s)
        except TimeoutError:
            # Still waiting for the write before (so never taken from the buffer).
            self.dropped += self._lines
            self._buffer = bytearray()
            self._lines = 0
            log.warning("access log: the sink is blocked; gave up on the last lines "
                        "(%d dropped in all)", self.dropped)
        self._stopped = True
        if self._thread is not None:
            self._jobs.put(None)  # ends the thread once it is done with what it holds

    async def _last_writes(self) -> None:
        await self.flush()
        # With nothing buffered flush returns at once, but the flusher (cancelled just
        # before close) may have left a write running. The thread being a daemon, the
        # process's exit would cut it short: wait for it too.
        if self._last_write is None:
            return
        work, lines = self._last_write
        if not work.done():
            try:
                await asyncio.wrap_future(work)
            except Exception:  # its flush, cancelled, is not there to count them
                self.dropped += lines


def _write(sink: Sink, batch: bytearray) -> None:
    # On the access log's thread: a syscall (or a blocked pipe) stays off the loop.
    sink.write(batch)
    sink.flush()


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    # The access log's thread, until it takes None. It is given the queue, not the
    # AccessLog, so that it never keeps one alive.
    while (job := jobs.get()) is not None:
        sink, batch, done = job
        # False: the loop gave up on this batch while it waited (its flush was
        # cancelled: close timed out behind a blocked write).
        if done.set_running_or_notify_cancel():
            try:
                _write(sink, batch)
            except BaseException as exc:  # whatever the sink raises, the loop is told
                done.set_exception(exc)
            else:
                done.set_result(None)
        # Free the batch now, not when the next one comes.
        del job, sink, batch, done
