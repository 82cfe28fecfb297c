"""Prometheus metrics: bounded labels, a near-free hot path, exposition off the event loop.

Hot path. ``Metrics.finished`` (a ``ServiceGate.finish`` observer: every admitted
request, exactly once) and ``Metrics.rejected`` (the error middleware: requests
refused before admission) only add to plain numbers kept per model; no locks, no
``labels()``, no prometheus_client call. ``sync()`` moves those deltas into the
prometheus_client metrics and sets the gauges that mirror live state (active
streams, usage backlog, upstream health). It runs on the event loop before every
scrape, so a scrape is exact; in multiprocess mode also once a second, so the
files of every worker stay current. The usage writer's and the access log's counters
are read from those objects at the same time, never counted per request here.

Labels, every one from a closed set (never a key, account, email or IP):
    model     a configured model name, else "other" (unknown, or not parsed yet)
    status    "1xx".."5xx"; a client gone before any status was sent counts as 4xx
              (nginx's 499); a stream that already sent its 200 stays 2xx
    kind      prompt | completion
    outcome   ok | client_disconnect | upstream_error | error | rejected
    upstream  a configured upstream name
    reason    upstream errors: routing.FAILURE_REASONS; rejections: REJECT_REASONS
    scope     limiter codes: requests | tokens | concurrency | ip | failed_auth | login

``flintproxy_requests_total`` counts the three relay endpoints (chat/completions,
completions, embeddings), whatever their fate; ``rate_limited_total`` counts
every 429 of ours, /api logins included.

Multiprocess. prometheus_client picks its value storage when it is imported, so
set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory, wiped before each start) in
the environment of every worker before it starts. The metrics are then kept in
that directory's files; ``/metrics`` reads them all through MultiProcessCollector;
gauges are aggregated with ``livesum`` (active streams, usage backlog) or
``livemin`` (upstream health: 0 when any worker's circuit is open); a worker
that stops calls ``mark_process_dead``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from bisect import bisect_left
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from flintproxy.config import Config
from flintproxy.errors import FlintError, ModelNotFound
from flintproxy.gate.billing import Billing
from flintproxy.gate.gate import Admission, Ending, Outcome
from flintproxy.gate.leases import LeaseBook
from flintproxy.gate.sharedlimits import SharedLimiter
from flintproxy.http.exchange import Exchange
from flintproxy.ops.accesslog import AccessLog
from flintproxy.relay.answer import StreamGauge
from flintproxy.relay.routes import ENDPOINT_PATHS, ENDPOINTS
from flintproxy.relay.routing import FAILURE_REASONS, Router
from flintproxy.store.ledger import UsageWriter

log = logging.getLogger("flintproxy.ops.metrics")

OTHER = "other"
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
OUTCOMES = tuple(e.value for e in Ending)
SCOPES = {
    "rate_limit_requests": "requests",
    "rate_limit_tokens": "tokens",
    "rate_limit_concurrency": "concurrency",
    "rate_limit_ip": "ip",
    "too_many_failed_attempts": "failed_auth",
    "too_many_login_attempts": "login",
}
REJECT_REASONS = {
    400: "bad_request", 401: "unauthenticated", 402: "insufficient_balance",
    403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    413: "payload_too_large", 415: "unsupported_media_type", 429: "rate_limited",
    503: "unavailable",
}
RELAY_PATHS = frozenset(ENDPOINT_PATHS.values())

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01,
                    0.025, 0.1)
FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 10, 50, 100, 500, 1000, 5000, 10000, 50000)
MULTIPROCESS_SYNC_S = 1.0


class _Slot:
    """One model's numbers since the last ``sync`` (deltas, not totals)."""

    __slots__ = ("completion", "cost_nano", "dur", "dur_sum", "outcomes", "prompt", "status",
                 "ttfb", "ttfb_sum")

    def __init__(self) -> None:
        self.status = [0] * 6  # index: status // 100 (1..5)
        self.outcomes: dict[str, int] = {}
        self.prompt = self.completion = self.cost_nano = 0
        self.dur = [0] * (len(DURATION_BUCKETS) + 1)
        self.ttfb = [0] * (len(TTFB_BUCKETS) + 1)
        self.dur_sum = self.ttfb_sum = 0.0


def _push_histogram(child: Histogram, counts: list[int], total: float) -> None:
    # prometheus_client offers observe() one value at a time only; its per-bucket
    # values (_buckets, non-cumulative, +Inf last) and _sum take whole deltas.
    # tests/ops/test_metrics.py checks the exposition against real traffic.
    buckets = child._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
            counts[i] = 0
    child._sum.inc(total)


class Metrics:
    """Every flintproxy metric, for one app (its own registry: tests run several apps)."""

    def __init__(self, config: Config, router: Router, streams: StreamGauge,
                 usage: UsageWriter, access_log: AccessLog | None,
                 billing: Billing | None = None, leases: LeaseBook | None = None,
                 limits: SharedLimiter | None = None) -> None:
        self.router = router
        self.billing = billing
        self.leases = leases  # shared mode only
        self.limits = limits  # [cluster] redis_url only
        self.streams = streams
        self.usage = usage
        self.access_log = access_log  # None with [metrics] access_log = false
        usage.flush_observers.append(self.flushed)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if self.multiprocess and not getattr(values.ValueClass, "_multiprocess", False):
            log.warning("PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was "
                        "imported; metrics stay single-process")
            self.multiprocess = False
        self.registry = CollectorRegistry()
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        reg = None if self.multiprocess else self.registry  # the files hold them instead
        m = "model"
        self.requests = Counter("flintproxy_requests", "Relay requests by model and status "
                                "class.", [m, "status"], registry=reg)
        self.endpoint_requests = Counter("flintproxy_endpoint_requests", "Relay requests by "
                                         "API endpoint (chat/completions, responses, "
                                         "messages, ...) and status class.",
                                         ["endpoint", "status"], registry=reg)
        self.outcomes = Counter("flintproxy_request_outcomes", "Relay requests by outcome.",
                                [m, "outcome"], registry=reg)
        self.duration = Histogram("flintproxy_request_duration_seconds", "Arrival to last "
                                  "byte of admitted requests.", [m], buckets=DURATION_BUCKETS,
                                  registry=reg)
        self.ttfb = Histogram("flintproxy_time_to_first_byte_seconds", "Arrival to first "
                              "byte sent to the client.", [m], buckets=TTFB_BUCKETS, registry=reg)
        self.overhead = Histogram("flintproxy_overhead_seconds", "Gateway time up to the "
                                  "first byte, minus the time spent waiting on the upstream.",
                                  buckets=OVERHEAD_BUCKETS, registry=reg)
        self.tokens = Counter("flintproxy_tokens", "Tokens billed.", [m, "kind"], registry=reg)
        self.cost = Counter("flintproxy_cost", "Cost charged, in USD.", [m], registry=reg)
        self.active_streams = Gauge("flintproxy_active_streams", "SSE streams being relayed.",
                                    multiprocess_mode="livesum", registry=reg)
        self.upstream_errors = Counter("flintproxy_upstream_errors", "Failed upstream attempts "
                                       "(retried ones included).", ["upstream", "reason"],
                                       registry=reg)
        self.upstream_healthy = Gauge("flintproxy_upstream_healthy", "1 while the upstream's "
                                      "circuit is closed.", ["upstream"],
                                      multiprocess_mode="livemin", registry=reg)
        self.rate_limited = Counter("flintproxy_rate_limited", "Requests refused by our rate "
                                    "limits (429).", ["scope"], registry=reg)
        self.rejected_c = Counter("flintproxy_rejected", "Relay requests refused before "
                                  "reaching an upstream.", ["reason"], registry=reg)
        self.queue_depth = Gauge("flintproxy_usage_queue_depth", "Usage rows not yet "
                                 "committed.", multiprocess_mode="livesum", registry=reg)
        self.writer_stalled = Gauge("flintproxy_usage_writer_stalled", "1 while usage writes "
                                    "fail or hang.", multiprocess_mode="livemax", registry=reg)
        self.flush_seconds = Histogram("flintproxy_usage_flush_seconds", "Time to commit one "
                                       "usage batch.", buckets=FLUSH_BUCKETS, registry=reg)
        self.batch_rows = Histogram("flintproxy_usage_batch_rows", "Rows per committed usage "
                                    "batch.", buckets=BATCH_BUCKETS, registry=reg)
        self.rows_written = Counter("flintproxy_usage_rows_written", "Usage rows committed.",
                                    registry=reg)
        self.flush_errors = Counter("flintproxy_usage_flush_errors", "Failed usage batch "
                                    "commits (each is retried).", registry=reg)
        self.over_reservation = Counter("flintproxy_usage_over_reservation", "Requests whose "
                                        "upstream reported more usage than was reserved "
                                        "(each charged the reservation).", registry=reg)
        self.money_trips = Counter("flintproxy_money_round_trips", "Shared mode: round "
                                   "trips to the shared store for credit leases, by "
                                   "operation (debit: statements the lease rules add to "
                                   "usage batches).", ["op"], registry=reg)
        self.written_off = Counter("flintproxy_usage_written_off_nano", "Cost of usage "
                                   "rows their account could not cover, not charged: rows "
                                   "of an expired lease (shared mode), or money debited "
                                   "by another process meanwhile (SQLite), nano-USD.",
                                   registry=reg)
        self.leases_frozen = Gauge("flintproxy_leases_frozen", "Shared mode: 1 while this "
                                   "node cannot renew its credit leases (no reservations).",
                                   multiprocess_mode="livemax", registry=reg)
        self._seen_trips: dict[str, int] = {}
        self._seen_written_off = 0
        self.access_dropped = Counter("flintproxy_access_log_dropped_lines", "Access log "
                                      "lines lost: stdout not keeping up, failing, or "
                                      "still blocked at shutdown.", registry=reg)
        # The shared mode's Redis ([cluster] redis_url): its health and its cost.
        self.redis_up = Gauge("flintproxy_redis_up", "1 while Redis (the shared limiter) "
                              "answers; 0 while limits follow [cluster] on_redis_down.",
                              multiprocess_mode="livemin", registry=reg)
        self.redis_round_trips = Counter("flintproxy_redis_round_trips", "Round trips to "
                                         "Redis (admissions, batched releases, renewals, "
                                         "pings).", registry=reg)
        self.redis_errors = Counter("flintproxy_redis_errors", "Redis calls that failed "
                                    "(refused, timed out).", registry=reg)
        self.limiter_fail_open = Counter("flintproxy_limiter_fail_open", "Requests admitted "
                                         "or refused by per-node limits while Redis was "
                                         "down (on_redis_down = \"open\").", registry=reg)
        self._seen_redis = (0, 0, 0)

        # Pre-created children: the hot path and sync never call labels().
        self.models = (*config.models, OTHER)
        self._slots = {name: _Slot() for name in self.models}
        self._other = self._slots[OTHER]
        self._overhead = [0] * (len(OVERHEAD_BUCKETS) + 1)
        self._overhead_sum = 0.0
        # 1xx/3xx hardly ever occur (an upstream's 3xx passed through): created on first use.
        self._c_requests = {(mo, s): self.requests.labels(mo, s)
                            for mo in self.models for s in ("2xx", "4xx", "5xx")}
        self._c_endpoints = {(ep, s): self.endpoint_requests.labels(ep, s)
                             for ep in ENDPOINTS for s in ("2xx", "4xx", "5xx")}
        self._endpoints: dict[tuple[str, int], int] = {}  # (endpoint, status // 100): count
        self._c_outcomes = {(mo, o): self.outcomes.labels(mo, o)
                            for mo in self.models for o in OUTCOMES}
        self._c_tokens = {(mo, k): self.tokens.labels(mo, k)
                          for mo in self.models for k in ("prompt", "completion")}
        self._c_cost = {mo: self.cost.labels(mo) for mo in self.models}
        self._c_duration = {mo: self.duration.labels(mo) for mo in self.models}
        self._c_ttfb = {mo: self.ttfb.labels(mo) for mo in self.models}
        self._c_upstream = {(u.name, r): self.upstream_errors.labels(u.name, r)
                            for u in router.upstreams for r in FAILURE_REASONS}
        self._g_healthy = {u.name: self.upstream_healthy.labels(u.name)
                           for u in router.upstreams}
        self._c_scopes = {s: self.rate_limited.labels(s) for s in (*SCOPES.values(), OTHER)}
        self._c_reasons = {r: self.rejected_c.labels(r)
                           for r in (*REJECT_REASONS.values(), "model_not_found", OTHER)}
        self._scopes: dict[str, int] = {}
        self._reasons: dict[str, int] = {}
        self._seen: dict[tuple[str, str], int] = {}  # cumulative counters already pushed
        self._seen_rows = self._seen_errors = self._seen_dropped = self._seen_overruns = 0

    # --- the hot path -----------------------------------------------------------------

    def finished(self, admission: Admission, outcome: Outcome, cost_nano: int) -> None:
        """One admitted request ended (a ServiceGate finish observer)."""
        s = self._slots.get(admission.call.model) or self._other
        i = outcome.status // 100
        if not 0 < i < 6:
            i = 5
        s.status[i] += 1
        key = (admission.call.endpoint, i)
        self._endpoints[key] = self._endpoints.get(key, 0) + 1
        o = outcome.outcome
        oc = s.outcomes
        oc[o] = oc.get(o, 0) + 1
        s.prompt += outcome.prompt_tokens
        s.completion += outcome.completion_tokens
        s.cost_nano += cost_nano
        d = outcome.duration_s
        s.dur[bisect_left(DURATION_BUCKETS, d)] += 1
        s.dur_sum += d
        t = outcome.ttfb_s
        if t is not None:
            s.ttfb[bisect_left(TTFB_BUCKETS, t)] += 1
            s.ttfb_sum += t
            ov = t - outcome.upstream_wait_s
            if ov < 0.0:
                ov = 0.0
            self._overhead[bisect_left(OVERHEAD_BUCKETS, ov)] += 1
            self._overhead_sum += ov

    def rejected(self, exchange: Exchange, err: FlintError) -> None:
        """A request answered with an error before (or without) admission."""
        code = err.code
        if err.status == 429:
            scope = SCOPES.get(code or "", OTHER)
            self._scopes[scope] = self._scopes.get(scope, 0) + 1
        if exchange.route not in RELAY_PATHS:
            return
        call = exchange.call
        s = (self._slots.get(call.model) if call is not None else None) or self._other
        i = err.status // 100
        i = i if 0 < i < 6 else 5
        s.status[i] += 1
        if call is not None:
            key = (call.endpoint, i)
            self._endpoints[key] = self._endpoints.get(key, 0) + 1
        s.outcomes[Ending.REJECTED] = s.outcomes.get(Ending.REJECTED, 0) + 1
        reason = ("model_not_found" if isinstance(err, ModelNotFound)
                  else REJECT_REASONS.get(err.status, OTHER))
        self._reasons[reason] = self._reasons.get(reason, 0) + 1

    def flushed(self, seconds: float, rows: int) -> None:
        """A usage batch was committed (a UsageWriter flush observer)."""
        self.flush_seconds.observe(seconds)
        self.batch_rows.observe(rows)

    # --- scrape time ------------------------------------------------------------------

    def sync(self) -> None:
        """Move the pending deltas into prometheus_client and refresh the gauges."""
        for model, s in self._slots.items():
            for i in range(1, 6):
                n = s.status[i]
                if n:
                    key = (model, STATUS_CLASSES[i - 1])
                    child = self._c_requests.get(key)
                    if child is None:
                        child = self._c_requests[key] = self.requests.labels(*key)
                    child.inc(n)
                    s.status[i] = 0
            if s.outcomes:
                pending, s.outcomes = s.outcomes, {}
                for o, n in pending.items():
                    self._c_outcomes[(model, o if o in OUTCOMES else "error")].inc(n)
            if s.prompt or s.completion or s.cost_nano:
                self._c_tokens[(model, "prompt")].inc(s.prompt)
                self._c_tokens[(model, "completion")].inc(s.completion)
                # The ledger stays integer nano-dollars; the float is for display only.
                self._c_cost[model].inc(s.cost_nano / 1e9)
                s.prompt = s.completion = s.cost_nano = 0
            if any(s.dur):
                _push_histogram(self._c_duration[model], s.dur, s.dur_sum)
                s.dur_sum = 0.0
            if any(s.ttfb):
                _push_histogram(self._c_ttfb[model], s.ttfb, s.ttfb_sum)
                s.ttfb_sum = 0.0
        if any(self._overhead):
            _push_histogram(self.overhead, self._overhead, self._overhead_sum)
            self._overhead_sum = 0.0
        for (endpoint, i), n in self._endpoints.items():
            child = self._c_endpoints.get((endpoint, STATUS_CLASSES[i - 1]))
            if child is None:
                child = self._c_endpoints[(endpoint, STATUS_CLASSES[i - 1])] = \
                    self.endpoint_requests.labels(endpoint, STATUS_CLASSES[i - 1])
            child.inc(n)
        self._endpoints.clear()
        self._drain(self._scopes, self._c_scopes)
        self._drain(self._reasons, self._c_reasons)
        for up in self.router.upstreams:
            for reason, total in up.failures.items():
                key = (up.name, reason)
                delta = total - self._seen.get(key, 0)
                if delta:
                    self._seen[key] = total
                    self._c_upstream[key].inc(delta)
            self._g_healthy[up.name].set(1 if up.healthy else 0)
        self.active_streams.set(self.streams.open)
        usage = self.usage
        self.queue_depth.set(usage.backlog)
        self.writer_stalled.set(1 if usage.stalled else 0)
        self.rows_written.inc(usage.rows_written - self._seen_rows)
        self.flush_errors.inc(usage.flush_errors - self._seen_errors)
        self._seen_rows, self._seen_errors = usage.rows_written, usage.flush_errors
        billing = self.billing
        if billing is not None:
            self.over_reservation.inc(billing.overruns - self._seen_overruns)
            self._seen_overruns = billing.overruns
        limits = self.limits
        if limits is not None:
            link = limits.link
            now = (link.round_trips, link.failures, limits.local_admissions)
            seen, self._seen_redis = self._seen_redis, now
            self.redis_up.set(1 if link.up else 0)
            self.redis_round_trips.inc(now[0] - seen[0])
            self.redis_errors.inc(now[1] - seen[1])
            self.limiter_fail_open.inc(now[2] - seen[2])
        leases = self.leases
        written_off = usage.written_off_nano + (
            0 if leases is None else leases.store.written_off_nano)
        self.written_off.inc(written_off - self._seen_written_off)
        self._seen_written_off = written_off
        if leases is not None:
            for op, total in leases.store.round_trips.items():
                self.money_trips.labels(op).inc(total - self._seen_trips.get(op, 0))
                self._seen_trips[op] = total
            self.leases_frozen.set(1 if billing is not None and billing.frozen else 0)
        access = self.access_log
        if access is not None:
            # AccessLog.dropped only grows, and only on the loop, like this sync.
            self.access_dropped.inc(access.dropped - self._seen_dropped)
            self._seen_dropped = access.dropped

    @staticmethod
    def _drain(pending: dict[str, int], children: dict[str, Any]) -> None:
        for key, n in pending.items():
            children[key].inc(n)
        pending.clear()

    def exposition(self) -> bytes:
        """The text format; thread-safe (prometheus_client's values carry their own locks)."""
        return generate_latest(self.registry)


    def close(self) -> None:
        """At shutdown: the last deltas into the files, and this worker marked dead."""
        if self.multiprocess:
            self.sync()
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


# --- the /metrics endpoint --------------------------------------------------------

class MetricsEndpoint:
    """GET /metrics: bearer token (when configured), then the exposition built off the loop."""

    def __init__(self, metrics: Metrics, token: str | None) -> None:
        self.metrics = metrics
        self._expected = f"Bearer {token}".encode() if token else None
        self._lock = asyncio.Lock()  # one exposition at a time, however many scrapers

    async def handle(self, request: web.Request) -> web.Response:
        if self._expected is not None:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, self._expected):
                return web.Response(status=401, text="metrics: bearer token required\n",
                                    headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
        async with self._lock:
            self.metrics.sync()
            # A thread: with many series, or the multiprocess files to read, this
            # takes milliseconds that requests must not wait for.
            body = await asyncio.get_running_loop().run_in_executor(
                None, self.metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
