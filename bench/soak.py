"""Soak: minutes of mixed, partly hostile traffic, then the books must balance.

Starts the mock upstream and ``flintproxy serve`` as processes (temp data dir), then
runs ``--concurrency`` clients for ``--minutes``/``--seconds`` of: plain and streamed
chat, completions, embeddings, clients that leave mid-stream, slow readers, upstream
faults (the mock's ``x-mock-fault`` modes) and bad keys. At the end, with the
gateway still running and its usage writer settled, it asserts from the database
and the mock's own counters:

- requests that reached the upstream == usage rows (nothing lost, nothing doubled);
- Σ usage.cost_nano == credited - balance == charged (exact nano-USD integers);
- the gateway's RSS, sampled every ``--sample-s`` after a warm-up, has no upward
  trend: the least-squares slope stays under ``--max-slope`` MiB/min.

Prints one JSON summary line; exits 1 if an assertion fails. ``make soak MINUTES=N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CONFIG = """\
[server]
host = "127.0.0.1"
port = 0
keepalive_timeout_s = 10.0

[console]
host = "127.0.0.1"
port = 0

[storage]
path = "{db}"

[[upstreams]]
name = "mock"
base_url = "{upstream}"
models = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
read_timeout_s = 10.0
failure_threshold = 1000  # faults are the traffic here, not a reason to stop
cooldown_s = 0.01
forward_headers = ["x-mock-*"]  # the traffic's faults and paces must reach the mock

[models."gpt-4o-mini"]
input_usd_per_mtok = "0.15"
output_usd_per_mtok = "0.60"

[models."gpt-4o"]
input_usd_per_mtok = "2.50"
output_usd_per_mtok = "10.00"

[models."text-embedding-3-small"]
input_usd_per_mtok = "0.02"
output_usd_per_mtok = "0"

[limits]
default_rpm = 100000000
default_tpm = 100000000000

[accounts]
bcrypt_cost = 4

[metrics]
access_log = false
"""

# Traffic mix: (kind, weight).
MIX = [("chat", 25), ("stream", 25), ("completion", 5), ("embed", 8), ("disconnect", 10),
       ("slow", 5), ("fault", 14), ("badkey", 8)]
FAULTS = ["http500", "http429", "malformed", "reset:0", "reset:3", "hang"]
BAD_ADDRESS = "127.0.0.3"  # where the bad keys come from (any loopback address works)
_LISTEN = re.compile(r"flintproxy (data|control) plane .* listening on (http://\S+)")


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    refused_valid: int = 0  # 429s to valid keys with no fault asked for


def start(cmd: list[str], log: Path, pattern: re.Pattern[str], want: int,
          timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], list[tuple[str, ...]]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = pattern.findall(log.read_text(errors="replace"))
        if len(found) >= want:
            return proc, [tuple(f) if isinstance(f, tuple) else (f,) for f in found]
        time.sleep(0.05)
    stop(proc)
    raise SystemExit(f"{cmd[3]} did not start:\n{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def admin(config: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "flintproxy", "admin", "--config",
                           str(config), *args], input=stdin.encode() if stdin else None,
                          capture_output=True, check=True, timeout=60)
    return done.stdout.decode()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(samples) < 3:
        return 0.0
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    cov = sum((t - mx) * (v - my) for t, v in samples)
    return cov / var * 60 if var else 0.0


def body_for(kind: str, rnd: random.Random) -> tuple[str, dict[str, Any]]:
    words = " ".join(f"w{rnd.randrange(10**6)}" for _ in range(rnd.randrange(1, 40)))
    if kind == "embed":
        return "/v1/embeddings", {"model": "text-embedding-3-small", "input": [words] * 2}
    if kind == "completion":
        return "/v1/completions", {"model": "gpt-4o-mini", "prompt": words,
                                   "max_tokens": 64, "stream": rnd.random() < 0.5}
    data: dict[str, Any] = {"model": rnd.choice(["gpt-4o-mini", "gpt-4o"]), "max_tokens": 64,
                            "messages": [{"role": "user", "content": words}]}
    if kind != "chat":
        data["stream"] = True
        if rnd.random() < 0.5:
            data["stream_options"] = {"include_usage": True}
    return "/v1/chat/completions", data


async def one(sessions: tuple[aiohttp.ClientSession, aiohttp.ClientSession], url: str,
              key: str, rnd: random.Random, tally: Tally) -> None:
    kind = rnd.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
    # Bad keys come from an address of their own: the IP guard slows an address that
    # fails, and the soak measures the books, not the guard (issue 12 defect 11).
    session = sessions[kind == "badkey"]
    path, data = body_for(kind, rnd)
    headers = {"Authorization": f"Bearer {key}"}
    if kind == "badkey":
        headers["Authorization"] = f"Bearer sk-bad{rnd.randrange(10**9)}"
    elif kind == "fault":
        data["stream"] = rnd.random() < 0.5
        headers["x-mock-fault"] = rnd.choice(FAULTS)
    elif kind in ("disconnect", "slow"):
        headers |= {"x-mock-chunks": "30", "x-mock-delay-ms": "10"}
    tally.sent[kind] += 1
    timeout = aiohttp.ClientTimeout(total=2.0 if headers.get("x-mock-fault") == "hang" else 30)
    try:
        async with session.post(url + path, json=data, headers=headers,
                                timeout=timeout) as resp:
            tally.statuses[resp.status] += 1
            tally.refused_valid += resp.status == 429 and kind not in ("badkey", "fault")
            if kind == "disconnect":
                await resp.content.readany()
                resp.close()  # leave mid-stream: the connection is dropped
                return
            if kind == "slow":
                async for _ in resp.content.iter_chunked(64):
                    await asyncio.sleep(0.02)  # a reader slower than the stream
                return
            await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.errors[type(exc).__name__] += 1


async def traffic(url: str, key: str, seconds: float, concurrency: int, pid: int,
                  warmup: float, sample_s: float, seed: int
                  ) -> tuple[Tally, list[tuple[float, float]]]:
    tally, samples = Tally(), []
    end = time.monotonic() + seconds
    t0 = time.monotonic()

    async def worker(i: int) -> None:
        rnd = random.Random(seed * 1000 + i)
        connector = aiohttp.TCPConnector(limit=4, force_close=rnd.random() < 0.3)
        attacker = aiohttp.TCPConnector(limit=1, local_addr=(BAD_ADDRESS, 0))
        async with aiohttp.ClientSession(connector=connector) as good, \
                aiohttp.ClientSession(connector=attacker) as bad:
            while time.monotonic() < end:
                await one((good, bad), url, key, rnd, tally)

    async def sampler() -> None:
        while time.monotonic() < end:
            await asyncio.sleep(sample_s)
            at = time.monotonic() - t0
            if at >= warmup:
                samples.append((at, rss_mib(pid)))

    await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
    return tally, samples


def books(db: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows, cost = con.execute("SELECT count(*), coalesce(sum(cost_nano), 0) FROM usage"
                                 ).fetchone()
        credited, charged, balance = con.execute(
            "SELECT sum(credited_nano), sum(charged_nano), sum(balance_nano) FROM accounts"
        ).fetchone()
        credits = con.execute("SELECT coalesce(sum(amount_nano), 0) FROM credits").fetchone()[0]
    finally:
        con.close()
    return {"usage_rows": rows, "sum_cost_nano": cost, "credited_nano": credited,
            "credits_table_nano": credits, "charged_nano": charged, "balance_nano": balance}


def mock_requests(upstream: str) -> int:
    with contextlib.closing(__import__("urllib.request").request.urlopen(
            upstream.removesuffix("/v1") + "/_mock/stats", timeout=10)) as resp:
        return int(json.loads(resp.read())["requests"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, help="duration in seconds (overrides --minutes)")
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--warmup", type=float, help="seconds before RSS sampling (default: "
                    "20%% of the run, at least 5 s)")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--max-slope", type=float, default=1.0, help="MiB/min of RSS growth")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    warmup = args.warmup if args.warmup is not None else max(5.0, seconds * 0.2)
    tmp = Path(tempfile.mkdtemp(prefix="flint-soak-"))
    os.environ["PYTHONUNBUFFERED"] = "1"  # the children's log lines, as they happen
    mock, found = start([sys.executable, "-m", "flintproxy", "mock-upstream", "--port", "0",
                         "--chunks", "8"], tmp / "mock.log",
                        re.compile(r"listening on (http://\S+)"), 1)
    upstream = found[0][0]
    gw = None
    try:
        config = tmp / "flintproxy.toml"
        db = tmp / "data" / "flintproxy.db"
        db.parent.mkdir()
        config.write_text(CONFIG.format(db=db, upstream=upstream))
        admin(config, "create-account", "soak@example.com")
        admin(config, "credit", "soak@example.com", "1000000.00")
        key = admin(config, "create-key", "soak@example.com").strip().splitlines()[-1]
        gw, planes = start([sys.executable, "-m", "flintproxy", "serve", "--config",
                            str(config)], tmp / "gateway.log", _LISTEN, 2)
        url = dict(planes)["data"]
        rss0 = rss_mib(gw.pid)
        tally, samples = asyncio.run(traffic(url, key, seconds, args.concurrency, gw.pid,
                                             warmup, args.sample_s, args.seed))
        time.sleep(3.0)  # in-flight hangs end, the usage writer flushes
        reached = mock_requests(upstream)
        ledger = books(db)
        alive = gw.poll() is None
    finally:
        code = stop(gw) if gw is not None else None
        stop(mock)
    slope = slope_per_min(samples)
    log = (tmp / "gateway.log").read_text(errors="replace")
    checks = {
        "gateway alive at the end": alive,
        "gateway exited 0 on SIGTERM": code == 0,
        "upstream requests == usage rows": reached == ledger["usage_rows"],
        "sum of charges == credited - balance": ledger["sum_cost_nano"]
        == ledger["credited_nano"] - ledger["balance_nano"] == ledger["charged_nano"],
        "credits table == credited": ledger["credits_table_nano"] == ledger["credited_nano"],
        f"RSS slope < {args.max_slope} MiB/min": slope < args.max_slope,
        "no traceback in the log": "Traceback" not in log,
        "no 5xx but upstream failures (502, 504)": all(
            s < 500 or s in (502, 504) for s in tally.statuses),
        "valid keys never refused with 429": tally.refused_valid == 0,
        # Faults that never reach the mock would make every check above pass vacuously.
        "upstream faults took effect (502s seen)": not tally.sent.get("fault")
        or tally.statuses.get(502, 0) > 0,
    }
    summary = {
        "seconds": seconds, "concurrency": args.concurrency,
        "requests_sent": sum(tally.sent.values()), "by_kind": dict(tally.sent),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "client_errors": dict(tally.errors), "refused_valid": tally.refused_valid,
        "upstream_requests": reached, **ledger,
        "rss_start_mib": round(rss0, 1),
        "rss_first_mib": round(samples[0][1], 1) if samples else None,
        "rss_last_mib": round(samples[-1][1], 1) if samples else None,
        "rss_max_mib": round(max(v for _, v in samples), 1) if samples else None,
        "rss_samples": len(samples), "rss_slope_mib_per_min": round(slope, 3),
        "checks": checks, "ok": all(checks.values()), "dir": str(tmp),
    }
    print(json.dumps(summary), flush=True)
    if not summary["ok"] or args.keep:
        print(f"logs kept in {tmp}", file=sys.stderr)
    else:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
