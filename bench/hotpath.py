"""Profile flintproxy's hot path under load with py-spy, and list the top costs.

    .venv/bin/pip install py-spy        # once
    .venv/bin/python bench/hotpath.py [--seconds 8] [--kinds json,sse] [--rate 200]

Sets up what ``make bench`` does (canned upstream, mock, flintproxy with every
feature on, a funded key), saturates the gateway with wrk (or the asyncio client)
and samples it with ``py-spy record`` (the gateway on CPU 0, wrk and py-spy
on CPU 1; py-spy pauses the gateway for each sample, a few % of its throughput).
Prints, per workload, where the event-loop thread spends its time: by function
(self and inclusive) and by component. The raw collapsed stacks go to
bench/results/profile-<kind>-<time>.txt (open them in speedscope, or render with
flamegraph.pl).

Caveat: py-spy sees Python frames only; time inside C (uvloop's loop and socket
calls, orjson, the http parser) is charged to the Python frame that called it, and
samples whose innermost frame is the loop's ``run`` are the C event loop itself
(epoll, socket reads and writes, callback dispatch).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs
import run as bench_run
import wrk

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")
# Outer frames of the event-loop thread (when a stack reaches them at all: uvloop
# runs task steps from C, so most stacks start at the task's coroutine).
_OUTER = {"<module> (flintproxy)", "main (flintproxy/cli.py)", "_run (flintproxy/cli.py)",
          "run (uvloop/__init__.py)", "Runner.run (asyncio/runners.py)"}
C_LOOP = "[C: uvloop's loop, socket I/O, callbacks; no Python frame]"


def component(file: str) -> str:
    if file.startswith(("flintproxy/", "aiohttp/")):
        return file
    top = file.split("/", 1)[0]
    return {"asyncio": "asyncio (stdlib)", "uvloop": "uvloop (C loop)"}.get(top, top)


def analyse(raw: Path, top: int = 25) -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    comp_self: collections.Counter[str] = collections.Counter()
    total = other_threads = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        if stack.startswith("Thread._bootstrap"):
            other_threads += n  # aiosqlite's worker threads
            continue
        total += n
        frames = [f for f in stack.split(";") if f and f not in _OUTER]
        leaf = frames[-1] if frames else C_LOOP
        m = _FRAME.match(leaf)
        self_t[leaf] += n
        comp_self[component(m.group("file")) if m else "uvloop (C loop)"] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples of the event-loop thread"
    out = [f"{total} samples of the event-loop thread, {other_threads} of aiosqlite's threads",
           "", f"self time by function (top {top}), % of the event-loop thread's samples:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_t.most_common(top)]
    out += ["", "self time by component:"]
    out += [f"  {100 * n / total:5.1f}%  {c}" for c, n in comp_self.most_common(15)]
    out += ["", "inclusive time, flintproxy functions:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common()
            if "(flintproxy/" in f]
    out += ["", f"inclusive time, everything (top {top}):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--kinds", default="json,sse,slow",
                   help="json (non-streaming), sse (streaming), slow (1,000 slow streams)")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--lines", action="store_true",
                   help="keep line numbers in the stacks (functions split by line)")
    p.add_argument("--native", action="store_true",
                   help="also sample C frames (uvloop, orjson, the parser, syscalls): "
                        "what the Python frames' self time is made of")
    p.add_argument("--nonblocking", action="store_true",
                   help="don't pause the gateway per sample (less overhead; stacks read "
                        "mid-change are dropped, which skews towards time in syscalls)")
    args = p.parse_args()
    spy = procs.have("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    plan = bench_run.Plan.from_env()
    plan.litellm = False
    bench = bench_run.Bench(plan, with_proxies=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    reports = []
    try:
        bench.setup()
        t = bench.targets["flintproxy"]
        assert t.child is not None
        for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
            raw = bench_run.RESULTS / f"profile-{kind}-{stamp}.txt"
            if kind == "slow":  # 1,000 concurrent slow streams, as make bench's (c)
                chunks, delay = plan.slow_spec(1000)
                bench.start_mock((chunks, delay))
                load = subprocess.Popen(procs.pinned(
                    [sys.executable, str(bench_run.BENCH / "loadgen.py"), "slow", t.url(kind),
                     "--body", t.body(kind).decode(), "--key", t.key or "", "--streams",
                     "1000", "--ramp", f"{plan.ramp_s(1000):g}"], bench_run.LOAD_CPU),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            elif bench.wrk_bin:
                bench.drive(t, kind, 2.0, args.conns)  # warm-up
                lua = wrk.script(bench.work / f"profile-{kind}.lua", t.body(kind), t.key)
                load = subprocess.Popen(procs.pinned(
                    [bench.wrk_bin, "-t1", f"-c{args.conns}", f"-d{args.seconds + 3:g}s",
                     "-s", str(lua), t.url(kind)], bench_run.LOAD_CPU),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            else:
                bench.drive(t, kind, 2.0, args.conns)  # warm-up
                load = subprocess.Popen(procs.pinned(
                    [sys.executable, str(bench_run.BENCH / "loadgen.py"), "closed", t.url(kind),
                     "--body", t.body(kind).decode(), "--key", t.key or "", "--conns",
                     str(args.conns), "--duration", f"{args.seconds + 3:g}",
                     *(["--stream"] if kind != "json" else [])], bench_run.LOAD_CPU),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(1.0)
            cpu0 = procs.cpu_seconds([t.child.pid])
            spied = procs.run([spy, "record", *(["--nonblocking"] if args.nonblocking else []),
                               *(["--native"] if args.native else []),
                               *(["--nolineno"] if not args.lines else []), "-r",
                               str(args.rate), "-d", f"{args.seconds:g}", "-f", "raw", "-o",
                               str(raw), "-p", str(t.child.pid)],
                              timeout=args.seconds + 60, cpus=bench_run.LOAD_CPU)
            cpu = procs.cpu_seconds([t.child.pid]) - cpu0
            out, _ = load.communicate(timeout=args.seconds + 60)
            if spied.returncode != 0 or not raw.exists():
                raise RuntimeError(f"py-spy failed: {spied.stderr[-1000:]}")
            rps = re.search(r"Requests/sec:\s*([\d.]+)", out or "")
            if kind == "slow":
                ok = re.search(r'"ok":\s*(\d+)', out or "")
                rps = None
                out = f"{ok.group(1) if ok else '?'} of 1000 streams ok"
            title = {"json": "non-streaming", "sse": "streaming (20 chunks)",
                     "slow": "1,000 concurrent slow streams"}.get(kind, kind)
            rate = f"{rps.group(1)} req/s" if rps else out if kind == "slow" else "? req/s"
            head = (f"== {title}: {rate} under py-spy, gateway "
                    f"CPU {100 * cpu / max(1e-9, args.seconds):.0f}% of a core; raw stacks: "
                    f"{raw.relative_to(bench_run.ROOT)}")
            reports.append(head + "\n" + analyse(raw))
            print(reports[-1] + "\n", flush=True)
    finally:
        procs.stop_all()
    path = bench_run.RESULTS / f"profile-{stamp}.txt"
    path.write_text("\n\n".join(reports) + "\n")
    print(f"written: {path.relative_to(bench_run.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
