"""End-to-end: the shipped gate (keys, IP guard, limits, balance, usage) on real servers."""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import openai
import pytest

from tests.conftest import Gateway, MockServer, raw_config

RATELIMIT_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                     "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
                     "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def _read_all(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (the data dir: DB, -wal, -shm), by name."""
    return {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def sdk(gw: Gateway, key: str | None = None, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key or gw.key, max_retries=0,
                              default_headers=headers or None)


async def chat(client: openai.AsyncOpenAI, content: str = "hi") -> Any:
    return await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], max_tokens=50)


async def test_key_rpm_limit_and_headers(gateway: Gateway) -> None:
    repo = gateway.components.accounts
    key_id = (await repo.list_keys(gateway.account_id))[0].id
    await repo.set_limits(gateway.account_id, key_id, rpm=3, tpm=None, max_concurrent=None)
    async with sdk(gateway) as client:
        remaining = []
        for _ in range(3):
            raw = await chat(client)
            assert all(h in raw.headers for h in RATELIMIT_HEADERS)
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert remaining == [2, 1, 0]
        with pytest.raises(openai.RateLimitError) as info:
            await chat(client)
    err = info.value
    assert err.code == "rate_limit_requests"
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "requests per min" in err.message


async def test_account_concurrency_cap_with_real_streams(gateway: Gateway) -> None:
    repo = gateway.components.accounts
    await repo.set_limits(gateway.account_id, None, rpm=None, tpm=None, max_concurrent=2)
    await asyncio.sleep(0.01)
    async with sdk(gateway, **{"x-mock-delay-ms": "30"}) as slow, sdk(gateway) as fast:
        streams = [await slow.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True)
            for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as info:
            await chat(fast)
        assert info.value.code == "rate_limit_concurrency"
        for s in streams:
            async for _ in s:
                pass
        assert (await chat(fast)).http_response.status_code == 200


async def test_tpm_reserve_and_true_up(gateway: Gateway) -> None:
    repo = gateway.components.accounts
    key_id = (await repo.list_keys(gateway.account_id))[0].id
    await repo.set_limits(gateway.account_id, key_id, rpm=None, tpm=1000, max_concurrent=None)
    async with sdk(gateway) as client:
        first = await chat(client)
        # Reserved prompt estimate + max_tokens (50), then trued up to the real usage
        # (the mock's 20 completion tokens plus its prompt count).
        used = 1000 - int(first.headers["x-ratelimit-remaining-tokens"])
        assert 50 < used < 200
        second = await chat(client)
        remaining = int(second.headers["x-ratelimit-remaining-tokens"])
        assert remaining > 1000 - 2 * used, "the first reservation was not trued up"


async def test_insufficient_balance_is_402(tmp_path: Path, mock_upstream: MockServer,
                                           gateway_factory: Any) -> None:
    gw = await gateway_factory(raw_config(tmp_path, {"local": mock_upstream.base_url}),
                               credit_nano=10_000)  # $0.00001: less than one request
    async with sdk(gw) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await chat(client)
    assert info.value.status_code == 402
    assert info.value.code == "insufficient_quota"
    assert "x-ratelimit-limit-requests" in info.value.response.headers


async def test_bad_key_flood_from_one_ip_is_blocked(tmp_path: Path, mock_upstream: MockServer,
                                                    gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["limits"] = {"ip_rpm": 5, "ip_failures_before_block": 50}
    gw = await gateway_factory(raw)
    statuses = []
    async with sdk(gw, key="sk-flint-" + "x" * 40) as bad:
        for _ in range(8):
            try:
                await chat(bad)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
    assert statuses[:3] == [401, 401, 401]
    assert statuses[-1] == 429


async def test_a_valid_key_authenticates_from_an_address_that_sent_bad_keys(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any) -> None:
    # One client behind a NAT must not lock out everyone else behind it.
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["limits"] = {"ip_failures_before_block": 3}
    gw = await gateway_factory(raw)
    async with sdk(gw, key="sk-flint-" + "x" * 40) as bad:
        for _ in range(5):
            with pytest.raises(openai.APIStatusError):
                await chat(bad)
        with pytest.raises(openai.RateLimitError) as info:
            await chat(bad)  # the failures are still slowed
    assert info.value.code == "too_many_failed_attempts"
    async with sdk(gw) as good:
        raw_resp = await chat(good)
    assert raw_resp.http_response.status_code == 200


async def test_a_request_larger_than_the_tpm_limit_is_refused_without_retries(
        gateway: Gateway) -> None:
    repo = gateway.components.accounts
    key_id = (await repo.list_keys(gateway.account_id))[0].id
    await repo.set_limits(gateway.account_id, key_id, rpm=None, tpm=100, max_concurrent=None)
    sent: list[str] = []

    async def count(request: httpx2.Request) -> None:
        sent.append(request.url.path)

    async with httpx2.AsyncClient(event_hooks={"request": [count]}) as http, \
            openai.AsyncOpenAI(base_url=gateway.base_url, api_key=gateway.key, max_retries=3,
                               http_client=http) as client:
        with pytest.raises(openai.RateLimitError) as info:
            # Retry-After: 60 would make the SDK wait a minute per retry.
            await asyncio.wait_for(client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                max_tokens=5000), 20)
    headers = info.value.response.headers
    assert info.value.code == "rate_limit_tokens"
    assert headers["x-should-retry"] == "false"
    assert "retry-after" not in headers
    assert "x-ratelimit-limit-tokens" in headers
    assert len(sent) == 1


async def test_no_content_and_no_ip_reach_disk_or_logs(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    marker = "MARKER-" + secrets.token_hex(8)
    gw = await gateway_factory(raw_config(tmp_path, {"local": mock_upstream.base_url}))
    async with sdk(gw, **{"X-Forwarded-For": "198.51.100.77"}) as client:
        await chat(client, content=marker)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": marker}], stream=True)
        async for _ in stream:
            pass
    async with sdk(gw, key="sk-flint-" + "y" * 40) as bad:
        with pytest.raises(openai.AuthenticationError):
            await chat(bad, content=marker)
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.base_url + "/chat/completions", data=marker,
                             headers={"Authorization": f"Bearer {gw.key}",
                                      "Content-Type": "application/json"}) as resp:
            assert resp.status == 400
    assert await gw.components.usage.sync(5)
    files = _read_all(tmp_path)
    assert any(name.endswith("-wal") for name in files)
    for name, data in files.items():
        for needle in (marker, "127.0.0.1", "198.51.100.77"):
            assert needle.encode() not in data, f"{needle} found in {name}"
    # The server's own loggers (the test's HTTP client logs its peer, as it may).
    logged = "\n".join(r.getMessage() for r in caplog.records
                       if r.name.startswith(("flintproxy", "aiohttp")))
    for needle in (marker, "127.0.0.1", "198.51.100.77", gw.key):
        assert needle not in logged
