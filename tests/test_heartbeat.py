"""Heartbeats end to end: the real gateway and the mock upstream's slow first bytes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from flintproxy.app import RELAY
from flintproxy.mock import expected_content
from tests.conftest import MockServer, raw_config
from tests.test_relay import MESSAGES, sdk


async def test_heartbeats_while_first_chunk_is_slow(tmp_path: Path, mock_upstream: MockServer,
                                                    gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["heartbeat_interval_s"] = 0.05
    gw = await gateway_factory(raw)
    async with aiohttp.ClientSession() as http:
        async with http.post(
                gw.base_url + "/chat/completions",
                json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
                headers={"Authorization": f"Bearer {gw.key}",
                         "x-mock-first-delay-ms": "400"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            body = await resp.read()
    head, _, rest = body.partition(b"data: ")
    assert head.count(b": keep-alive\n\n") >= 3
    assert rest and body.rstrip().endswith(b"data: [DONE]")
    async with sdk(gw, **{"x-mock-first-delay-ms": "200"}) as client:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == expected_content(20)
    heartbeats = gw.app[RELAY].heartbeats
    assert not heartbeats.waiting
    await asyncio.sleep(heartbeats.tick * 2)
    assert heartbeats.timer is None  # disarmed once no stream waits


async def test_fast_streams_get_no_heartbeat_and_leave_no_watch(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["heartbeat_interval_s"] = 0.2
    gw = await gateway_factory(raw)
    heartbeats = gw.app[RELAY].heartbeats
    async with aiohttp.ClientSession() as http:
        for _ in range(10):
            async with http.post(
                    gw.base_url + "/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
                    headers={"Authorization": f"Bearer {gw.key}", "x-mock-chunks": "3",
                             "x-mock-delay-ms": "20"}) as resp:
                body = await resp.read()
            assert resp.status == 200
            assert body.startswith(b"data: ") and b": keep-alive" not in body
        assert not heartbeats.waiting
        # One stream outlasts an interval after its first byte: still no heartbeat.
        async with http.post(
                gw.base_url + "/chat/completions",
                json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
                headers={"Authorization": f"Bearer {gw.key}", "x-mock-chunks": "3",
                         "x-mock-delay-ms": "150"}) as resp:
            body = await resp.read()
        assert b": keep-alive" not in body and body.rstrip().endswith(b"data: [DONE]")
    await asyncio.sleep(heartbeats.tick * 2)
    assert heartbeats.timer is None and not heartbeats.waiting
