"""Micro-benchmark of what observability adds to each request.

    .venv/bin/python bench/micro_metrics.py [iterations]

Prints µs per call (best of 5) for: Metrics.finished on an ok request (the hook every
admitted request runs), Metrics.rejected (a 401), the relay's ``request[CALL] = call``,
the whole per-request metrics cost, the access log line (to /dev/null) and, per
scrape, sync() + the exposition. The budget for the metrics: < 5 µs per request.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from aiohttp.test_utils import make_mocked_request
from microbench import bench

from flintproxy.accesslog import LOGGER, AccessLog
from flintproxy.config import build_config
from flintproxy.errors import AuthenticationError
from flintproxy.gate import CALL, Admission, Call, Outcome, Principal
from flintproxy.metrics import Metrics
from flintproxy.relay import Relay
from flintproxy.routing import Router

BUDGET_US = 5.0




def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    models = [f"model-{i}" for i in range(20)]
    raw: dict[str, Any] = {
        "upstreams": [{"name": f"up{i}", "base_url": f"http://127.0.0.1:{9000 + i}/v1",
                       "models": models} for i in range(3)],
        "models": {m: {"input_usd_per_mtok": "0.15", "output_usd_per_mtok": "0.60"}
                   for m in models},
    }
    config = build_config(raw, {})
    router = Router(config)
    relay = Relay(config, router, None)  # type: ignore[arg-type]  # the gate is not used
    metrics = Metrics(config, router, relay)
    call = Call("chat/completions", "model-3", False, 12, None, "req_0123456789abcdef")
    admission = Admission(call, Principal(key_id=1, account_id=1), 0.0, 0)
    outcome = Outcome(status=200, outcome="ok", upstream="up0", prompt_tokens=12,
                      completion_tokens=20, ttfb_s=0.0123, duration_s=0.0125,
                      upstream_wait_s=0.0121)
    finished, rejected = metrics.finished, metrics.rejected
    request = make_mocked_request("POST", "/v1/chat/completions")
    err = AuthenticationError("Incorrect API key provided.")

    def ok(n: int) -> None:
        for _ in range(n):
            finished(admission, outcome, 1234)

    def refused(n: int) -> None:
        for _ in range(n):
            rejected(request, err)

    def stash(n: int) -> None:
        for _ in range(n):
            request[CALL] = call

    observers = [finished]

    def per_request(n: int) -> None:  # what relay + ServiceGate.finish now do for metrics
        for _ in range(n):
            request[CALL] = call
            call.admitted = True
            for observe in observers:
                observe(admission, outcome, 1234)

    t_ok = bench("Metrics.finished (ok, with ttfb)", ok, n)
    bench("Metrics.rejected (401 on a relay path)", refused, n)
    bench("request[CALL] = call", stash, n)
    total = bench("per admitted request, all metrics work", per_request, n)

    logger = logging.getLogger(LOGGER)
    logger.propagate = False
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        access = AccessLog(config)

        def log_line(n: int) -> None:
            for _ in range(n):
                access.finished(admission, outcome, 1234)
        bench("AccessLog.finished (JSON line to /dev/null)", log_line, n // 4)
        logger.setLevel(logging.WARNING)
        bench("AccessLog.finished (logger off)", log_line, n)
        logger.removeHandler(handler)

    def sync(k: int) -> None:
        for _ in range(k):
            finished(admission, outcome, 1234)
            metrics.sync()

    def exposition(k: int) -> None:
        for _ in range(k):
            metrics.exposition()
    samples = metrics.exposition().count(b"\nflintproxy_")
    sync_us = bench("scrape: sync() on the event loop", sync, 2000)
    expo_us = bench(f"scrape: exposition, {samples} samples (a thread)", exposition, 100)
    print(f"\nper-request metrics cost {total:.3f} µs (Metrics.finished {t_ok:.3f} µs); "
          f"budget {BUDGET_US:g} µs: {'OK' if total < BUDGET_US else 'OVER'}; "
          f"per scrape: {sync_us:.0f} µs on the loop + {expo_us / 1000:.1f} ms in a thread")


if __name__ == "__main__":
    main()
