"""The operator API fuzzed from its OpenAPI description, logged in as an operator.

test_fuzz_api.py fuzzes /api/admin/ as an account holder (every answer a 403); here
the fuzzer holds the role, so its cases reach the handlers: amounts, notes, limits
and ids of every shape. Its own gateway: the fuzzer may disable accounts and revoke
keys, the other module's included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis

from tests.conftest import raw_config
from tests.support import LiveGateway, LiveMock
from tests.web.test_fuzz_api import TIMEOUT_S, _fuzz, _login, _operations, _scan_and_ping


@pytest.fixture(scope="module")
def operator_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveGateway, Any]]:
    tmp = tmp_path_factory.mktemp("fuzz-admin")
    mock = LiveMock(tmp).start()
    gw = LiveGateway(tmp, raw_config(tmp, {"local": mock.base_url})).start()
    gw.admin("grant-operator", gw.email)
    schema = schemathesis.openapi.from_dict(
        requests.get(gw.console_url + "/openapi.json", timeout=TIMEOUT_S).json())
    try:
        yield gw, schema
    finally:
        gw.stop()
        mock.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fuzzing_the_operator_api_as_an_operator_finds_no_5xx_no_traceback_and_no_leak(
        operator_plane: tuple[LiveGateway, Any]) -> None:
    gw, schema = operator_plane
    ops = _operations(schema, "/api/admin/")
    assert len(ops) == 10
    for op in ops:
        gw.admin("enable-account", gw.email)  # the fuzzer may have disabled itself
        cookies, csrf = _login(gw)
        _fuzz(op, gw.console_url, "control", csrf, cookies)
    _scan_and_ping(gw)
    # Whatever it did, the books balance and no balance is below zero.
    gw.admin("enable-account", gw.email)
    cookies, _ = _login(gw)
    account = requests.get(gw.console_url + "/api/account", cookies=cookies,
                           timeout=TIMEOUT_S).json()
    assert account["balance_nano"] >= 0 and account["operator"] is True
    # And its cases reached the handlers (not only 400s and 404s): actions were audited.
    audit = requests.get(gw.console_url + "/api/admin/audit", cookies=cookies,
                         timeout=TIMEOUT_S).json()["data"]
    assert len({e["action"] for e in audit}) > 2, audit
