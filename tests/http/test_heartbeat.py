"""Heartbeats end to end: the real gateway and the mock upstream's slow first bytes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from flintproxy.tools.mock import expected_content
from tests.conftest import Gateway, MockServer, raw_config
from tests.relay.test_relay import MESSAGES, sdk


async def post_stream(http: aiohttp.ClientSession, gw: Gateway, **mock: str) -> bytes:
    """One streamed chat completion's raw body; ``mock`` are x-mock-* headers."""
    headers = {"Authorization": f"Bearer {gw.key}"}
    headers.update({f"x-mock-{k.replace('_', '-')}": v for k, v in mock.items()})
    async with http.post(gw.base_url + "/chat/completions", headers=headers,
                         json={"model": "gpt-4o-mini", "messages": MESSAGES,
                               "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return await resp.read()


async def test_heartbeats_while_first_chunk_is_slow(tmp_path: Path, mock_upstream: MockServer,
                                                    gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["heartbeat_interval_s"] = 0.05
    gw = await gateway_factory(raw)
    async with aiohttp.ClientSession() as http:
        body = await post_stream(http, gw, first_delay_ms="400")
    head, _, rest = body.partition(b"data: ")
    assert head.count(b": keep-alive\n\n") >= 3
    assert rest and body.rstrip().endswith(b"data: [DONE]")
    async with sdk(gw, **{"x-mock-first-delay-ms": "200"}) as client:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == expected_content(20)
    heartbeats = gw.components.relay.heartbeats
    assert not heartbeats.waiting
    await asyncio.sleep(heartbeats.tick * 2)
    assert heartbeats.timer is None  # disarmed once no stream waits


async def test_fast_streams_get_no_heartbeat_and_leave_no_watch(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["heartbeat_interval_s"] = 0.2
    gw = await gateway_factory(raw)
    heartbeats = gw.components.relay.heartbeats
    async with aiohttp.ClientSession() as http:
        for _ in range(10):
            body = await post_stream(http, gw, chunks="3", delay_ms="20")
            assert body.startswith(b"data: ") and b": keep-alive" not in body
        assert not heartbeats.waiting
        # One stream outlasts an interval after its first byte: still no heartbeat.
        body = await post_stream(http, gw, chunks="3", delay_ms="150")
        assert b": keep-alive" not in body and body.rstrip().endswith(b"data: [DONE]")
    await asyncio.sleep(heartbeats.tick * 2)
    assert heartbeats.timer is None and not heartbeats.waiting
