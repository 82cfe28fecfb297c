"""Drive wrk (the compiled load generator) and read its results as JSON.

A generated Lua script sets the POST body and headers, optionally a fixed think
time per connection (wrk's ``delay()`` hook: a steady, moderate rate), and prints
one ``WRKJSON {...}`` line from ``done()`` with counts, errors and latency
percentiles (microseconds).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from procs import pinned

INSTALL_HINT = "apt-get install wrk"

# Percentiles reported by done(): 0.5 % steps (the HTML histogram is rebuilt
# from them) plus the tail.
PERCENTILES = [x / 2 for x in range(1, 200)] + [99.5, 99.9, 99.99]

_LUA = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{auth}
local think = {delay}
if think > 0 then
  function delay() return think end
end
local pcts = {{{pcts}}}
function done(summary, latency, requests)
  local e = summary.errors
  local parts = {{}}
  for _, p in ipairs(pcts) do
    parts[#parts + 1] = string.format("[%g,%d]", p, latency:percentile(p))
  end
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"lat_min_us":%d,"lat_max_us":%d,"lat_mean_us":%.2f,"lat_stdev_us":%.2f,' ..
    '"percentiles":[%s]}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, table.concat(parts, ",")))
end
"""


def script(path: Path, body: bytes, key: str | None, delay_ms: float = 0.0) -> Path:
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    path.write_text(_LUA.format(body=body.decode(), auth=auth, delay=delay_ms,
                                pcts=",".join(f"{p:g}" for p in PERCENTILES)))
    return path


def run(binary: str, url: str, lua: Path, *, conns: int, seconds: float, threads: int = 1,
        cpus: str | None = "1", timeout_s: float = 10.0) -> dict[str, Any]:
    cmd = pinned([binary, "-t", str(threads), "-c", str(conns), "-d", f"{seconds:g}s",
                  "--timeout", f"{timeout_s:g}s", "-s", str(lua), url], cpus)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    m = re.search(r"^WRKJSON (.*)$", out.stdout, re.M)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr}")
    res: dict[str, Any] = json.loads(m.group(1))
    secs = res["duration_us"] / 1e6
    res["rps"] = res["requests"] / secs if secs else 0.0
    res["error_count"] = sum(res["errors"].values())
    pct = dict((float(p), v) for p, v in res.pop("percentiles"))
    res["quantiles_us"] = [[p, pct[p]] for p in PERCENTILES]
    res["p50_ms"] = pct[50.0] / 1000
    res["p90_ms"] = pct[90.0] / 1000
    res["p99_ms"] = pct[99.0] / 1000
    res["p999_ms"] = pct[99.9] / 1000
    res["tool"] = "wrk"
    return res
