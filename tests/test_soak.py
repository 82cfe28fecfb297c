"""The soak (bench/soak.py), short: mixed hostile traffic, then the books balance.

``make soak MINUTES=N`` runs it for long; here it runs 15 s in ``make test`` so a
lost usage row, a nano-dollar off, a 5xx or a traceback under mixed traffic fails CI.
The RSS bound is loose here (a short run's slope is mostly warm-up noise); the long
run holds it to 1 MiB/min.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


@pytest.mark.slow
def test_a_short_soak_loses_no_request_and_no_nano_dollar() -> None:
    done = subprocess.run(
        [sys.executable, str(SOAK), "--seconds", "15", "--concurrency", "8", "--warmup", "5",
         "--sample-s", "1", "--max-slope", "60"],
        capture_output=True, timeout=55, check=False)
    lines = done.stdout.decode().strip().splitlines()
    assert lines, done.stderr.decode()[-3000:]
    summary = json.loads(lines[-1])
    assert summary["ok"], json.dumps(summary["checks"], indent=1) + done.stderr.decode()[-2000:]
    assert done.returncode == 0
    # The mix really ran: streams, faults and disconnects all reached the gateway.
    kinds = summary["by_kind"]
    assert min(kinds.get(k, 0) for k in ("stream", "fault", "disconnect", "badkey")) > 0
    assert summary["usage_rows"] > 100 and summary["sum_cost_nano"] > 0
