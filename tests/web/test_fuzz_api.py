"""Both planes fuzzed from their OpenAPI description (``GET /openapi.json``).

schemathesis draws requests from the served description, valid and invalid alike
(wrong types, missing fields, unknown fields, hostile strings), and sends them to a
gateway process: /v1 with a valid API key on the data plane, /api with a logged-in
session and its CSRF token on the control plane. Each answer must be below 500
(upstream 502/504 excepted on /v1) and carry no traceback; afterwards nothing the
fuzzer sent as a secret may be on disk or in the logs, and both planes still serve.
Examples are bounded (``EXAMPLES`` per operation and mode) to keep CI time small.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from flintproxy.web.openapi import SPEC
from tests.conftest import raw_config
from tests.support import LeakScanner, LiveGateway, LiveMock

EXAMPLES = 20  # per operation and generation mode
TIMEOUT_S = 15.0
UPSTREAM_STATUSES = frozenset({502, 504})


@pytest.fixture(scope="module")
def planes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveGateway, Any]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    mock = LiveMock(tmp, ["--chunks", "3"]).start()
    raw = raw_config(tmp, {"local": mock.base_url})
    # The fuzzer is one client sending thousands of requests: lift its limits.
    raw["limits"] = {"default_rpm": 1_000_000, "default_tpm": 1_000_000_000}
    gw = LiveGateway(tmp, raw).start()
    served = requests.get(gw.console_url + "/openapi.json", timeout=TIMEOUT_S)
    assert served.status_code == 200
    schema = schemathesis.openapi.from_dict(served.json())
    try:
        yield gw, schema
    finally:
        gw.stop()
        mock.stop()


def test_the_openapi_description_is_served_as_shipped(planes: tuple[LiveGateway, Any]) -> None:
    gw, _ = planes
    served = requests.get(gw.console_url + "/openapi.json", timeout=TIMEOUT_S)
    assert served.headers["Content-Type"].startswith("application/json")
    doc = served.json()
    assert doc == json.loads(SPEC) and doc["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/embeddings", "/api/login", "/api/usage"} <= set(
        doc["paths"])
    # The data plane serves none of it.
    assert requests.get(gw.url + "/openapi.json", timeout=TIMEOUT_S).status_code == 404


def _login(gw: LiveGateway) -> tuple[dict[str, str], dict[str, str]]:
    # The fuzzer's failed logins slow this address down (the IP guard): wait it out.
    deadline = time.monotonic() + 20
    while True:
        answer = requests.post(gw.console_url + "/api/login", timeout=TIMEOUT_S,
                               json={"email": gw.email, "password": gw.password})
        if answer.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(float(answer.headers.get("Retry-After", "1")))
    assert answer.status_code == 200, answer.text
    return dict(answer.cookies), {"X-CSRF-Token": answer.json()["csrf_token"]}


def _check(case: Any, response: requests.Response, plane: str) -> None:
    status = response.status_code
    upstream_ok = plane == "data" and status in UPSTREAM_STATUSES
    assert status < 500 or upstream_ok, (
        f"{status} for {case.method} {case.formatted_path}: {response.text[:500]}")
    text = response.text if len(response.content) < 1_000_000 else ""
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    if status >= 400 and response.headers.get("Content-Type", "").startswith(
            "application/json"):
        error = response.json().get("error")
        assert isinstance(error, dict) and isinstance(error.get("message"), str), text[:500]


def _operations(schema: Any, prefix: str) -> list[Any]:
    ops = [op.ok() for op in schema.get_all_operations()]
    return [op for op in ops if op.path.startswith(prefix)]


def _fuzz(op: Any, base_url: str, plane: str, headers: dict[str, str],
          cookies: dict[str, str]) -> None:
    cases = st.one_of(op.as_strategy(GenerationMode.POSITIVE),
                      op.as_strategy(GenerationMode.NEGATIVE))

    @settings(max_examples=EXAMPLES * 2, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case: Any) -> None:
        sent = dict(case.headers or {})
        response = case.call(base_url=base_url, headers=sent | headers, cookies=cookies,
                             timeout=TIMEOUT_S)
        _check(case, response, plane)

    run()


def _scan_and_ping(gw: LiveGateway) -> None:
    scanner = LeakScanner()
    scanner.add(gw.key, gw.password)
    scanner.assert_clean(data_dirs=[gw.data_dir], logs=gw.logs())
    assert "Traceback" not in gw.stderr, gw.stderr[-3000:]
    assert requests.get(gw.url + "/healthz", timeout=TIMEOUT_S).status_code == 200
    assert requests.get(gw.console_url + "/openapi.json", timeout=TIMEOUT_S).ok


@pytest.mark.slow
def test_fuzzing_the_data_plane_finds_no_5xx_no_traceback_and_no_leak(
        planes: tuple[LiveGateway, Any]) -> None:
    gw, schema = planes
    ops = _operations(schema, "/v1/") + _operations(schema, "/healthz")
    assert len(ops) >= 4
    auth = {"Authorization": f"Bearer {gw.key}"}
    for op in ops:
        _fuzz(op, gw.url, "data", auth, {})
    _scan_and_ping(gw)


@pytest.mark.slow
def test_fuzzing_the_control_plane_finds_no_5xx_no_traceback_and_no_leak(
        planes: tuple[LiveGateway, Any]) -> None:
    gw, schema = planes
    # Login and signup last: their failures make the IP guard slow this client down.
    ops = sorted(_operations(schema, "/api/"),
                 key=lambda op: op.path in ("/api/login", "/api/signup"))
    assert len(ops) >= 10
    for op in ops:
        cookies, csrf = _login(gw)  # a fuzzed logout or failed CSRF never starves the rest
        _fuzz(op, gw.console_url, "control", csrf, cookies)
    _scan_and_ping(gw)


def test_a_huge_usage_time_is_a_400_not_a_500(planes: tuple[LiveGateway, Any]) -> None:
    gw, _ = planes
    cookies, _ = _login(gw)
    answer = requests.get(gw.console_url + "/api/usage", cookies=cookies, timeout=TIMEOUT_S,
                          params={"since": "99999999999999999999"})
    assert answer.status_code == 400, answer.text


def test_deeply_nested_json_is_a_400_not_a_500(planes: tuple[LiveGateway, Any]) -> None:
    gw, _ = planes
    deep = "[" * 300 + "]" * 300
    body = ('{"model": "gpt-4o-mini", "stream": true, "stream_options": {"x": ' + deep + "},"
            ' "messages": [{"role": "user", "content": "hi"}]}')
    answer = requests.post(gw.url + "/v1/chat/completions", data=body, timeout=TIMEOUT_S,
                           headers={"Authorization": f"Bearer {gw.key}",
                                    "Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert "Traceback" not in answer.text
