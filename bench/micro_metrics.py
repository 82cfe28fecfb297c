"""Micro-benchmark of what observability adds to each request.

    .venv/bin/python bench/micro_metrics.py [iterations]

Prints µs per call (best of 5) for: Metrics.finished on an ok request (the hook every
admitted request runs), Metrics.rejected (a 401), the relay's ``exchange.call = call``,
the whole per-request metrics cost and, per scrape, sync() + the exposition. The
budget for the metrics: < 5 µs per request. (The access log: micro_accesslog.py.)
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from microbench import bench

from flintproxy.config import build_config
from flintproxy.errors import AuthenticationError
from flintproxy.gate.billing import Billing
from flintproxy.gate.gate import Admission, Call, Outcome, Principal
from flintproxy.http.exchange import Exchange
from flintproxy.ops.metrics import Metrics
from flintproxy.relay.answer import StreamGauge
from flintproxy.relay.routing import Router
from flintproxy.store.ledger import Balances, UsageWriter, open_writer_db

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
    # A writer that is never started: Metrics only reads its counters.
    db = asyncio.run(open_writer_db(Path(tempfile.mkdtemp(prefix="micro-metrics-")) / "m.db"))
    usage = UsageWriter(db, Billing(config.models, config.billing, Balances(db)),
                        config.billing)
    metrics = Metrics(config, router, StreamGauge(), usage, None)
    call = Call("chat/completions", "model-3", False, 12, None, "req_0123456789abcdef")
    admission = Admission(call, Principal(key_id=1, account_id=1), 0.0, 0)
    outcome = Outcome(status=200, outcome="ok", upstream="up0", prompt_tokens=12,
                      completion_tokens=20, ttfb_s=0.0123, duration_s=0.0125,
                      upstream_wait_s=0.0121)
    finished, rejected = metrics.finished, metrics.rejected
    request = Exchange("POST", "/v1/chat/completions", "/v1/chat/completions",
                       [(b"Content-Type", b"application/json")], "127.0.0.1")
    err = AuthenticationError("Incorrect API key provided.")

    def ok(n: int) -> None:
        for _ in range(n):
            finished(admission, outcome, 1234)

    def refused(n: int) -> None:
        for _ in range(n):
            rejected(request, err)

    def stash(n: int) -> None:
        for _ in range(n):
            request.call = call

    observers = [finished]

    def per_request(n: int) -> None:  # what relay + ServiceGate.finish now do for metrics
        for _ in range(n):
            request.call = call
            call.admitted = True
            for observe in observers:
                observe(admission, outcome, 1234)

    t_ok = bench("Metrics.finished (ok, with ttfb)", ok, n)
    bench("Metrics.rejected (401 on a relay path)", refused, n)
    bench("exchange.call = call", stash, n)
    total = bench("per admitted request, all metrics work", per_request, n)

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
