"""/healthz and /readyz: alive, ready, and 503 with the failing check's detail."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import openai

from flintproxy.ops.health import DbProbe
from flintproxy.store import sqlite
from tests.conftest import Gateway, MockServer, raw_config

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_healthz_and_readyz_when_all_is_well(gateway: Gateway) -> None:
    assert await get_json(gateway.url + "/healthz") == (200, {"status": "ok"})
    status, body = await get_json(gateway.url + "/readyz")
    assert status == 200, body
    assert body["ready"] is True
    checks = body["checks"]
    assert checks["database"] == {"ok": True, "detail": "writable"}
    assert checks["usage_writer"]["ok"] is True and checks["usage_writer"]["stalled"] is False
    assert checks["upstreams"] == {"ok": True, "available": ["local"], "unavailable": []}


async def test_not_ready_when_the_only_upstream_circuit_is_open(
        tmp_path: Path, gateway_factory: Any, unused_tcp_port: int) -> None:
    raw = raw_config(tmp_path, {"dead": f"http://127.0.0.1:{unused_tcp_port}/v1"})
    raw["upstreams"][0]["failure_threshold"] = 1
    gw = await gateway_factory(raw)
    assert (await get_json(gw.url + "/readyz"))[0] == 200
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0) as c:
        try:
            await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        except openai.APIStatusError as exc:
            assert exc.status_code == 502
    status, body = await get_json(gw.url + "/readyz")
    assert status == 503
    assert body["ready"] is False
    assert body["checks"]["upstreams"] == {"ok": False, "available": [],
                                           "unavailable": ["dead"]}
    assert body["checks"]["database"]["ok"] is True  # the detail says which check failed


async def test_not_ready_while_the_usage_writer_is_stalled(gateway: Gateway) -> None:
    writer = gateway.components.usage
    writer.consecutive_errors = 1  # what a failing flush leaves behind
    writer.last_error = "OperationalError: disk I/O error"
    try:
        status, body = await get_json(gateway.url + "/readyz")
    finally:
        writer.consecutive_errors = 0
        writer.last_error = None
    assert status == 503
    assert body["checks"]["usage_writer"]["ok"] is False
    assert body["checks"]["usage_writer"]["stalled"] is True
    assert body["checks"]["usage_writer"]["last_error"] == "OperationalError: disk I/O error"
    assert (await get_json(gateway.url + "/readyz"))[0] == 200


async def test_db_probe_reports_a_read_only_database(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    db = await sqlite.open_store(path)
    await db.close()
    ro = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        ok, detail = await DbProbe(ro).check()
        assert not ok
        assert "readonly" in detail
        # No transaction is left open behind the failed probe.
        assert not ro.in_transaction
    finally:
        await ro.close()


async def test_db_probe_is_cached_and_counts_a_held_lock_as_writable(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    writer = await sqlite.open_store(path)
    probe_db = await sqlite.connect(path)
    await probe_db.execute("PRAGMA busy_timeout=50")
    try:
        probe = DbProbe(probe_db, ttl_s=0.2)
        assert await probe.check() == (True, "writable")
        await writer.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
        try:
            assert await probe.check() == (True, "writable")  # cached
            await asyncio.sleep(0.25)
            ok, detail = await probe.check()
            assert ok and detail.startswith("busy")
        finally:
            await writer.execute("ROLLBACK")
    finally:
        await probe_db.close()
        await writer.close()


async def test_readyz_needs_no_upstream_traffic(gateway: Gateway,
                                                mock_upstream: MockServer) -> None:
    mock_upstream.stats.reset()
    for _ in range(3):
        assert (await get_json(gateway.url + "/readyz"))[0] == 200
    assert mock_upstream.stats.requests == 0
