"""Micro-benchmark of the finish side of a request: ids, billing, the usage-row enqueue.

    .venv/bin/python bench/micro_usage.py [iterations]

Prints µs per call, best of 5, for: new_request_id, usage_row (build the row from
an Admission and Outcome), UsageWriter.record (enqueue; the writer task is not
started, so nothing is flushed while timing), Billing.reserve + settle, and the
three together as ``finish`` does them (minus the limiter: see micro_limiter.py).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from microbench import bench

from flintproxy.config import BillingConfig, ModelPrice
from flintproxy.gate.billing import Billing
from flintproxy.gate.bounds import Bound
from flintproxy.gate.gate import Admission, Call, Outcome, Principal
from flintproxy.gate.service import usage_row
from flintproxy.relay.routes import new_request_id
from flintproxy.store.ledger import Balances, UsageWriter, open_writer_db

NANO = 1_000_000_000
PRICES = {"gpt-4o-mini": ModelPrice(150_000_000, 600_000_000, 75_000_000)}


# 160 bytes of body, no media, one choice, no client limit: the default output cap.
BOUND = Bound(160, 0, 1, None, None, ())


async def run(path: Path, n: int) -> None:
    db = await open_writer_db(path)
    try:
        await db.conn.execute("INSERT INTO accounts (id, email, created_at, credited_nano, "
                              "balance_nano) VALUES (1, 'micro@example.com', 0, ?, ?)",
                              (10**6 * NANO, 10**6 * NANO))
        await db.conn.commit()
        cfg = BillingConfig(max_backlog_rows=10**9)
        billing = Billing(PRICES, cfg, Balances(db))
        await billing.load(1)
        principal = Principal(key_id=1, account_id=1)
        call = Call(endpoint="chat/completions", model="gpt-4o-mini", stream=False,
                    prompt_tokens_estimate=40, max_tokens=None, request_id=new_request_id())
        admission = Admission(call, principal, time.perf_counter(), time.time_ns() // 10**6)
        outcome = Outcome(status=200, outcome="ok", upstream="local", prompt_tokens=12,
                          completion_tokens=20, ttfb_s=0.0004, duration_s=0.0009)
        row = usage_row(admission, outcome, 81)
        writers: list[UsageWriter] = []

        def fresh_writer() -> UsageWriter:
            # Not started: record() only enqueues. A new one per round keeps memory flat.
            w = UsageWriter(db, Billing(PRICES, cfg, Balances(db)), cfg)
            writers.append(w)
            return w

        def ids(n: int) -> None:
            for _ in range(n):
                new_request_id()

        def build(n: int) -> None:
            for _ in range(n):
                usage_row(admission, outcome, 81)

        def record(n: int) -> None:
            rec = fresh_writer().record
            for _ in range(n):
                rec(row)

        def reserve_settle(n: int) -> None:
            reserve, settle = billing.reserve, billing.settle
            for _ in range(n):
                settle(reserve(1, "gpt-4o-mini", BOUND), outcome)

        def finish(n: int) -> None:
            rec = fresh_writer().record
            reserve, settle = billing.reserve, billing.settle
            for _ in range(n):
                res = reserve(1, "gpt-4o-mini", BOUND)
                rec(usage_row(admission, outcome, settle(res, outcome)))

        print(f"{n} iterations, best of 5, Python {sys.version.split()[0]}")
        bench("new_request_id", ids, n)
        bench("usage_row (Admission + Outcome -> UsageRow)", build, n)
        bench("UsageWriter.record (enqueue only)", record, n)
        bench("Billing.reserve + settle", reserve_settle, n)
        bench("reserve + settle + usage_row + record", finish, n)
        del writers[:]
    finally:
        await db.close()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with tempfile.TemporaryDirectory(prefix="flint-micro-") as d:
        asyncio.run(run(Path(d) / "usage.db", n))


if __name__ == "__main__":
    main()
