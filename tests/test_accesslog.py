"""The access log: one JSON line per /v1 request, the promised fields, no content, no IP."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from flintproxy.accesslog import LOGGER, configure
from flintproxy.config import MetricsConfig
from flintproxy.relay import Relay
from tests.conftest import Gateway, MockServer, raw_config

MARKER = "CONTENT-MARKER-7f3a9c"
MESSAGES: list[Any] = [{"role": "user", "content": f"Say hello {MARKER}"}]
FIELDS = {"ts", "request_id", "method", "path", "status", "model", "upstream", "duration_ms",
          "ttfb_ms", "prompt_tokens", "completion_tokens", "outcome"}


@pytest.fixture
def access_lines(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """The raw access lines logged during the test, read at assertion time."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    lines: list[str] = []

    class Tap(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name == LOGGER:
                lines.append(record.getMessage())

    tap = Tap()
    logging.getLogger(LOGGER).addHandler(tap)
    yield lines
    logging.getLogger(LOGGER).removeHandler(tap)


def sdk(gw: Gateway, key: str | None = None, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key or gw.key, max_retries=0,
                              default_headers=headers or None)


async def wait_idle(gw: Gateway, lines: list[str], n: int) -> None:
    relay = next(v for v in gw.app.values() if isinstance(v, Relay))
    for _ in range(300):
        if relay.active_streams == 0 and len(lines) >= n:
            return
        await asyncio.sleep(0.01)


async def test_one_json_line_per_request_without_content_or_ip(
        gateway: Gateway, mock_upstream: MockServer, access_lines: list[str]) -> None:
    async with sdk(gateway) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES)
        ok_id = raw.headers["x-request-id"]
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                      stream=True)
        _ = [c async for c in stream]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model=f"model-{MARKER}", messages=MESSAGES)
    async with sdk(gateway, key="sk-flint-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.embeddings.create(model="text-embedding-3-small", input=MARKER)
    async with sdk(gateway, **{"x-mock-fault": "http500"}) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            gateway.base_url + "/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {gateway.key}", "x-mock-fault": "endless",
                     "x-mock-delay-ms": "5"})
        await resp.content.readline()
        resp.close()
    await wait_idle(gateway, access_lines, 6)

    assert len(access_lines) == 6
    for line in access_lines:
        for secret in (MARKER, gateway.key, "127.0.0.1", "@", "Say hello"):
            assert secret not in line
    entries = [json.loads(line) for line in access_lines]
    for e in entries:
        assert e.keys() >= FIELDS, e
        assert e["method"] == "POST"
        assert e["ts"].endswith("Z")
        assert "client_ip" not in e
    ok, streamed, unknown, unauth, failed, gone = entries
    assert ok["request_id"] == ok_id
    assert (ok["path"], ok["status"], ok["model"], ok["upstream"], ok["outcome"]) == (
        "/v1/chat/completions", 200, "gpt-4o-mini", "local", "ok")
    assert ok["completion_tokens"] == 20 and ok["prompt_tokens"] > 0
    assert ok["duration_ms"] > 0 and ok["ttfb_ms"] > 0
    assert (streamed["model"], streamed["stream"], streamed["outcome"]) == ("gpt-4o", True, "ok")
    assert streamed["completion_tokens"] == 20
    # The unknown model name is the client's text: logged as "other", like the metric.
    assert (unknown["status"], unknown["model"], unknown["outcome"], unknown["error"]) == (
        404, "other", "rejected", "model_not_found")
    assert unknown["request_id"].startswith("req_")
    assert (unauth["status"], unauth["path"], unauth["request_id"]) == (
        401, "/v1/embeddings", None)
    assert (failed["status"], failed["outcome"], failed["ttfb_ms"]) == (
        502, "upstream_error", None)
    assert (gone["status"], gone["outcome"]) == (200, "client_disconnect")


async def test_client_ip_only_when_opted_in(tmp_path: Path, mock_upstream: MockServer,
                                            gateway_factory: Any,
                                            access_lines: list[str]) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["metrics"] = {"log_client_ip": True}
    gw = await gateway_factory(raw)
    async with sdk(gw) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with sdk(gw, key="sk-flint-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert [json.loads(line)["client_ip"] for line in access_lines] == ["127.0.0.1"] * 2


async def test_access_log_off(tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any,
                              access_lines: list[str]) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["metrics"] = {"access_log": False}
    gw = await gateway_factory(raw)
    async with sdk(gw) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert access_lines == []


async def test_non_v1_paths_are_not_logged(gateway: Gateway, access_lines: list[str]) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/api/account") as resp:
            assert resp.status == 401
        async with http.get(gateway.url + "/v1/nothing-here") as resp:
            assert resp.status == 404
    assert len(access_lines) == 1
    entry = json.loads(access_lines[0])
    assert (entry["status"], entry["path"], entry["method"]) == (404, None, "GET")


def test_configure_writes_bare_json_lines_to_the_stream() -> None:
    logger = logging.getLogger(LOGGER)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    try:
        out = io.StringIO()
        configure(MetricsConfig(), out)
        configure(MetricsConfig(), out)  # idempotent: still one handler
        logger.info('{"a":1}')
        assert out.getvalue() == '{"a":1}\n'
        assert not logger.propagate
        configure(MetricsConfig(access_log=False), out)
        logger.info('{"b":2}')
        assert out.getvalue() == '{"a":1}\n'
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]
