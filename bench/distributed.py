"""Scenario (e) of ``make bench``: the shared mode against the embedded mode, one run.

Rows, each against the embedded gateway of the same run (bench/run.py's
``flintproxy`` target: SQLite + in-memory limits, on CPU 0):

    shared     one node in the shared mode: Redis limits ([cluster] redis_url) and,
               when this build has the PostgreSQL store, PostgreSQL for accounts,
               balances and the ledger; on CPU 0 like the embedded one
    workers    the shared mode under ``serve --workers 1`` and ``--workers 2`` (the
               workers may use both cores; the load generator and upstream share core 1)

Figures: CPU per request (gateway CPU-seconds / requests at saturation), requests/s,
p50 latency at a moderate fixed rate (interleaved rounds, median), and the shared
engines' round trips per request, counted by the engines themselves: Redis ``INFO
commandstats`` (client commands only: a script's own redis.call()s are not round
trips) and PostgreSQL ``pg_stat_statements`` (every statement a client sent).

The engines are throwaway instances on loopback (tests/engines.py's classes). Redis
runs on the gateway's core: on two cores the other one is saturated by the load
generator and the upstream, and Redis waiting there for a scheduler slice measured
the scheduler (p50 +2-7 ms), not the gateway; Redis's own CPU is not counted as the
gateway's, but at saturation it takes the gateway's core (requests/s shows that).
The gateway's own count of round trips (batches: concurrent admissions share one)
is read from its /metrics beside the engines' counts of commands.
Set BENCH_SCENARIOS to include "e" (the default does).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import procs
import redis
from targets import GW_CPU, UP_CPU, Target

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.engines import PostgresServer, RedisServer

# Commands Lua scripts run inside one EVALSHA: not round trips of their own.
SCRIPT_INTERNAL = {"time", "hmget", "hset", "hget", "pexpire", "zremrangebyscore", "zcard",
                   "zadd", "zrem", "info"}


def redis_round_trips(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(v["calls"]) for k, v in stats.items()
               if k.removeprefix("cmdstat_").split("|")[0] not in SCRIPT_INTERNAL)


def pg_round_trips(pg: PostgresServer, db: str) -> int:
    out = pg.psql(db, "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE "
                      "query NOT ILIKE '%pg_stat_statements%'", check=False)
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


class Distributed:
    def __init__(self, bench: Any) -> None:
        self.b = bench
        self.redis: RedisServer | None = None
        self.pg: PostgresServer | None = None
        self.pg_db = ""
        self.redis_url = ""
        self.key: str | None = None
        self.consoles: dict[str, int] = {}

    def say(self, msg: str) -> None:
        self.b.say(msg)

    def config(self, name: str, port: int, console: int, pg: bool = True) -> Path:
        b = self.b
        text = b.gw_config.read_text()
        text = text.replace(f"port = {b.gw_port}\n", f"port = {port}\n")
        text = text.replace(f"port = {b.gw_console_port}\n", f"port = {console}\n")
        if self.pg is not None and pg:
            text = re.sub(r'(?m)^path = ".*"$',
                          f'backend = "postgresql"\ndsn = "{self.pg.dsn(self.pg_db)}"', text,
                          count=1)
        text += f'\n[cluster]\nredis_url = "{self.redis_url}"\n'
        path = b.work / f"{name}.toml"
        path.write_text(text)
        return path

    def start(self, name: str, workers: int | None, cpus: str, pg: bool = True) -> Target:

        b = self.b
        port, console = procs.free_port(), procs.free_port()
        cfg = self.config(name, port, console, pg)
        self.consoles[name] = console
        key = self.b.targets["flintproxy"].key
        if pg and self.pg is not None:
            if self.key is None:
                self.key = self.provision(cfg)
            key = self.key
        cmd = [*b.flint_cmd(), "serve", "--config", str(cfg)]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        child = procs.start(name, cmd, b.work, cpus)
        procs.wait_http(f"http://127.0.0.1:{port}/healthz", child=child, timeout=60)
        time.sleep(0.5 if workers is None else 2.0)  # every worker listening
        base = b.targets["flintproxy"]
        return Target(name, name, f"http://127.0.0.1:{port}", base.json_path, base.sse_path,
                      base.slow_path, key=key, child=child)

    def provision(self, cfg: Path) -> str:
        if self.pg is None:  # the embedded store file is shared: the bench's key works
            key = self.b.targets["flintproxy"].key
            assert key is not None
            return key
        admin = [*self.b.flint_cmd(), "admin", "--config", str(cfg)]
        for step in (["migrate"], ["create-account", "bench@example.com"],
                     ["credit", "bench@example.com", "1000000.00"],
                     ["create-key", "bench@example.com", "--name", "bench"]):
            out = procs.run([*admin, *step], timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"admin {step[0]} failed: {out.stderr[-500:]}")
        return out.stdout.strip().splitlines()[-1]

    def own_round_trips(self, t: Target) -> float:
        console = self.consoles.get(t.name)
        if console is None:
            return 0.0
        status, body = procs.http("GET", f"http://127.0.0.1:{console}/metrics")
        found = re.search(rb"^flintproxy_redis_round_trips_total (\S+)$", body, re.M)
        return float(found.group(1)) if status == 200 and found else 0.0

    def counted(self, t: Target, fn: Any) -> dict[str, Any]:
        o0 = self.own_round_trips(t)
        r0 = redis_round_trips(self.redis_url)
        p0 = pg_round_trips(self.pg, self.pg_db) if self.pg else 0
        res: dict[str, Any] = fn()
        time.sleep(0.3)  # the batched releases and usage rows land
        n = res.get("requests") or 1
        res["redis_rt_per_req"] = (redis_round_trips(self.redis_url) - r0) / n
        res["gateway_redis_rt_per_req"] = (self.own_round_trips(t) - o0) / n
        if self.pg is not None:
            res["pg_rt_per_req"] = (pg_round_trips(self.pg, self.pg_db) - p0) / n
        return res

    def run(self) -> dict[str, Any]:

        b, p = self.b, self.b.plan
        out: dict[str, Any] = {"pg_store": True}
        self.redis = RedisServer.start()
        procs.run(["taskset", "-pc", GW_CPU, str(self.redis.proc.pid)], timeout=10)
        self.redis_url = self.redis.url(1)
        try:
            self.pg = PostgresServer.start()
            # Off the gateway's core: its work (the usage batches, lease renewals)
            # is not on a request's path. Backends inherit the postmaster's CPUs.
            for pid in (self.pg.proc.pid, *procs.descendants(self.pg.proc.pid)):
                procs.run(["taskset", "-apc", UP_CPU, str(pid)], timeout=10)
            self.pg_db = self.pg.new_database("bench").rsplit("/", 1)[1]
            self.pg.psql(self.pg_db, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            shared = self.start("flintproxy-shared", None, GW_CPU)
            embedded = b.targets["flintproxy"]
            rows = {"embedded": embedded, "shared": shared}
            if self.pg is not None:  # Redis alone (the embedded store): the limits' part
                rows["redis-only"] = self.start("flintproxy-redis-only", None, GW_CPU,
                                                pg=False)

            def sat(name: str) -> dict[str, Any]:
                t = rows[name]
                b.drive(t, "json", p.warm_s, p.conns)
                r = self.counted(t, lambda: b.measured(t, "json", p.sat_s, p.conns))
                self.say(f"  (e) saturation  {name:<9} {r['rps']:>9,.0f} req/s  CPU "
                         f"{r['cpu_ms_per_req']:.4f} ms/req  redis commands/req "
                         f"{r['redis_rt_per_req']:.3f}, round trips/req "
                         f"{r['gateway_redis_rt_per_req']:.3f}"
                         + (f"  pg rt/req {r['pg_rt_per_req']:.4f}" if self.pg else ""))
                return r

            def moderate(name: str) -> dict[str, Any]:
                t = rows[name]
                r = self.counted(t, lambda: b.measured(t, "json", p.moderate_s,
                                                       p.moderate_pool, p.moderate_rate))
                self.say(f"  (e) moderate    {name:<9} p50 {r['p50_ms']:.3f} ms  p99 "
                         f"{r['p99_ms']:.3f} ms")
                return r

            s = b.interleaved(list(rows), p.rounds, sat, lambda r: r["cpu_ms_per_req"] or 0)
            m = b.interleaved(list(rows), p.rounds, moderate, lambda r: r["p50_ms"])
            out["saturation"], out["moderate"] = s, m
            cpu_ratio = s["shared"]["cpu_ms_per_req"] / s["embedded"]["cpu_ms_per_req"]
            out["cpu_ratio"] = cpu_ratio
            out["added_p50_ms"] = m["shared"]["p50_ms"] - m["embedded"]["p50_ms"]
            for name in ("shared", "redis-only"):
                child = rows[name].child if name in rows else None
                if child is not None:
                    child.stop(30)
            if "redis-only" in s:
                out["redis_only_cpu_ratio"] = (s["redis-only"]["cpu_ms_per_req"]
                                               / s["embedded"]["cpu_ms_per_req"])
            if self.pg is not None:
                out["workers"] = self.workers()
            else:
                b.note("--workers 2 needs the PostgreSQL store: no workers row")
        finally:
            if self.pg is not None:
                self.pg.stop()
            self.redis.stop()
        self.report(out)
        return out

    def workers(self) -> dict[str, Any]:
        b, p = self.b, self.b.plan
        res = {}
        for n in (1, 2):
            t = self.start(f"flintproxy-workers{n}", n, "0,1")
            b.drive(t, "json", p.warm_s, p.conns)
            r = self.counted(t, lambda t=t: b.measured(t, "json", p.sat_s, p.conns))
            self.say(f"  (e) --workers {n}  {r['rps']:>9,.0f} req/s  CPU "
                     f"{r['cpu_ms_per_req']:.4f} ms/req  cores {r['core_busy_pct']}")
            res[str(n)] = r
            if t.child is not None:
                t.child.stop(30)
        res["rps_ratio"] = res["2"]["rps"] / res["1"]["rps"] if res["1"]["rps"] else None
        return res

    def report(self, out: dict[str, Any]) -> None:
        s = out["saturation"]
        self.say(f"  (e) shared / embedded: CPU per request {out['cpu_ratio']:.2f}x (target "
                 f"<= 1.3x); requests/s {s['shared']['rps'] / s['embedded']['rps']:.2f}x; "
                 f"added p50 {out['added_p50_ms']:+.3f} ms (target <= 0.3 ms); Redis round "
                 f"trips/request {s['shared']['redis_rt_per_req']:.3f} (target <= 1)"
                 + (f"; PostgreSQL round trips/request {s['shared']['pg_rt_per_req']:.4f} "
                    "(target <= 0.1)" if "pg_rt_per_req" in s["shared"] else ""))
        if "redis_only_cpu_ratio" in out:
            self.say(f"  (e) Redis limits alone (embedded store) / embedded: CPU per request "
                     f"{out['redis_only_cpu_ratio']:.2f}x")
        w = out.get("workers")
        if w:
            self.say(f"  (e) --workers 2 / --workers 1: requests/s {w['rps_ratio']:.2f}x")


def scenario(bench: Any) -> None:
    try:
        bench.data["scenarios"]["distributed"] = Distributed(bench).run()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        bench.note(f"(e) distributed row failed: {exc}")
