"""Micro-benchmark of what the access log costs each request.

    .venv/bin/python bench/micro_accesslog.py [iterations]

Prints µs per call (best of 5) for what the event loop pays: AccessLog.finished on an
ok request (the line formatted and buffered), the same with the buffer full (the line
dropped and counted) and with the log off; then, per line, what the flusher's thread
pays to write a batch of 10,000 lines to a file. The budget on the loop: < 3 µs per
line; through ``logging`` (before the buffer) it was 6-10 µs on the same machine.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import tempfile
from typing import Any

from microbench import bench

from flintproxy.config import build_config
from flintproxy.gate.gate import Admission, Call, Outcome, Principal
from flintproxy.ops.accesslog import AccessLog, _write

BUDGET_US = 3.0


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    models = [f"model-{i}" for i in range(20)]
    raw: dict[str, Any] = {
        "upstreams": [{"name": "up0", "base_url": "http://127.0.0.1:9000/v1",
                       "models": models}],
        "models": {m: {"input_usd_per_mtok": "0.15", "output_usd_per_mtok": "0.60"}
                   for m in models},
    }
    config = build_config(raw, {})
    call = Call("chat/completions", "model-3", False, 12, None, "req_0123456789abcdef")
    admission = Admission(call, Principal(key_id=1, account_id=1), 0.0, 0)
    outcome = Outcome(status=200, outcome="ok", upstream="up0", prompt_tokens=12,
                      completion_tokens=20, ttfb_s=0.0123, duration_s=0.0125,
                      upstream_wait_s=0.0121)
    access = AccessLog(config)
    finished = access.finished

    def line(k: int) -> None:
        for _ in range(k):
            finished(admission, outcome, 1234)

    with open(os.devnull, "wb") as devnull:
        access.sink = devnull
        # No flusher runs here: the buffer takes every run's lines (~75 MB).
        access.max_pending_bytes = 1 << 40
        t_line = bench("AccessLog.finished (ok: line made and buffered)", line, n // 4)
        asyncio.run(access.flush())
        access.max_pending_bytes = 0
        bench("AccessLog.finished (buffer full: dropped, counted)", line, n)
    access.sink = None
    bench("AccessLog.finished (access log off)", line, n)

    one = io.BytesIO()
    access.sink = one
    access.max_pending_bytes = 1 << 20
    line(1)
    asyncio.run(access.flush())
    asyncio.run(access.close())  # ends its writer thread
    batch = bytearray(one.getvalue() * 10_000)  # a busy flush's worth
    with tempfile.TemporaryFile() as file:

        def flush(k: int) -> None:
            file.seek(0)
            file.truncate()
            for _ in range(k // 10_000):
                _write(file, batch)
        bench("flusher thread: one write of 10k lines, per line", flush, n // 4)
    print(f"\nper-request access log cost on the event loop {t_line:.3f} µs; "
          f"budget {BUDGET_US:g} µs: {'OK' if t_line < BUDGET_US else 'OVER'}")


if __name__ == "__main__":
    main()
