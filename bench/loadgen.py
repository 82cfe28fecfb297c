"""The bench's own asyncio HTTP/1.1 client, for what wrk cannot measure.

    python bench/loadgen.py rate   URL --rate R --duration S [--stream]   # TTFB at a fixed rate
    python bench/loadgen.py slow   URL --streams N --ramp S               # N concurrent streams
    python bench/loadgen.py closed URL --conns C --duration S [--stream]  # throughput (no wrk)

A bare ``asyncio.Protocol`` on uvloop (no HTTP library): it parses the status
line, Content-Length or chunked framing, and times the first response byte, the
first body byte, the first SSE ``data:`` (the TTFB of a stream: a gateway's
``: keep-alive`` comments before it do not count) and the end. A stream counts as
an error unless it is HTTP 200 and its body ends with ``data: [DONE]``. Prints one JSON object on
stdout. Timestamps in ``slow`` mode are ``time.monotonic()`` (CLOCK_MONOTONIC,
comparable across processes) so the caller can line them up with RSS samples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import resource
import sys
import time
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

from flintproxy.cli import reserve_fd_table

DONE = b"data: [DONE]\n\n"
now = time.monotonic


class Result:
    __slots__ = ("body_bytes", "error", "status", "t_body", "t_data", "t_end", "t_head", "t_sent",
                 "tail")

    def __init__(self, t_sent: float) -> None:
        self.t_sent = t_sent
        self.t_head = 0.0  # first response byte
        self.t_body = 0.0  # first body byte
        self.t_data = 0.0  # first SSE "data:" (not a ": keep-alive" comment before it)
        self.t_end = 0.0
        self.status = 0
        self.body_bytes = 0
        self.tail = b""
        self.error: str | None = None


class Conn(asyncio.Protocol):
    """One keep-alive connection; ``request()`` sends and resolves at the response's end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.waiter: asyncio.Future[Result] | None = None
        self.res: Result | None = None
        self.buf = b""
        self.head_done = False
        self.chunked = False
        self.remaining = 0  # Content-Length left, or bytes left in the current chunk (+CRLF)
        self.keep_alive = True

    # -- asyncio callbacks --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        if self.res is not None:
            self._finish(f"connection lost ({type(exc).__name__ if exc else 'eof'})")

    def data_received(self, data: bytes) -> None:
        res = self.res
        if res is None:
            return  # unsolicited bytes; ignore
        if not res.t_head:
            res.t_head = now()
        if not self.head_done:
            buf = self.buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.buf = b""
            self._head(buf[:end])
            data = buf[end + 4:]
            if not self.chunked and self.remaining == 0:
                self._finish(None)
                return
            if not data:
                return
        if not res.t_body:
            res.t_body = now()
        if self.chunked:
            self._chunked(data)
        else:
            res.body_bytes += len(data)
            if not res.t_data and b"data:" in res.tail + data:
                res.t_data = now()
            res.tail = (res.tail + data)[-16:]
            self.remaining -= len(data)
            if self.remaining <= 0:
                self._finish(None)

    # -- parsing --------------------------------------------------------------------
    def _head(self, head: bytes) -> None:
        assert self.res is not None
        self.head_done = True
        lines = head.split(b"\r\n")
        try:
            self.res.status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self.res.status = -1
        self.chunked = False
        self.remaining = 0
        self.keep_alive = True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self.remaining = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif name == b"connection" and b"close" in value.lower():
                self.keep_alive = False

    def _chunked(self, data: bytes) -> None:
        res = self.res
        assert res is not None
        buf = self.buf + data if self.buf else data
        pos, n = 0, len(buf)
        while pos < n:
            if self.remaining > 0:  # inside a chunk: its data, then its CRLF
                take = min(self.remaining, n - pos)
                data_part = min(take, self.remaining - 2)
                if data_part > 0:
                    res.body_bytes += data_part
                    piece = buf[pos:pos + data_part]
                    if not res.t_data and b"data:" in res.tail + piece:
                        res.t_data = now()
                    res.tail = (res.tail + piece)[-16:]
                pos += take
                self.remaining -= take
                continue
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(buf[pos:nl].split(b";", 1)[0], 16)
            if size == 0:
                if buf.find(b"\r\n", nl + 2) < 0:  # wait for the (empty) trailer line
                    break
                self.buf = b""
                self._finish(None)
                return
            pos = nl + 2
            self.remaining = size + 2
        self.buf = buf[pos:]

    def _finish(self, error: str | None) -> None:
        res, waiter = self.res, self.waiter
        self.res = self.waiter = None
        self.head_done = False
        self.buf = b""
        if res is None:
            return
        res.t_end = now()
        res.error = error
        if waiter is not None and not waiter.done():
            waiter.set_result(res)

    # -- API ------------------------------------------------------------------------
    def request(self, raw: bytes) -> asyncio.Future[Result]:
        assert self.transport is not None and self.res is None
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.waiter = fut
        self.res = Result(now())
        self.transport.write(raw)
        return fut

    @property
    def usable(self) -> bool:
        return self.transport is not None and self.keep_alive and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def build_request(url: str, body: bytes, key: str | None, extra: list[str]) -> bytes:
    parts = urlsplit(url)
    lines = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    lines += extra
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def connect(host: str, port: int) -> Conn:
    _, proto = await asyncio.get_running_loop().create_connection(Conn, host, port)
    return proto


def ok(res: Result, stream: bool) -> bool:
    return res.error is None and res.status == 200 and (not stream or res.tail.endswith(DONE))


def why(res: Result, stream: bool) -> str:
    if res.error:
        return res.error
    if res.status != 200:
        return f"HTTP {res.status}"
    return "incomplete stream (no [DONE])" if stream else "?"


def quantiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def q(p: float) -> float:
        return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))] * 1000

    return {"p50": q(50), "p90": q(90), "p99": q(99), "p999": q(99.9), "max": v[-1] * 1000,
            "min": v[0] * 1000, "mean": sum(v) / len(v) * 1000}


# --- modes -------------------------------------------------------------------------


async def mode_rate(args: argparse.Namespace, raw: bytes, host: str, port: int) -> dict[str, Any]:
    """Open loop at a fixed rate over a pool of keep-alive connections."""
    idle: list[Conn] = [await connect(host, port) for _ in range(args.pool)]
    ttfb: list[float] = []
    total: list[float] = []
    errors: dict[str, int] = {}
    lag: list[float] = []

    async def take() -> Conn:
        while idle:  # a server may have closed an idle keep-alive connection
            conn = idle.pop()
            if conn.usable:
                return conn
            conn.close()
        return await connect(host, port)

    async def one() -> None:
        conn = await take()
        res = await asyncio.wait_for(conn.request(raw), args.timeout)
        if ok(res, args.stream):
            first = (res.t_data or res.t_body or res.t_end) if args.stream else \
                (res.t_body or res.t_end)
            ttfb.append(first - res.t_sent)
            total.append(res.t_end - res.t_sent)
        else:
            errors[why(res, args.stream)] = errors.get(why(res, args.stream), 0) + 1
        if conn.usable:
            idle.append(conn)
        else:
            conn.close()

    async def guarded() -> None:
        try:
            await one()
        except (OSError, TimeoutError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    # Warm-up: one request on every pooled connection, not measured.
    await asyncio.gather(*(asyncio.wait_for(c.request(raw), args.timeout) for c in idle))
    tasks = []
    start = now()
    n = int(args.rate * args.duration)
    for i in range(n):
        due = start + i / args.rate
        delay = due - now()
        if delay > 0:
            await asyncio.sleep(delay)
        lag.append(now() - due)
        tasks.append(asyncio.ensure_future(guarded()))
    await asyncio.gather(*tasks)
    elapsed = now() - start
    for conn in idle:
        conn.close()
    return {"mode": "rate", "sent": n, "ok": len(ttfb), "errors": errors,
            "error_count": sum(errors.values()), "rate": n / elapsed,
            "ttfb_ms": quantiles_ms(ttfb), "latency_ms": quantiles_ms(total),
            "ttfb_samples_ms": [round(x * 1000, 4) for x in ttfb],
            "latency_samples_ms": [round(x * 1000, 4) for x in total],
            "schedule_lag_ms": quantiles_ms(lag)}


async def mode_slow(args: argparse.Namespace, raw: bytes, host: str, port: int) -> dict[str, Any]:
    """N streams, each on its own new connection, started evenly over ``ramp`` seconds."""
    n = args.streams
    starts = [0.0] * n
    firsts = [0.0] * n
    ends = [0.0] * n
    errors: dict[str, int] = {}
    failed = [False] * n

    async def one(i: int, due: float) -> None:
        delay = due - now()
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = starts[i] = now()
        conn: Conn | None = None
        try:
            conn = await asyncio.wait_for(connect(host, port), args.timeout)
            fut = conn.request(raw)
            res = await asyncio.wait_for(fut, args.timeout)
            ends[i] = res.t_end
            if ok(res, True):
                firsts[i] = (res.t_data or res.t_body) - t0
            else:
                failed[i] = True
                errors[why(res, True)] = errors.get(why(res, True), 0) + 1
        except (OSError, TimeoutError) as exc:
            ends[i] = now()
            failed[i] = True
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
        finally:
            if conn is not None:
                conn.close()

    t0 = now() + 0.05
    await asyncio.gather(*(one(i, t0 + args.ramp * i / n) for i in range(n)))
    # Open streams over time (50 ms steps), for the RSS-per-stream figure.
    events = sorted([(s, 1) for s in starts] + [(e, -1) for e in ends])
    timeline: list[tuple[float, int]] = []
    open_now = peak = 0
    for t, d in events:
        open_now += d
        peak = max(peak, open_now)
        if not timeline or t - timeline[-1][0] >= 0.05:
            timeline.append((t, open_now))
        else:
            timeline[-1] = (timeline[-1][0], max(timeline[-1][1], open_now))
    ttfb = [f for f, bad in zip(firsts, failed, strict=True) if not bad]
    durations = [e - s for s, e, bad in zip(starts, ends, failed, strict=True) if not bad]
    return {"mode": "slow", "streams": n, "ok": len(ttfb), "errors": errors,
            "error_count": sum(errors.values()), "peak_open": peak,
            "ttfb_ms": quantiles_ms(ttfb), "duration_ms": quantiles_ms(durations),
            "ttfb_samples_ms": [round(x * 1000, 3) for x in ttfb],
            "timeline": [[round(t, 4), c] for t, c in timeline],
            "t_first_start": min(starts), "t_last_end": max(ends)}


async def mode_closed(args: argparse.Namespace, raw: bytes, host: str,
                      port: int) -> dict[str, Any]:
    """C connections, each sending back-to-back for ``duration`` seconds (no wrk)."""
    lat: list[float] = []
    errors: dict[str, int] = {}
    stop_at = now() + args.duration
    count = 0

    async def worker() -> None:
        nonlocal count
        conn = await connect(host, port)
        while now() < stop_at:
            if not conn.usable:
                conn = await connect(host, port)
            res = await asyncio.wait_for(conn.request(raw), args.timeout)
            if ok(res, args.stream):
                lat.append(res.t_end - res.t_sent)
                count += 1
            else:
                errors[why(res, args.stream)] = errors.get(why(res, args.stream), 0) + 1
        conn.close()

    start = now()
    await asyncio.gather(*(worker() for _ in range(args.conns)))
    elapsed = now() - start
    q = quantiles_ms(lat)
    return {"mode": "closed", "requests": count, "rps": count / elapsed, "errors": errors,
            "error_count": sum(errors.values()), "latency_ms": q, "tool": "asyncio client",
            "p50_ms": q.get("p50", 0.0), "p99_ms": q.get("p99", 0.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("rate", "slow", "closed"))
    p.add_argument("url")
    p.add_argument("--body", required=True, help="request body (JSON)")
    p.add_argument("--key")
    p.add_argument("--header", action="append", default=[], help="extra 'Name: value'")
    p.add_argument("--stream", action="store_true", help="expect SSE ending in [DONE]")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--pool", type=int, default=16)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--ramp", type=float, default=1.0)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    reserve_fd_table()  # as the servers do: no stall as the 256th, 512th... stream opens
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    raw = build_request(args.url, args.body.encode(), args.key, args.header)
    modes = {"rate": mode_rate, "slow": mode_slow, "closed": mode_closed}
    gc.freeze()  # the measurement should not pay for collecting the set-up
    try:
        import uvloop
    except ImportError:
        out = asyncio.run(modes[args.mode](args, raw, host, port))
    else:
        out = uvloop.run(modes[args.mode](args, raw, host, port))
    out["pid"] = os.getpid()
    sys.stdout.buffer.write(orjson.dumps(out) + b"\n")


if __name__ == "__main__":
    main()
