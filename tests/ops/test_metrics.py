"""/metrics after real traffic: exact deltas, bounded labels, auth, its own port, multiprocess."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from bisect import bisect_left
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flintproxy.gate.gate import Admission, Call, Ending, Outcome, Principal
from flintproxy.ops.metrics import (
    OTHER,
    OUTCOMES,
    REJECT_REASONS,
    SCOPES,
    STATUS_CLASSES,
    _push_histogram,
)
from flintproxy.relay.routing import FAILURE_REASONS
from tests.conftest import MODELS, Gateway, MockServer, raw_config

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
REPO = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# Every label and the values it may take (model: configured names or "other").
BOUNDED = {
    "model": {*MODELS, OTHER},
    "status": set(STATUS_CLASSES),
    "outcome": set(OUTCOMES),
    "kind": {"prompt", "completion"},
    "scope": {*SCOPES.values(), OTHER},
    "upstream": {"local", "dead", "spare"},
}
REASONS = {*FAILURE_REASONS, *REJECT_REASONS.values(), "model_not_found", OTHER}


def sdk(gw: Gateway, key: str | None = None, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key or gw.key, max_retries=0,
                              default_headers=headers or None)


async def scrape_text(gw: Gateway, url: str | None = None, **headers: str) -> str:
    async with aiohttp.ClientSession() as http, \
            http.get(url or gw.console_url + "/metrics", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return await resp.text()


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(gw: Gateway) -> Samples:
    return parse(await scrape_text(gw))


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return val(after, name, **labels) - val(before, name, **labels)


def total_delta(before: Samples, after: Samples, name: str) -> float:
    return (sum(v for (n, _), v in after.items() if n == name)
            - sum(v for (n, _), v in before.items() if n == name))


def assert_bounded(text: str, *secrets: str) -> None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for label, value in s.labels.items():
                if label == "le":
                    continue
                if label == "reason":
                    assert value in REASONS, (s.name, value)
                else:
                    assert value in BOUNDED[label], (s.name, label, value)
    for secret in (*secrets, "127.0.0.1", "@", "example.com"):
        assert secret not in text


async def wait_for(predicate: Any, what: str) -> None:
    for _ in range(300):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_traffic_moves_counters_by_exact_amounts(gateway: Gateway,
                                                       mock_upstream: MockServer) -> None:
    before = await scrape(gateway)
    async with sdk(gateway) as client:
        ok = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    async with sdk(gateway, key="sk-flint-not-a-real-key") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with sdk(gateway, **{"x-mock-fault": "http500"}) as client:
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert failed.value.status_code == 502
    async with aiohttp.ClientSession() as http:  # a client that leaves mid-stream
        resp = await http.post(
            gateway.base_url + "/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {gateway.key}", "x-mock-fault": "endless",
                     "x-mock-delay-ms": "5"})
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: ")
        resp.close()

    async def disconnect_counted() -> bool:
        s = await scrape(gateway)
        return delta(before, s, "flintproxy_request_outcomes_total", model="gpt-4o-mini",
                     outcome="client_disconnect") == 1
    await wait_for(disconnect_counted, "the disconnected stream to finish")
    text = await scrape_text(gateway)
    after = parse(text)
    assert_bounded(text, gateway.key)

    def d(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    mini = "gpt-4o-mini"
    # Requests: 2 ok + 1 disconnected stream (its 200 was sent), 1 upstream 5xx -> 502,
    # 2 refused before admission (404 unknown model, 401 bad key) under "other".
    assert d("flintproxy_requests_total", model=mini, status="2xx") == 3
    assert d("flintproxy_requests_total", model=mini, status="5xx") == 1
    assert d("flintproxy_requests_total", model=OTHER, status="4xx") == 2
    assert total_delta(before, after, "flintproxy_requests_total") == 6
    for outcome, n in (("ok", 2), ("client_disconnect", 1), ("upstream_error", 1)):
        assert d("flintproxy_request_outcomes_total", model=mini, outcome=outcome) == n
    assert d("flintproxy_request_outcomes_total", model=OTHER, outcome="rejected") == 2
    assert total_delta(before, after, "flintproxy_request_outcomes_total") == 6
    assert d("flintproxy_rejected_total", reason="unauthenticated") == 1
    assert d("flintproxy_rejected_total", reason="model_not_found") == 1
    assert total_delta(before, after, "flintproxy_rejected_total") == 2
    assert d("flintproxy_upstream_errors_total", upstream="local", reason="http_5xx") == 1
    assert total_delta(before, after, "flintproxy_upstream_errors_total") == 1
    assert total_delta(before, after, "flintproxy_rate_limited_total") == 0
    # Histograms: duration for the 4 admitted requests; first byte for the 3 that sent one.
    assert d("flintproxy_request_duration_seconds_count", model=mini) == 4
    assert d("flintproxy_request_duration_seconds_bucket", model=mini, le="+Inf") == 4
    assert d("flintproxy_request_duration_seconds_sum", model=mini) > 0
    assert d("flintproxy_time_to_first_byte_seconds_count", model=mini) == 3
    assert d("flintproxy_overhead_seconds_count") == 3
    assert 0 < d("flintproxy_overhead_seconds_sum") < d(
        "flintproxy_time_to_first_byte_seconds_sum", model=mini)
    assert total_delta(before, after, "flintproxy_request_duration_seconds_count") == 4
    # Tokens and cost equal the usage ledger's, to the token.
    assert await gateway.components.usage.sync(5)
    rows = await gateway.components.usage_db.fetch(
        "SELECT SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_nano), COUNT(*) "
        "FROM usage WHERE model = ?", mini)
    prompt, completion, cost_nano, n = rows[0]
    assert n == 4
    assert ok.usage is not None and chunks[-1].usage is not None
    assert prompt >= ok.usage.prompt_tokens + chunks[-1].usage.prompt_tokens
    assert d("flintproxy_tokens_total", model=mini, kind="prompt") == prompt
    assert d("flintproxy_tokens_total", model=mini, kind="completion") == completion
    assert d("flintproxy_cost_total", model=mini) == pytest.approx(cost_nano / 1e9, abs=1e-12)
    assert val(after, "flintproxy_active_streams") == 0
    assert val(after, "flintproxy_upstream_healthy", upstream="local") == 1
    assert val(after, "flintproxy_usage_queue_depth") >= 0


async def test_rate_limits_and_insufficient_balance(tmp_path: Path, mock_upstream: MockServer,
                                                    gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["limits"] = {"default_rpm": 1, "ip_failures_before_block": 1}
    gw = await gateway_factory(raw)
    before = await scrape(gw)
    async with sdk(gw) as client:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    async with sdk(gw, key="sk-flint-wrong") as client:
        with pytest.raises(openai.RateLimitError):  # the failure that blocks the address
            await client.models.list()
        with pytest.raises(openai.RateLimitError):  # blocked
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    after = await scrape(gw)
    assert delta(before, after, "flintproxy_rate_limited_total", scope="requests") == 1
    # Every 429 of ours counts here, /v1/models included.
    assert delta(before, after, "flintproxy_rate_limited_total", scope="failed_auth") == 2
    assert total_delta(before, after, "flintproxy_rate_limited_total") == 3
    # The 429 after parsing carries its model; the IP block came before the body was read.
    assert delta(before, after, "flintproxy_requests_total", model="gpt-4o", status="4xx") == 1
    assert delta(before, after, "flintproxy_requests_total", model=OTHER, status="4xx") == 1
    assert delta(before, after, "flintproxy_rejected_total", reason="rate_limited") == 2
    # GET /v1/models is not a relay request: its 429 is not in requests_total.
    assert total_delta(before, after, "flintproxy_requests_total") == 3

    poor = await gateway_factory(raw_config(tmp_path / "poor", {"local": mock_upstream.base_url}),
                                 credit_nano=1)
    before = await scrape(poor)
    async with sdk(poor) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert refused.value.status_code == 402
    after = await scrape(poor)
    assert delta(before, after, "flintproxy_rejected_total", reason="insufficient_balance") == 1
    assert delta(before, after, "flintproxy_requests_total", model="gpt-4o", status="4xx") == 1
    assert delta(before, after, "flintproxy_request_outcomes_total", model="gpt-4o",
                 outcome="rejected") == 1
    assert total_delta(before, after, "flintproxy_request_duration_seconds_count") == 0


async def test_upstream_errors_by_reason_and_health(tmp_path: Path, mock_upstream: MockServer,
                                                    gateway_factory: Any,
                                                    unused_tcp_port: int) -> None:
    raw = raw_config(tmp_path, {"dead": f"http://127.0.0.1:{unused_tcp_port}/v1",
                                "spare": mock_upstream.base_url})
    raw["upstreams"][0]["failure_threshold"] = 1
    raw["upstreams"][1]["priority"] = 1
    gw = await gateway_factory(raw)
    before = await scrape(gw)
    async with sdk(gw) as client:  # dead refuses the connection, spare answers
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    text = await scrape_text(gw)
    after = parse(text)
    assert_bounded(text, gw.key)
    assert delta(before, after, "flintproxy_upstream_errors_total", upstream="dead",
                 reason="connect") == 1
    assert total_delta(before, after, "flintproxy_upstream_errors_total") == 1
    assert val(after, "flintproxy_upstream_healthy", upstream="dead") == 0
    assert val(after, "flintproxy_upstream_healthy", upstream="spare") == 1
    assert delta(before, after, "flintproxy_requests_total", model="gpt-4o-mini",
                 status="2xx") == 1

    single = await gateway_factory(raw_config(tmp_path / "single",
                                              {"local": mock_upstream.base_url}))
    before = await scrape(single)
    async with sdk(single, **{"x-mock-fault": "http429"}) as client:
        with pytest.raises(openai.RateLimitError):  # the upstream's own 429, passed through
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    after = await scrape(single)
    assert delta(before, after, "flintproxy_upstream_errors_total", upstream="local",
                 reason="http_429") == 1
    # An upstream's 429 is not one of our rate limits, nor a refusal.
    assert total_delta(before, after, "flintproxy_rate_limited_total") == 0
    assert total_delta(before, after, "flintproxy_rejected_total") == 0
    assert delta(before, after, "flintproxy_requests_total", model="gpt-4o-mini",
                 status="4xx") == 1
    assert delta(before, after, "flintproxy_request_outcomes_total", model="gpt-4o-mini",
                 outcome="upstream_error") == 1


async def test_metrics_behind_a_bearer_token(tmp_path: Path, mock_upstream: MockServer,
                                             gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["metrics"] = {"bearer_token_env": "FLINT_METRICS_TOKEN"}
    gw = await gateway_factory(raw, {"FLINT_METRICS_TOKEN": "scrape-me-0123456789"})
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Bearer {gw.key}"}):
            async with http.get(gw.console_url + "/metrics", headers=headers) as resp:
                assert resp.status == 401
                assert "flintproxy_" not in await resp.text()
    text = await scrape_text(gw, Authorization="Bearer scrape-me-0123456789")
    assert "flintproxy_requests_total" in text


async def test_metrics_on_their_own_port(tmp_path: Path, mock_upstream: MockServer,
                                         gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["metrics"] = {"port": 0}
    gw = await gateway_factory(raw)
    port = gw.server.metrics_addresses[0][1]
    async with sdk(gw) as client:
        await client.embeddings.create(model="text-embedding-3-small", input="x")
    async with aiohttp.ClientSession() as http, http.get(gw.console_url + "/metrics") as resp:
        assert resp.status == 404  # not on the main port
    samples = parse(await scrape_text(gw, f"http://127.0.0.1:{port}/metrics"))
    assert val(samples, "flintproxy_requests_total", model="text-embedding-3-small",
               status="2xx") == 1


async def test_usage_writer_metrics(gateway: Gateway) -> None:
    before = await scrape(gateway)
    async with sdk(gateway) as client:
        for _ in range(3):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert await gateway.components.usage.sync(5)
    after = await scrape(gateway)
    assert delta(before, after, "flintproxy_usage_rows_written_total") == 3
    assert delta(before, after, "flintproxy_usage_batch_rows_sum") == 3
    flushes = delta(before, after, "flintproxy_usage_flush_seconds_count")
    assert flushes >= 1
    assert delta(before, after, "flintproxy_usage_batch_rows_count") == flushes
    assert val(after, "flintproxy_usage_queue_depth") == 0
    assert val(after, "flintproxy_usage_writer_stalled") == 0
    assert total_delta(before, after, "flintproxy_usage_flush_errors_total") == 0


class FullDisk:
    """An access log sink that refuses writes while ``failing``."""

    failing = True

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes | bytearray, /) -> int:
        if self.failing:
            raise OSError(28, "No space left on device")
        self.written += data
        return len(data)

    def flush(self) -> None:
        pass


async def test_access_log_dropped_lines(gateway: Gateway) -> None:
    access = gateway.components.access_log
    sink = access.sink = FullDisk()
    name = "flintproxy_access_log_dropped_lines_total"
    before = await scrape(gateway)
    assert (name, ()) in before  # there, at 0, before anything is lost
    async with sdk(gateway) as client:
        for _ in range(3):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    async def dropped_3() -> bool:
        await access.flush()  # what the flusher does every FLUSH_S, now
        return delta(before, await scrape(gateway), name) == 3

    await wait_for(dropped_3, "3 dropped lines")
    assert access.dropped == 3
    sink.failing = False  # recovered: the next line is written, the counter stays
    async with sdk(gateway) as client:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    async def written() -> bool:
        await access.flush()
        return sink.written.count(b"\n") == 1

    await wait_for(written, "the line written")
    assert delta(before, await scrape(gateway), name) == 3


def test_pushed_histogram_matches_observed() -> None:
    values = [0.0, 0.00004, 0.0003, 0.0009, 0.02, 7.0, 1e9]
    reg_a, reg_b = CollectorRegistry(), CollectorRegistry()
    buckets = (0.0001, 0.001, 0.01, 1.0)
    a = Histogram("h_seconds", "h", buckets=buckets, registry=reg_a)
    b = Histogram("h_seconds", "h", buckets=buckets, registry=reg_b)
    counts = [0] * (len(buckets) + 1)
    for v in values:
        a.observe(v)
        counts[bisect_left(buckets, v)] += 1
    _push_histogram(b, counts, sum(values))

    def samples(reg: CollectorRegistry) -> Samples:
        return {k: v for k, v in parse(generate_latest(reg).decode()).items()
                if not k[0].endswith("_created")}
    assert samples(reg_a) == samples(reg_b)
    assert val(samples(reg_b), "h_seconds_bucket", le="0.001") == 4
    assert counts == [0] * len(counts)


async def test_status_classes_at_the_edges(gateway: Gateway) -> None:
    metrics = gateway.components.metrics
    call = Call("chat/completions", "gpt-4o", False, 1, None, "req_x")
    admission = Admission(call, Principal(key_id=1, account_id=1), 0.0, 0)
    before = await scrape(gateway)
    # Gone before any status was sent: the relay records nginx's 499, a 4xx.
    metrics.finished(admission, Outcome(status=499, outcome=Ending.CLIENT_DISCONNECT), 0)
    metrics.finished(admission, Outcome(status=302, outcome=Ending.UPSTREAM_ERROR), 0)
    metrics.finished(admission, Outcome(status=999, outcome=Ending.ERROR), 0)
    text = await scrape_text(gateway)
    after = parse(text)
    assert_bounded(text, gateway.key)
    for status, n in (("4xx", 1), ("3xx", 1), ("5xx", 1)):
        assert delta(before, after, "flintproxy_requests_total", model="gpt-4o",
                     status=status) == n
    assert ("flintproxy_requests_total", (("model", "gpt-4o-mini"), ("status", "3xx"))) \
        not in after  # created on first use only


def test_each_gateway_has_its_own_registry(gateway: Gateway) -> None:
    from prometheus_client import REGISTRY

    assert gateway.components.metrics.registry is not REGISTRY
    assert not any(n.startswith("flintproxy_") for n in REGISTRY._names_to_collectors)


MULTIPROCESS_SCRIPT = """
import asyncio, json, os, sys
from pathlib import Path
import aiohttp
from tests.conftest import raw_config, start_gateway, start_mock

async def main():
    mock = await start_mock()
    gw = await start_gateway(raw_config(Path(sys.argv[1]), {"local": mock.base_url}))
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.base_url + "/chat/completions",
                             json={"model": "gpt-4o-mini",
                                   "messages": [{"role": "user", "content": "hi"}]},
                             headers={"Authorization": "Bearer " + gw.key}) as r:
            assert r.status == 200, await r.text()
        async with http.get(gw.console_url + "/metrics") as r:
            text = await r.text()
    await gw.server.shutdown()
    await mock.runner.cleanup()
    files = sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    print(json.dumps({"text": text, "files": files}))

asyncio.run(main())
"""


@pytest.mark.slow
async def test_multiprocess_mode(tmp_path: Path) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    env: Mapping[str, str] = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MULTIPROCESS_SCRIPT, str(tmp_path), cwd=REPO, env=dict(env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    samples = parse(result["text"])
    assert val(samples, "flintproxy_requests_total", model="gpt-4o-mini", status="2xx") == 1
    assert val(samples, "flintproxy_request_duration_seconds_count", model="gpt-4o-mini") == 1
    assert ("flintproxy_active_streams", ()) in samples  # livesum: no pid label
    assert any(f.startswith("counter_") for f in result["files"])
    # The worker marked itself dead at shutdown: its live gauges are gone.
    assert not any(f.startswith("gauge_live") for f in result["files"])
