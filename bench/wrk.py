"""Drive wrk (the compiled load generator) and read its results as JSON.

A generated Lua script sets the POST body and headers, and prints one
``WRKJSON {...}`` line from ``done()`` with counts, errors and latency percentiles
(microseconds).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from procs import pinned

INSTALL_HINT = "apt-get install wrk"

# Percentiles reported by done().
PERCENTILES = [50.0, 90.0, 99.0, 99.9]

_LUA = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{auth}
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


def script(path: Path, body: bytes, key: str | None) -> Path:
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    path.write_text(_LUA.format(body=body.decode(), auth=auth,
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
    res["p50_ms"] = pct[50.0] / 1000
    res["p90_ms"] = pct[90.0] / 1000
    res["p99_ms"] = pct[99.0] / 1000
    res["p999_ms"] = pct[99.9] / 1000
    res["tool"] = "wrk"
    return res
