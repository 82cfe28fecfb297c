"""``make bench``: flintproxy side by side with direct and nginx, in one run on loopback.

    .venv/bin/python bench/run.py            # full run, about 6 minutes on 2 cores
    BENCH_QUICK=1 .venv/bin/python bench/run.py   # about 1 minute, shorter runs, no 5,000

Rows: ``direct`` (load generator -> upstream), ``nginx`` (a plain reverse proxy,
proxy_buffering off, upstream keep-alive; when nginx is installed), ``flintproxy``
as shipped (auth, limits, billing, usage writer, metrics; a funded account and key
created for the run) and, with BENCH_LITELLM=1 and LiteLLM installed, ``litellm``
(LiteLLM proxy, no DB, one worker).

Upstreams: canned OpenAI responses (JSON, and SSE with 20 chunks plus a usage
chunk) from nginx when installed, else from bench/canned.py; slow streams from
``flintproxy mock-upstream`` with delays. CPU placement: the gateway under test
(flintproxy, nginx proxy, LiteLLM) on CPU 0 alone; the load generator (wrk, or the
asyncio client bench/loadgen.py for TTFB and slow streams), the upstreams and this
script on CPU 1.

Scenarios: (a) non-streaming: requests/s at saturation (wrk), latency at a
moderate fixed rate (the asyncio client, open loop, requests evenly spaced); (b)
streaming 20-chunk responses: requests/s (wrk) and TTFB at a fixed rate (asyncio
client); (c) 1,000 and 5,000 concurrent slow streams (arriving at 500/s, offering
10,000 events/s in all: 1,000 x 64 chunks 100 ms apart, 5,000 x 28 chunks 500 ms
apart): TTFB, errors, and the gateway's RSS per concurrent stream; (d) gateway
CPU-seconds per 1,000 requests; (e) flintproxy's CPU per streamed request of each API
(chat, Responses and Messages relayed natively, Messages translated to chat), against
one mock upstream, as ratios to chat's; (f) the shared mode (one node on PostgreSQL +
Redis) against the embedded mode: CPU per request, added p50, the engines' round trips
per request, and ``--workers 2`` against 1 (bench/distributed.py). The moderate-rate
latency and the 1,000 streams run in BENCH_ROUNDS interleaved rounds (3; 1 when quick)
and keep each row's median.

Output: a table on stdout (every figure beside the direct baseline as a ratio),
bench/results/bench-<time>.json and report-<time>.html (and latest.json /
latest.html). Environment knobs: BENCH_QUICK, BENCH_ROUNDS, BENCH_LITELLM,
BENCH_SECONDS, BENCH_CONNS, BENCH_SLOW (e.g. "1000,5000"), BENCH_SLOW_CHUNKS,
BENCH_SLOW_DELAY_MS, BENCH_SLOW_RATE, BENCH_SLOW_ARRIVAL, BENCH_TTFB_RATE,
BENCH_MODERATE_RATE, BENCH_SCENARIOS (e.g. "ab"), BENCH_KEEP (keep the work dir's
database), BENCH_IDLE_WAIT, BENCH_LITELLM_BIN,
BENCH_GATEWAY_TOML (TOML appended to the gateway's config, for what-if runs, e.g.
'[metrics]\naccess_log = false'; only tables the bench does not write itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import distributed
import nginxconf
import procs
import report
import wrk
from targets import GW_CPU, LOAD_CPU, PROMPT, UP_CPU, Target

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PY = sys.executable
# A run during which other processes used more of the machine than this is repeated once.
NOISE_RETRY_PCT = 10.0
# At most this many seconds per run are spent repeating noisy runs (half when quick).
RETRY_BUDGET_S = 60.0
# A direct slow-stream TTFB p99 above this (and 10x its p50) is a stalled baseline.
BASELINE_P99_MS = 100.0
EMAIL = "bench@example.com"
# The targets, all judged on the same run.
GOALS = {
    "nonstream_vs_nginx": 0.12,
    "stream_vs_nginx": 0.15,
    "cpu_ms_per_req": 0.12,
    "rss_kib_per_stream": 30.0,
    "added_p50_ms": 0.3,
    "ttfb_p99_ratio_1000": 1.3,
    "direct_vs_gateway": 5.0,
}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def env_num(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


@dataclass
class Plan:
    quick: bool
    warm_s: float
    sat_s: float
    conns: int
    moderate_s: float
    moderate_rate: float  # requests/s, evenly spaced (open loop)
    moderate_pool: int  # keep-alive connections the client spreads them over
    ttfb_rate: float
    ttfb_s: float
    slow_counts: list[int]
    slow_chunks: int  # 0: derived from slow_rate (see slow_spec)
    slow_delay_ms: float  # 0: derived from slow_rate
    slow_rate: float  # events/s all slow streams offer together
    slow_arrival: float  # new slow streams per second while ramping up
    rounds: int  # interleaved rounds of the latency scenarios; the median is kept
    litellm: bool
    scenarios: str  # which of a, b, c, e to run ((d) comes from a and b)

    @classmethod
    def from_env(cls) -> Plan:
        quick = env_flag("BENCH_QUICK")
        slow = os.environ.get("BENCH_SLOW", "1000" if quick else "1000,5000")
        return cls(
            quick=quick,
            warm_s=1.0 if quick else 2.0,
            sat_s=env_num("BENCH_SECONDS", 3.0 if quick else 8.0),
            conns=int(env_num("BENCH_CONNS", 50)),
            moderate_s=2.0 if quick else 6.0,
            moderate_rate=env_num("BENCH_MODERATE_RATE", 500.0),
            moderate_pool=10,
            ttfb_rate=env_num("BENCH_TTFB_RATE", 200.0),
            ttfb_s=2.0 if quick else 5.0,
            slow_counts=[int(x) for x in slow.split(",") if x.strip()],
            slow_chunks=int(env_num("BENCH_SLOW_CHUNKS", 0)),
            slow_delay_ms=env_num("BENCH_SLOW_DELAY_MS", 0),
            slow_rate=env_num("BENCH_SLOW_RATE", 10_000),
            slow_arrival=env_num("BENCH_SLOW_ARRIVAL", 500),
            rounds=max(1, int(env_num("BENCH_ROUNDS", 1 if quick else 3))),
            litellm=env_flag("BENCH_LITELLM"),
            scenarios=os.environ.get("BENCH_SCENARIOS", "abce").lower(),
        )

    def slow_spec(self, n: int) -> tuple[int, float]:
        """(chunks, ms between chunks) for n concurrent slow streams.

        By default the n streams together offer ``slow_rate`` events/s (10,000: 1,000
        streams 100 ms apart, 5,000 streams 500 ms apart), so the direct baseline (the
        Python mock and client sharing one core) is not itself the bottleneck; and each
        stream outlasts the ramp by 4 s or more (at least 6.4 s; 4.4 s when quick), so all
        n overlap.
        """
        delay = self.slow_delay_ms or max(20.0, 1000.0 * n / self.slow_rate)
        duration_ms = max(4400.0 if self.quick else 6400.0, 1000 * (self.ramp_s(n) + 4))
        chunks = self.slow_chunks or max(8, round(duration_ms / delay))
        return chunks, delay

    def ramp_s(self, n: int) -> float:
        """Streams start evenly over this many seconds (``slow_arrival`` new streams/s)."""
        return max(0.5, n / self.slow_arrival)


def litellm_version(exe: str) -> str:
    """The version of the LiteLLM installed beside ``exe`` (its script's interpreter)."""
    try:
        first = Path(exe).read_text(errors="replace").split("\n", 1)[0]
        python = first[2:].strip() if first.startswith("#!") else PY
        out = subprocess.run([python, "-c", "import importlib.metadata as m; "
                              "print(m.version('litellm'))"], capture_output=True, text=True,
                             timeout=30, check=False)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def core_times() -> dict[str, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            total = sum(v[:8])
            out[name] = (total - v[3] - v[4], total)
    return out


def core_busy(before: dict[str, tuple[int, int]],
              after: dict[str, tuple[int, int]]) -> dict[str, float]:
    busy = {}
    for name, (b1, t1) in after.items():
        b0, t0 = before.get(name, (0, 0))
        busy[name] = round(100.0 * (b1 - b0) / max(1, t1 - t0), 1)
    return busy


def machine_busy_s() -> float:
    """CPU-seconds every core spent in user/nice/system since boot (no idle, no irq)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:4]]
    return sum(v) / procs.CLK_TCK


def our_cpu_s() -> float:
    """CPU-seconds of this script, its reaped children (wrk, loadgen) and live children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
            + procs.cpu_seconds(procs.all_pids()))


class Noise:
    """CPU used on the machine by processes that are not the bench's, over a window."""

    def __init__(self) -> None:
        self.t0, self.m0, self.o0 = time.monotonic(), machine_busy_s(), our_cpu_s()

    def pct(self) -> float:
        wall = time.monotonic() - self.t0
        foreign = (machine_busy_s() - self.m0) - (our_cpu_s() - self.o0)
        return max(0.0, 100.0 * foreign / (wall * (os.cpu_count() or 1))) if wall else 0.0


def wait_idle(max_s: float, threshold_pct: float = 5.0) -> float:
    """Wait (up to max_s) for 1 s in which the machine is nearly idle; returns the last busy %."""
    deadline = time.monotonic() + max_s
    while True:
        n = Noise()
        time.sleep(1.0)
        busy = n.pct()
        if busy < threshold_pct or time.monotonic() >= deadline:
            return busy


def suspect(res: dict[str, Any]) -> str:
    """Why a run's figures may not be the gateway's own ("" when they are)."""
    if res.get("noise_pct", 0) > NOISE_RETRY_PCT:
        return f"other processes used {res['noise_pct']:.0f}% of the machine"
    if res.get("unsaturated"):
        return (f"the gateway's core was only {100 * res['gateway_core_util']:.0f}% busy at "
                "saturation: something else limited it")
    return ""


class Bench:
    def __init__(self, plan: Plan, with_proxies: bool = True) -> None:
        self.plan = plan
        self.with_proxies = with_proxies  # False: no nginx proxy, no LiteLLM (profiling)
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.work = RESULTS / "work"
        self.notes: list[str] = []
        self.noisy: list[str] = []
        self.retry_s = 0.0  # time spent repeating noisy runs
        self.targets: dict[str, Target] = {}
        self.upstream: procs.Child | None = None
        self.mock: procs.Child | None = None
        self.mock_port = 0
        self.apis_port = 0  # scenario (e)'s mock upstream (chat, Responses, Messages)
        self.gw_config = self.work / "flintproxy.toml"
        self.gw_port = 0
        self.gw_console_port = 0
        self.gw_db = self.work / "flintproxy.db"
        self.auth_mode = "?"
        self.nginx_bin = procs.have("nginx")
        self.wrk_bin = procs.have("wrk")
        self.data: dict[str, Any] = {"scenarios": {}}
        self.t_start = time.monotonic()

    # -- output ---------------------------------------------------------------------
    def say(self, msg: str) -> None:
        elapsed = time.monotonic() - self.t_start
        print(f"[{elapsed:6.1f}s] {msg}", flush=True)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.say(f"NOTE: {msg}")

    # -- set-up -----------------------------------------------------------------------
    def setup(self) -> None:
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        busy = wait_idle(env_num("BENCH_IDLE_WAIT", 60))
        if busy >= 5:
            self.note(f"the machine is busy ({busy:.0f}% of its CPU used by other processes); "
                      "figures will be noisy")
        nofile = procs.raise_nofile()
        if nofile < 12_000 and max(self.plan.slow_counts, default=0) > 1000:
            self.note(f"open-file limit is {nofile}; 5,000 streams need ~12,000 "
                      "(raise it with ulimit -n)")
        if (os.cpu_count() or 1) >= 2:
            os.sched_setaffinity(0, {int(LOAD_CPU)})
        else:
            self.note("only one CPU: nothing can be pinned; figures are not comparable")
        if not self.wrk_bin:
            self.note(f"wrk not found ({wrk.INSTALL_HINT}): throughput is measured with the "
                      "bench's asyncio client instead, which is itself the bottleneck sooner")
        if not self.nginx_bin:
            self.note(f"nginx not found ({nginxconf.INSTALL_HINT}): no nginx row, and the "
                      "canned upstream is bench/canned.py (Python) instead of nginx")
        canned_port, mock_port = procs.free_port(), procs.free_port()
        # The zero-delay canned upstream.
        if self.nginx_bin:
            conf = nginxconf.canned_conf(self.work / "nginx-upstream", canned_port)
            self.upstream = procs.start("upstream-nginx", nginxconf.command(self.nginx_bin, conf),
                                        self.work, UP_CPU)
        else:
            self.upstream = procs.start("upstream-canned", [PY, str(BENCH / "canned.py"),
                                                            "--port", str(canned_port)],
                                        self.work, UP_CPU)
        procs.wait_port(canned_port, child=self.upstream)
        # The slow-stream upstream.
        self.mock_port = mock_port
        self.start_mock(self.plan.slow_spec(max(self.plan.slow_counts, default=1000)))
        up = f"http://127.0.0.1:{canned_port}"
        self.targets["direct"] = Target(
            "direct", "direct", up, "/json/v1/chat/completions", "/sse/v1/chat/completions",
            "", measured_pids=self.upstream.pids())
        self.targets["direct"].child = self.upstream
        self.direct_slow_base = f"http://127.0.0.1:{mock_port}"
        if self.nginx_bin and self.with_proxies:
            port = procs.free_port()
            conf = nginxconf.proxy_conf(self.work / "nginx-proxy", port, canned_port, mock_port)
            child = procs.start("nginx-proxy", nginxconf.command(self.nginx_bin, conf),
                                self.work, GW_CPU)
            procs.wait_port(port, child=child)
            self.targets["nginx"] = Target(
                "nginx", f"nginx {nginxconf.version(self.nginx_bin)}",
                f"http://127.0.0.1:{port}", "/json/v1/chat/completions",
                "/sse/v1/chat/completions", "/v1/chat/completions", child=child)
        self.gw_port = procs.free_port()
        self.gw_console_port = procs.free_port()  # the control plane: /metrics
        self.apis_port = procs.free_port()
        key = self.provision(canned_port, mock_port)
        child = self.start_flintproxy()
        self.targets["flintproxy"] = Target(
            "flintproxy", "flintproxy", f"http://127.0.0.1:{self.gw_port}",
            "/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions",
            key=key, child=child)
        self.check_gateway()
        if self.plan.litellm and self.with_proxies:
            self.start_litellm(canned_port, mock_port)
        self.data["ports"] = {"canned": canned_port, "mock": mock_port, "gateway": self.gw_port}

    def start_mock(self, spec: tuple[int, float]) -> None:
        """The slow-stream upstream, its defaults set to ``spec`` (chunks, delay ms).

        Requests also carry x-mock-chunks/x-mock-delay-ms, but not every gateway
        forwards them (LiteLLM does not), hence the defaults.
        """
        if self.mock is not None:
            if self.mock.extra.get("spec") == spec:
                return
            self.mock.stop()
            procs.forget(self.mock)
        self.mock = procs.start("mock-upstream", [
            *self.flint_cmd(), "mock-upstream", "--port", str(self.mock_port), "--chunks",
            str(spec[0]), "--delay-ms", f"{spec[1]:g}"], self.work, UP_CPU)
        self.mock.extra["spec"] = spec
        procs.wait_port(self.mock_port, child=self.mock)

    @staticmethod
    def flint_cmd() -> list[str]:
        exe = Path(PY).parent / "flintproxy"
        return [str(exe)] if exe.exists() else [PY, "-m", "flintproxy"]

    def write_gateway_config(self, canned_port: int, mock_port: int,
                             dev_key: str | None = None) -> None:
        server = f'dev_key = "{dev_key}"\n' if dev_key else ""
        prices = ('input_usd_per_mtok = "0.15"\noutput_usd_per_mtok = "0.60"\n'
                  'cached_input_usd_per_mtok = "0.075"\n')
        self.gw_config.write_text(f"""\
# Written by bench/run.py: every feature on, limits far above the bench's load.
[server]
host = "127.0.0.1"
port = {self.gw_port}
# The bench opens thousands of connections, all from 127.0.0.1.
max_connections = 0
max_connections_per_ip = 0
{server}
[console]
host = "127.0.0.1"
port = {self.gw_console_port}

[storage]
path = "{self.gw_db}"

[[upstreams]]
name = "canned-json"
base_url = "http://127.0.0.1:{canned_port}/json/v1"
models = ["bench-json"]

[[upstreams]]
name = "canned-sse"
base_url = "http://127.0.0.1:{canned_port}/sse/v1"
models = ["bench-sse"]

[[upstreams]]
name = "mock"
base_url = "http://127.0.0.1:{mock_port}/v1"
models = ["gpt-4o-mini"]

# Scenario (e): one mock upstream speaking chat, Responses and Messages.
[[upstreams]]
name = "apis-openai"
base_url = "http://127.0.0.1:{self.apis_port}/v1"
models = ["gpt-4o"]

[[upstreams]]
name = "apis-anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:{self.apis_port}/v1"
models = ["claude-sonnet-4-5"]

[models."gpt-4o"]
{prices}
[models."claude-sonnet-4-5"]
{prices}
[models."bench-json"]
{prices}
[models."bench-sse"]
{prices}
[models."gpt-4o-mini"]
{prices}
[limits]
default_rpm = 1000000000
default_tpm = 1000000000000
default_max_concurrent = 1000000
ip_rpm = 1000000000

[accounts]
bcrypt_cost = 4
""" + (os.environ.get("BENCH_GATEWAY_TOML", "").replace("\\n", "\n") + "\n"))

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return procs.run([*self.flint_cmd(), "admin", "--config", str(self.gw_config), *args],
                         timeout=60)

    def provision(self, canned_port: int, mock_port: int) -> str:
        """A funded account and key via ``flintproxy admin``; the dev key if that fails."""
        self.write_gateway_config(canned_port, mock_port)
        steps = [("create-account", EMAIL), ("credit", EMAIL, "1000000.00"),
                 ("create-key", EMAIL, "--name", "bench")]
        out = None
        for step in steps:
            out = self.admin(*step)
            if out.returncode != 0:
                break
        lines = out.stdout.strip().splitlines() if out is not None else []
        if out is not None and out.returncode == 0 and lines and lines[-1].startswith("sk-"):
            self.auth_mode = "account key (flintproxy admin create-key), credit 1,000,000 USD"
            return lines[-1].strip()
        err = (out.stderr or out.stdout).strip() if out is not None else "?"
        dev = "sk-bench-" + secrets.token_urlsafe(24)
        self.note(f"flintproxy admin failed ({err[-200:]}); falling back to [server] dev_key")
        self.write_gateway_config(canned_port, mock_port, dev_key=dev)
        self.auth_mode = "static dev_key (admin create-key failed)"
        return dev

    def start_flintproxy(self) -> procs.Child:
        child = procs.start("flintproxy", [*self.flint_cmd(), "serve", "--config",
                                           str(self.gw_config)], self.work, GW_CPU)
        procs.wait_http(f"http://127.0.0.1:{self.gw_port}/healthz", child=child)
        return child

    def restart_flintproxy(self) -> None:
        t = self.targets["flintproxy"]
        if t.child is not None:
            t.child.stop()
            procs.forget(t.child)
        t.child = self.start_flintproxy()

    def restart_gateway(self, name: str) -> None:
        t = self.targets[name]
        if name == "flintproxy":
            self.restart_flintproxy()
        elif name != "direct" and t.child is not None:
            t.child = procs.restart(t.child)
            procs.wait_http(t.base + ("/health/liveliness" if name == "litellm" else "/"),
                            timeout=120, child=t.child)

    def check_gateway(self) -> None:
        t = self.targets["flintproxy"]
        for kind in ("json", "sse", "slow"):
            status, body = procs.http("POST", t.url(kind), t.body(kind), {
                "Authorization": f"Bearer {t.key}", "Content-Type": "application/json",
                "x-mock-delay-ms": "0"})
            if status != 200:
                raise RuntimeError(f"flintproxy answered {status} to a {kind} request: "
                                   f"{body[:300]!r}\n{t.child.tail() if t.child else ''}")
        status, _ = procs.http("GET", f"http://127.0.0.1:{self.gw_console_port}/metrics")
        self.data["metrics_status_before"] = status
        if status != 200:
            self.note(f"GET /metrics answered {status}: the metrics endpoint is not on")

    def start_litellm(self, canned_port: int, mock_port: int) -> None:
        exe = os.environ.get("BENCH_LITELLM_BIN") or procs.have("litellm") or (
            str(Path(PY).parent / "litellm") if (Path(PY).parent / "litellm").exists() else None)
        if exe is None:
            self.note("BENCH_LITELLM=1 but LiteLLM is not installed "
                      "(pip install 'litellm[proxy]'); no litellm row")
            return
        port = procs.free_port()
        conf = self.work / "litellm.yaml"
        # Upstream model gpt-4o-mini everywhere: a model LiteLLM knows the price of.
        entries = [("bench-json", f"http://127.0.0.1:{canned_port}/json/v1"),
                   ("bench-sse", f"http://127.0.0.1:{canned_port}/sse/v1"),
                   ("gpt-4o-mini", f"http://127.0.0.1:{mock_port}/v1")]
        conf.write_text("model_list:\n" + "".join(
            f"  - model_name: {m}\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
            f"      api_base: {b}\n      api_key: sk-none\n" for m, b in entries)
            + "litellm_settings:\n  telemetry: false\n  drop_params: true\n")
        master = "sk-" + secrets.token_hex(32)  # its one key: LiteLLM refuses to start without
        child = procs.start("litellm", [exe, "--config", str(conf), "--host", "127.0.0.1",
                                        "--port", str(port), "--num_workers", "1"],
                            self.work, GW_CPU,
                            env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                                 "DISABLE_SCHEMA_UPDATE": "True", "LITELLM_MASTER_KEY": master})
        try:
            procs.wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=120,
                            child=child)
        except RuntimeError as exc:
            self.note(f"LiteLLM did not start; no litellm row (...{str(exc)[-400:]})")
            child.stop()
            return
        self.targets["litellm"] = Target(
            "litellm", f"LiteLLM proxy {litellm_version(exe)}", f"http://127.0.0.1:{port}",
            "/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions",
            key=master, child=child)
        status, body = procs.http("POST", self.targets["litellm"].url("json"),
                                  self.targets["litellm"].body("json"),
                                  {"Authorization": f"Bearer {master}",
                                   "Content-Type": "application/json"}, timeout=30)
        if status != 200:
            self.note(f"LiteLLM answered {status} ({body[:200]!r}); no litellm row")
            child.stop()
            del self.targets["litellm"]

    # -- measurement primitives ---------------------------------------------------------
    def slow_url(self, t: Target) -> str:
        return self.direct_slow_base + "/v1/chat/completions" if t.name == "direct" \
            else t.url("slow")

    def loadgen(self, mode: str, url: str, body: bytes, key: str | None, *args: str,
                timeout: float = 300.0) -> dict[str, Any]:
        cmd = procs.pinned([PY, str(BENCH / "loadgen.py"), mode, url, "--body", body.decode(),
                            *(["--key", key] if key else []), *args], LOAD_CPU)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if out.returncode != 0 or not out.stdout.strip():
            raise RuntimeError(f"loadgen {mode} failed: {out.stderr[-2000:]}")
        res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return res

    def drive(self, t: Target, kind: str, seconds: float, conns: int,
              rate: float = 0.0) -> dict[str, Any]:
        """One load run against ``t``: closed loop at saturation (wrk, or the asyncio
        client without wrk), or open loop at ``rate`` requests/s over ``conns``
        connections (the asyncio client: wrk has no fixed rate, and its per-connection
        think time lets the connections fall into step, so requests came in bursts of
        up to ``conns`` within tens of microseconds and queued behind one another)."""
        url, body = t.url(kind), t.body(kind)
        if rate:
            res = self.loadgen("rate", url, body, t.key, "--rate", f"{rate:g}", "--duration",
                               f"{seconds:g}", "--pool", str(conns),
                               *(["--stream"] if kind != "json" else []))
            lat = res["latency_ms"]
            return {"tool": "asyncio client", "requests": res["ok"], "rps": res["rate"],
                    "error_count": res["error_count"], "errors": res["errors"],
                    "p50_ms": lat.get("p50", 0.0), "p99_ms": lat.get("p99", 0.0),
                    "p90_ms": lat.get("p90", 0.0), "p999_ms": lat.get("p999", 0.0),
                    "latency_samples_ms": res["latency_samples_ms"],
                    "schedule_lag_ms": res["schedule_lag_ms"]}
        if self.wrk_bin:
            lua = wrk.script(self.work / f"{t.name}-{kind}.lua", body, t.key)
            return wrk.run(self.wrk_bin, url, lua, conns=conns, seconds=seconds, cpus=LOAD_CPU)
        return self.loadgen("closed", url, body, t.key, "--conns", str(conns), "--duration",
                            f"{seconds:g}", *(["--stream"] if kind != "json" else []))

    def measured(self, t: Target, kind: str, seconds: float, conns: int,
                 rate: float = 0.0) -> dict[str, Any]:
        """``drive`` with the gateway's and the upstream's CPU and the cores' load around it."""
        assert self.upstream is not None
        pids = t.pids()
        up_pids = self.upstream.pids() if kind != "slow" else []
        noise = Noise()
        c0, u0, k0, w0 = (procs.cpu_seconds(pids), procs.cpu_seconds(up_pids), core_times(),
                          time.monotonic())
        res = self.drive(t, kind, seconds, conns, rate)
        res["noise_pct"] = round(noise.pct(), 1)
        wall = time.monotonic() - w0
        cpu = procs.cpu_seconds(pids) - c0
        res["wall_s"] = wall
        res["gateway_cpu_s"] = cpu
        res["gateway_core_util"] = cpu / wall if wall else 0.0
        res["upstream_core_util"] = (procs.cpu_seconds(up_pids) - u0) / wall if wall else 0.0
        res["cpu_ms_per_req"] = cpu * 1000 / res["requests"] if res["requests"] else None
        res["core_busy_pct"] = core_busy(k0, core_times())
        res["rss_kib"] = procs.rss_kib(pids)
        return res

    # -- scenarios -----------------------------------------------------------------------
    def quiet(self, label: str, fn: Any, retry: bool = True) -> dict[str, Any]:
        """Run ``fn()``; if other processes took > NOISE_RETRY_PCT of the machine meanwhile,
        wait for quiet and run it once more, keeping the quieter result."""
        res: dict[str, Any] = fn()
        budget = RETRY_BUDGET_S * (0.5 if self.plan.quick else 1.0)
        if suspect(res) and retry and self.retry_s < budget:
            t0 = time.monotonic()
            self.say(f"  ({label}: {suspect(res)}; waiting for quiet and measuring again)")
            wait_idle(min(30.0, budget - self.retry_s))
            again: dict[str, Any] = fn()
            if (not suspect(again) or again.get("noise_pct", 0) < res.get("noise_pct", 0)
                    or again.get("rps", 0) > res.get("rps", 0) > 0):
                res = again
            self.retry_s += time.monotonic() - t0
        if suspect(res):
            self.noisy.append(f"{label} ({suspect(res)})")
        return res

    def scenario_throughput(self, kind: str) -> None:
        p = self.plan
        key = "nonstream_sat" if kind == "json" else "stream_sat"
        out = self.data["scenarios"].setdefault(key, {})
        for t in self.targets.values():
            def once(t: Target = t) -> dict[str, Any]:
                self.drive(t, kind, p.warm_s, p.conns)  # warm-up, not recorded
                r = self.measured(t, kind, p.sat_s, p.conns)
                r["unsaturated"] = t.name != "direct" and r["gateway_core_util"] < 0.85
                return r

            r = out[t.name] = self.quiet(f"{key} {t.name}", once)
            self.say(f"  {key:<15} {t.name:<11} {r['rps']:>9,.0f} req/s  p50 {r['p50_ms']:.2f} "
                     f"ms  p99 {r['p99_ms']:.2f} ms  errors {r['error_count']}  gateway core "
                     f"{100 * r['gateway_core_util']:.0f}%  cores {r['core_busy_pct']}  "
                     f"noise {r['noise_pct']:.0f}%")

    def interleaved(self, names: list[str], rounds: int, run: Any, key: Any
                    ) -> dict[str, dict[str, Any]]:
        """``run(name)`` for every name, ``rounds`` times over, round after round; per
        name, the result whose ``key`` is the median (the others' keys in "rounds").

        One run of a latency figure moves by a third or more on a shared VM, and not
        for every row at once: interleaved rounds let the rows see the same moments.
        """
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for _ in range(rounds):
            for name in names:
                runs[name].append(run(name))
        picked = {}
        for name, rs in runs.items():
            rs.sort(key=key)
            picked[name] = rs[len(rs) // 2]
            picked[name]["rounds"] = [key(r) for r in rs]
        return picked

    def scenario_moderate(self) -> None:
        p = self.plan

        def run(name: str) -> dict[str, Any]:
            t = self.targets[name]
            r = self.quiet(f"moderate {name}", lambda: self.measured(
                t, "json", p.moderate_s, p.moderate_pool, p.moderate_rate))
            self.say(f"  moderate        {name:<11} {r['rps']:>9,.0f} req/s  p50 "
                     f"{r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  errors {r['error_count']}"
                     f"  noise {r['noise_pct']:.0f}%")
            return r

        out = self.interleaved(list(self.targets), p.rounds, run, lambda r: r["p50_ms"])
        self.data["scenarios"]["nonstream_moderate"] = out
        if p.rounds > 1:
            self.say("  moderate p50, median of rounds: " + ", ".join(
                f"{n} {r['p50_ms']:.3f} ms" for n, r in out.items()))

    def scenario_ttfb(self) -> None:
        p = self.plan
        out = self.data["scenarios"].setdefault("stream_ttfb", {})
        for t in self.targets.values():
            def once(t: Target = t) -> dict[str, Any]:
                noise = Noise()
                r = self.loadgen("rate", t.url("sse"), t.body("sse"), t.key, "--stream",
                                 "--rate", f"{p.ttfb_rate:g}", "--duration", f"{p.ttfb_s:g}")
                r["noise_pct"] = round(noise.pct(), 1)
                return r

            r = out[t.name] = self.quiet(f"stream TTFB {t.name}", once)
            q = r["ttfb_ms"]
            self.say(f"  stream TTFB     {t.name:<11} {r['rate']:>9,.0f} req/s  p50 "
                     f"{q.get('p50', 0):.3f} ms  p99 {q.get('p99', 0):.3f} ms  "
                     f"errors {r['error_count']}  noise {r['noise_pct']:.0f}%")

    def scenario_slow(self, n: int) -> None:
        p = self.plan
        chunks, delay_ms = p.slow_spec(n)
        self.start_mock((chunks, delay_ms))
        mock_headers = ["--header", f"x-mock-chunks: {chunks}",
                        "--header", f"x-mock-delay-ms: {delay_ms:g}"]
        names = list(self.targets)
        if "litellm" in names and n > 1000:
            names.remove("litellm")
            self.note(f"litellm: {n} slow streams skipped (it admits too few streams/s "
                      "to open them in reasonable time)")

        def run(name: str) -> dict[str, Any]:
            def once() -> dict[str, Any]:
                self.restart_gateway(name)  # a fresh process: its RSS growth is the streams'
                t = self.targets[name]
                # Warm the gateway's pools and the key cache, then take the baseline.
                self.loadgen("rate", self.slow_url(t), t.body("slow"), t.key, "--stream",
                             "--rate", "50", "--duration", "0.5", "--pool", "4",
                             "--header", "x-mock-delay-ms: 0")
                time.sleep(0.3)
                pids = t.pids() if name != "direct" else []
                base_rss = procs.rss_kib(pids)
                noise = Noise()
                c0, k0, tcp0 = procs.cpu_seconds(pids), core_times(), procs.tcp_counters()
                cmd = procs.pinned([PY, str(BENCH / "loadgen.py"), "slow", self.slow_url(t),
                                    "--body", t.body("slow").decode(),
                                    *(["--key", t.key] if t.key else []), *mock_headers,
                                    "--streams", str(n), "--ramp", f"{p.ramp_s(n):g}",
                                    "--timeout", "120"], LOAD_CPU)
                with procs.Sampler(pids, 0.05) as sampler:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                                          check=False)
                if proc.returncode != 0 or not proc.stdout.strip():
                    raise RuntimeError(f"loadgen slow failed: {proc.stderr[-2000:]}")
                r: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
                r["noise_pct"] = round(noise.pct(), 1)
                r["core_busy_pct"] = core_busy(k0, core_times())
                r["tcp"] = {k: v - tcp0.get(k, 0) for k, v in procs.tcp_counters().items()
                            if v - tcp0.get(k, 0)}
                peak_rss = max((s[1] for s in sampler.samples), default=base_rss)
                r["base_rss_kib"] = base_rss
                r["peak_rss_kib"] = peak_rss
                r["rss_kib_per_stream"] = ((peak_rss - base_rss) / r["peak_open"]
                                           if pids and r["peak_open"] else None)
                r["gateway_cpu_s"] = procs.cpu_seconds(pids) - c0 if pids else None
                r["rss_timeline"] = [[round(s[0], 3), s[1]] for s in sampler.samples]
                r["ramp_s"] = p.ramp_s(n)
                r["chunks"], r["delay_ms"] = chunks, delay_ms
                return r

            r = self.quiet(f"slow {n} {name}", once, retry=False)
            q = r["ttfb_ms"]
            per = r["rss_kib_per_stream"]
            grow = (r["peak_rss_kib"] - r["base_rss_kib"]) / 1024
            self.say(f"  slow {n:<5}      {name:<11} ok {r['ok']}/{n}  peak open "
                     f"{r['peak_open']}  TTFB p50 {q.get('p50', 0):.1f} ms p99 "
                     f"{q.get('p99', 0):.1f} ms  errors {r['error_count']}  "
                     + (f"RSS +{grow:.1f} MiB = {per:.1f} KiB/stream  " if per is not None
                        else "")
                     + f"cores {r['core_busy_pct']}  noise {r['noise_pct']:.0f}%"
                     + (f"  tcp {r['tcp']}" if r.get("tcp") else ""))
            return r

        # Thousands of streams take long to open: one round above 1,000.
        rounds = p.rounds if n <= 1000 else 1
        out = self.interleaved(names, rounds, run, lambda r: r["ttfb_ms"].get("p99", 0.0))
        self.data["scenarios"][f"slow_{n}"] = out
        if rounds > 1:
            self.say(f"  slow {n} TTFB p99, median of rounds: " + ", ".join(
                f"{m} {r['ttfb_ms'].get('p99', 0):.1f} ms" for m, r in out.items()))

    def scenario_apis(self) -> None:
        """(e) The gateway's CPU per streamed request of each API, against one mock
        upstream (20 one-token chunks): chat (the byte relay's reference), the Responses
        and Messages APIs relayed natively, and a Messages client translated to chat."""
        p = self.plan
        flint = self.targets["flintproxy"]
        mock = procs.start("mock-apis", [*self.flint_cmd(), "mock-upstream", "--port",
                                         str(self.apis_port), "--chunks", "20"],
                           self.work, UP_CPU)
        procs.wait_port(self.apis_port, child=mock)
        text = PROMPT[0]["content"]
        rows = {
            "chat": ("/v1/chat/completions",
                     {"model": "gpt-4o", "messages": PROMPT, "stream": True}),
            "responses": ("/v1/responses", {"model": "gpt-4o", "input": text, "stream": True}),
            "messages": ("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 1000,
                                          "messages": PROMPT, "stream": True}),
            "messages_via_chat": ("/v1/messages", {"model": "gpt-4o", "max_tokens": 1000,
                                                   "messages": PROMPT, "stream": True}),
        }
        out = self.data["scenarios"].setdefault("apis", {})
        try:
            for name, (path, body) in rows.items():
                t = Target(f"flintproxy-{name}", name, flint.base, path, path, "",
                           key=flint.key, child=flint.child, payload=orjson.dumps(body))

                def once(t: Target = t) -> dict[str, Any]:
                    self.drive(t, "sse", p.warm_s, p.conns)  # warm-up, not recorded
                    return self.measured(t, "sse", p.sat_s, p.conns)

                r = out[name] = self.quiet(f"apis {name}", once)
                self.say(f"  {name:<18} {r['rps']:>9,.0f} req/s  CPU "
                         f"{r['cpu_ms_per_req'] or 0:.3f} ms/req  errors {r['error_count']}  "
                         f"noise {r['noise_pct']:.0f}%")
        finally:
            mock.stop()
            procs.forget(mock)

    # -- the whole run ---------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        p = self.plan
        self.say("setting up: " + ("quick run" if p.quick else "full run"))
        self.setup()
        self.say("targets: " + ", ".join(t.label for t in self.targets.values())
                 + f"; gateway auth: {self.auth_mode}")
        if "a" in p.scenarios:
            self.say("(a) non-streaming, saturation")
            self.scenario_throughput("json")
            self.say("(a) non-streaming, moderate fixed rate")
            self.scenario_moderate()
        if "b" in p.scenarios:
            self.say("(b) streaming (20 chunks + usage), saturation")
            self.scenario_throughput("sse")
            self.say("(b) streaming TTFB at a fixed rate")
            self.scenario_ttfb()
        for n in p.slow_counts if "c" in p.scenarios else []:
            chunks, delay = p.slow_spec(n)
            self.say(f"(c) {n} concurrent slow streams ({chunks} chunks, {delay:g} ms apart, "
                     f"started over {p.ramp_s(n):g} s)")
            self.scenario_slow(n)
        if "e" in p.scenarios:
            self.say("(e) relay CPU per streamed request by API (chat, Responses, Messages, "
                     "Messages translated to chat)")
            self.scenario_apis()
        if "f" in p.scenarios:
            self.say("(f) the shared mode (PostgreSQL + Redis) against the embedded mode, "
                     "and --workers 2 against 1")
            distributed.scenario(self)
        self.finish_features()
        return self.data

    def finish_features(self) -> None:
        """Stop the gateway gracefully (the usage queue drains) and read what it recorded."""
        t = self.targets["flintproxy"]
        status, body = procs.http("GET", f"http://127.0.0.1:{self.gw_console_port}/metrics")
        metrics = body.decode(errors="replace") if status == 200 else ""
        names = sorted({ln.split("{")[0].split(" ")[0] for ln in metrics.splitlines()
                        if ln.startswith("flintproxy_")})
        rc = t.child.stop(30) if t.child is not None else None
        feats: dict[str, Any] = {"auth": self.auth_mode, "metrics_status": status,
                                 "metric_names": names, "gateway_exit": rc}
        with contextlib.suppress(Exception):
            import sqlite3

            db = sqlite3.connect(f"file:{self.gw_db}?mode=ro", uri=True)
            try:
                feats["usage_rows"] = db.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
                row = db.execute("SELECT credited_nano, balance_nano FROM accounts WHERE "
                                 "email = ?", (EMAIL,)).fetchone()
                if row:
                    feats["charged_usd"] = (row[0] - row[1]) / 1e9
            finally:
                db.close()
        self.data["features"] = feats

    def meta(self) -> dict[str, Any]:
        cpu = next((ln.split(":", 1)[1].strip() for ln in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
        from flintproxy import __version__

        return {
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stamp": self.stamp,
            "quick": self.plan.quick, "cpu": cpu, "cpus": os.cpu_count(),
            "kernel": platform.release(), "python": platform.python_version(),
            "flintproxy": __version__,
            "nginx": nginxconf.version(self.nginx_bin) if self.nginx_bin else None,
            "wrk": bool(self.wrk_bin), "upstream": "nginx" if self.nginx_bin else "canned.py",
            "pinning": {"gateway": GW_CPU, "load generator": LOAD_CPU, "upstreams": UP_CPU},
            "plan": self.plan.__dict__, "notes": self.notes, "noisy_runs": self.noisy,
            "targets": {n: t.label for n, t in self.targets.items()},
            "runtime_s": round(time.monotonic() - self.t_start, 1),
        }


# --- the table ----------------------------------------------------------------------


def _get(d: dict[str, Any], *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The table: one row per figure, a value per target (None: not measured)."""
    sc = data["scenarios"]
    targets = list(data["meta"]["targets"])
    out: list[dict[str, Any]] = []

    def add(section: str, label: str, fmt: str, getter: Any, better: str,
            skip_direct: bool = False) -> None:
        vals = {}
        for t in targets:
            v = None if (skip_direct and t == "direct") else getter(t)
            vals[t] = v
        out.append({"section": section, "label": label, "fmt": fmt, "values": vals,
                    "better": better})

    a, m, b, tt = (sc.get("nonstream_sat", {}), sc.get("nonstream_moderate", {}),
                   sc.get("stream_sat", {}), sc.get("stream_ttfb", {}))
    add("(a) non-streaming", "requests/s at saturation", "{:,.0f}",
        lambda t: _get(a, t, "rps"), "higher")
    add("(a) non-streaming", "  latency p50 at saturation, ms", "{:.2f}",
        lambda t: _get(a, t, "p50_ms"), "lower")
    rate = _get(m, "direct", "rps") or 0
    add("(a) non-streaming", f"latency p50 at ~{rate:,.0f} req/s, ms", "{:.3f}",
        lambda t: _get(m, t, "p50_ms"), "lower")
    add("(a) non-streaming", f"latency p99 at ~{rate:,.0f} req/s, ms", "{:.3f}",
        lambda t: _get(m, t, "p99_ms"), "lower")
    add("(a) non-streaming", "  added latency p50 vs direct, ms", "{:+.3f}",
        lambda t: None if _get(m, t, "p50_ms") is None or _get(m, "direct", "p50_ms") is None
        else _get(m, t, "p50_ms") - _get(m, "direct", "p50_ms"), "lower", skip_direct=True)
    add("(a) non-streaming", "  added latency p99 vs direct, ms", "{:+.3f}",
        lambda t: None if _get(m, t, "p99_ms") is None or _get(m, "direct", "p99_ms") is None
        else _get(m, t, "p99_ms") - _get(m, "direct", "p99_ms"), "lower", skip_direct=True)
    add("(b) streaming", "requests/s at saturation", "{:,.0f}",
        lambda t: _get(b, t, "rps"), "higher")
    trate = _get(tt, "direct", "rate") or 0
    add("(b) streaming", f"TTFB p50 at {trate:,.0f} req/s, ms", "{:.3f}",
        lambda t: _get(tt, t, "ttfb_ms", "p50"), "lower")
    add("(b) streaming", f"TTFB p99 at {trate:,.0f} req/s, ms", "{:.3f}",
        lambda t: _get(tt, t, "ttfb_ms", "p99"), "lower")
    add("(b) streaming", "  added TTFB p50 vs direct, ms", "{:+.3f}",
        lambda t: None if _get(tt, t, "ttfb_ms", "p50") is None
        else _get(tt, t, "ttfb_ms", "p50") - _get(tt, "direct", "ttfb_ms", "p50"),
        "lower", skip_direct=True)
    for key in sorted((k for k in sc if k.startswith("slow_")), key=lambda k: int(k[5:])):
        s = sc[key]
        n = int(key[5:])
        any_r = next(iter(s.values()), {})
        sec = (f"(c) {n:,} concurrent slow streams ({any_r.get('chunks')} chunks, "
               f"{any_r.get('delay_ms', 0):g} ms apart)")
        add(sec, "TTFB p50, ms", "{:.1f}", lambda t, s=s: _get(s, t, "ttfb_ms", "p50"), "lower")
        add(sec, "TTFB p99, ms", "{:.1f}", lambda t, s=s: _get(s, t, "ttfb_ms", "p99"), "lower")
        add(sec, "errors", "{:,.0f}", lambda t, s=s: _get(s, t, "error_count"), "lower")
        add(sec, "peak concurrent streams", "{:,.0f}", lambda t, s=s: _get(s, t, "peak_open"),
            "higher")
        add(sec, "gateway RSS per stream, KiB", "{:.1f}",
            lambda t, s=s: _get(s, t, "rss_kib_per_stream"), "lower", skip_direct=True)
    add("(d) CPU", "CPU-s per 1,000 non-streaming requests", "{:.3f}",
        lambda t: _get(a, t, "cpu_ms_per_req"), "lower")
    add("(d) CPU", "CPU-s per 1,000 streaming requests", "{:.3f}",
        lambda t: _get(b, t, "cpu_ms_per_req"), "lower")
    add("(d) CPU", "CPU-s per 1,000 requests at ~moderate rate", "{:.3f}",
        lambda t: _get(m, t, "cpu_ms_per_req"), "lower")
    add("(d) CPU", "  gateway core busy at saturation (non-stream), %", "{:.0f}",
        lambda t: None if _get(a, t, "gateway_core_util") is None
        else 100 * _get(a, t, "gateway_core_util"), "higher")
    return out


def _fmt(fmt: str, v: Any) -> str:
    return "—" if v is None else fmt.format(v)


def ratio(v: Any, base: Any) -> float | None:
    if v is None or base in (None, 0) or isinstance(base, str):
        return None
    return float(v) / float(base)


def table(data: dict[str, Any]) -> str:
    targets = list(data["meta"]["targets"])
    cols = [*targets, "flint/nginx"] if {"flintproxy", "nginx"} <= set(targets) else targets
    lines = []
    header = f"{'':<52}" + "".join(f"{c:>22}" for c in cols)
    lines.append(header)
    section = None
    for r in rows(data):
        if r["section"] != section:
            section = r["section"]
            lines.append(section)
        cells = []
        base = r["values"].get("direct")
        additive = r["fmt"].startswith("{:+")
        for t in targets:
            v = r["values"].get(t)
            cell = _fmt(r["fmt"], v)
            rt = ratio(v, base)
            if t != "direct" and rt is not None and not additive:
                cell += f" ({rt:.2f}x)"
            cells.append(cell)
        if "flint/nginx" in cols:
            rt = ratio(r["values"].get("flintproxy"), r["values"].get("nginx"))
            cells.append("—" if rt is None or additive else f"{rt:.2f}x")
        lines.append(f"  {r['label']:<50}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def apis_table(data: dict[str, Any]) -> str:
    """(e): flintproxy's CPU per streamed request of each API, as a ratio to chat's."""
    apis = data["scenarios"].get("apis") or {}
    base = _get(apis, "chat", "cpu_ms_per_req")
    if not apis:
        return ""
    lines = ["(e) flintproxy CPU per streamed request by API (one mock upstream, 20 chunks)"]
    for name, label in (("chat", "chat/completions (byte relay)"),
                        ("responses", "responses (byte relay)"),
                        ("messages", "messages to an Anthropic upstream (byte relay)"),
                        ("messages_via_chat", "messages to an OpenAI upstream (translated)")):
        v = _get(apis, name, "cpu_ms_per_req")
        rt = ratio(v, base)
        lines.append(f"  {label:<50}{_fmt('{:.3f} ms', v):>14}"
                     + (f"  ({rt:.2f}x chat)" if rt is not None else "")
                     + f"  {_fmt('{:,.0f} req/s', _get(apis, name, 'rps'))}")
    return "\n".join(lines)


def checks(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against this run's figures."""
    sc = data["scenarios"]
    out = []

    def check(name: str, measured: float | None, goal: str, ok: bool | None,
              shown: str) -> None:
        out.append({"name": name, "measured": measured, "shown": shown, "goal": goal,
                    "ok": ok})

    fl_a = _get(sc, "nonstream_sat", "flintproxy", "rps")
    ng_a = _get(sc, "nonstream_sat", "nginx", "rps")
    r = ratio(fl_a, ng_a)
    check("non-streaming req/s vs nginx", r, f"≥ {GOALS['nonstream_vs_nginx']:.0%}",
          None if r is None else r >= GOALS["nonstream_vs_nginx"],
          "no nginx row" if r is None else f"{r:.1%}")
    r = ratio(_get(sc, "stream_sat", "flintproxy", "rps"), _get(sc, "stream_sat", "nginx", "rps"))
    check("streaming req/s vs nginx", r, f"≥ {GOALS['stream_vs_nginx']:.0%}",
          None if r is None else r >= GOALS["stream_vs_nginx"],
          "no nginx row" if r is None else f"{r:.1%}")
    for kind, key in (("non-streaming", "nonstream_sat"), ("streaming", "stream_sat")):
        v = _get(sc, key, "flintproxy", "cpu_ms_per_req")
        check(f"CPU per {kind} request, ms", v, f"≤ {GOALS['cpu_ms_per_req']}",
              None if v is None else v <= GOALS["cpu_ms_per_req"],
              "—" if v is None else f"{v:.3f}")
    for key in sorted((k for k in sc if k.startswith("slow_")), key=lambda k: int(k[5:])):
        v = _get(sc, key, "flintproxy", "rss_kib_per_stream")
        check(f"RSS per stream, {int(key[5:]):,} streams, KiB", v,
              f"≤ {GOALS['rss_kib_per_stream']:g}",
              None if v is None else v <= GOALS["rss_kib_per_stream"],
              "—" if v is None else f"{v:.1f}")
    m = sc.get("nonstream_moderate", {})
    v = None
    if _get(m, "flintproxy", "p50_ms") is not None and _get(m, "direct", "p50_ms") is not None:
        v = m["flintproxy"]["p50_ms"] - m["direct"]["p50_ms"]
    check("added p50 latency at a moderate rate, ms", v, f"≤ {GOALS['added_p50_ms']}",
          None if v is None else v <= GOALS["added_p50_ms"], "—" if v is None else f"{v:.3f}")
    r = ratio(_get(sc, "slow_1000", "flintproxy", "ttfb_ms", "p99"),
              _get(sc, "slow_1000", "direct", "ttfb_ms", "p99"))
    d50 = _get(sc, "slow_1000", "direct", "ttfb_ms", "p50") or 0.0
    d99 = _get(sc, "slow_1000", "direct", "ttfb_ms", "p99") or 0.0
    # A baseline whose own p99 stalls (the mock upstream or the client falling behind)
    # makes any ratio to it meaningless: report it, don't judge it.
    stable = d99 <= max(BASELINE_P99_MS, 10 * d50)
    check("TTFB p99 with 1,000 streams vs direct", r, f"≤ {GOALS['ttfb_p99_ratio_1000']}x",
          None if r is None or not stable else r <= GOALS["ttfb_p99_ratio_1000"],
          "not run" if r is None else f"{r:.2f}x" if stable
          else f"{r:.2f}x (direct p99 {d99:.0f} ms: unstable baseline)")
    errors = 0
    for s in sc.values():
        errors += int(_get(s, "flintproxy", "error_count") or 0)
    check("errors (every flintproxy run)", errors, "0", errors == 0, f"{errors}")
    d = ratio(_get(sc, "nonstream_sat", "direct", "rps"), fl_a)
    check("harness: direct req/s vs flintproxy (upstream not the bottleneck)", d,
          f"≥ {GOALS['direct_vs_gateway']:g}x",
          None if d is None else d >= GOALS["direct_vs_gateway"],
          "—" if d is None else f"{d:.1f}x")
    return out


def checks_text(cs: list[dict[str, Any]]) -> str:
    lines = [f"{'target':<64}{'measured':>12}{'goal':>10}  result"]
    for c in cs:
        res = "n/a" if c["ok"] is None else ("PASS" if c["ok"] else "FAIL")
        lines.append(f"{c['name']:<64}{c['shown']:>12}{c['goal']:>10}  {res}")
    return "\n".join(lines)


def main() -> int:
    plan = Plan.from_env()
    bench = Bench(plan)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        data = bench.run()
    except BaseException:
        procs.stop_all()
        raise
    finally:
        procs.stop_all()
    data["meta"] = bench.meta()
    data["rows"] = rows(data)
    data["checks"] = checks(data)
    if not env_flag("BENCH_KEEP"):
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                Path(f"{bench.gw_db}{suffix}").unlink()
        for log in bench.work.glob("*.log"):  # the access log: keep its tail
            if log.stat().st_size > 4 << 20:
                with log.open("rb") as f:
                    f.seek(-(1 << 20), os.SEEK_END)
                    tail = f.read()
                log.write_bytes(b"[... truncated by bench/run.py ...]\n" + tail)
    jpath = RESULTS / f"bench-{bench.stamp}.json"
    jpath.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    shutil.copyfile(jpath, RESULTS / "latest.json")
    hpath = RESULTS / f"report-{bench.stamp}.html"
    hpath.write_text(report.render(data, table(data) + "\n\n" + apis_table(data),
                                   checks_text(data["checks"])))
    shutil.copyfile(hpath, RESULTS / "latest.html")
    meta = data["meta"]
    print()
    print(f"flintproxy bench — {meta['time']} — {meta['cpus']} x {meta['cpu']}, Python "
          f"{meta['python']}; gateway on CPU {GW_CPU}, load generator and upstreams on CPU "
          f"{LOAD_CPU}; throughput by {'wrk' if meta['wrk'] else 'the asyncio client'}, "
          f"upstream {meta['upstream']}")
    print("(value (ratio to direct); flint/nginx = flintproxy ÷ nginx)")
    print(table(data))
    if data["scenarios"].get("apis"):
        print()
        print(apis_table(data))
    print()
    print(checks_text(data["checks"]))
    f = data.get("features", {})
    print()
    print(f"flintproxy features during the run: auth = {f.get('auth')}; /metrics "
          f"HTTP {f.get('metrics_status')} ({len(f.get('metric_names', []))} flintproxy_* "
          f"series); usage rows written {f.get('usage_rows', '?')}; charged "
          f"{f.get('charged_usd', 0):.6f} USD")
    for n in bench.notes:
        print(f"NOTE: {n}")
    if bench.noisy:
        print("NOTE: figures that may not be the gateway's own: {}; rerun on a quiet "
              "machine before quoting them".format("; ".join(bench.noisy)))
    print(f"\nresults: {jpath.relative_to(ROOT)}, {hpath.relative_to(ROOT)} "
          f"(also latest.json, latest.html); {meta['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
