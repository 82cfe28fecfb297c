"""Upstream faults leave no reference cycles behind.

The server runs with the cyclic GC tuned down (``gc.set_threshold(700, 0, 5000)``),
so a cycle made per faulted request lives long and piles up: a soak once found
``UpstreamDisconnected`` and its traceback (frames, the response, its buffers)
kept alive by a cycle on upstream resets, ~6 MiB/min. Here many faulted requests go
through a real gateway and the mock upstream, and the collector, saving what it
finds (``gc.DEBUG_SAVEALL``), must find nothing made by flintproxy's own code.
"""

from __future__ import annotations

import contextlib
import gc
import types
from collections.abc import Iterator

import aiohttp
import pytest

from tests.conftest import Gateway

FAULTED = 40


def _in_gateway(filename: str) -> bool:
    return "/flintproxy/" in filename and "/flintproxy/tools/" not in filename


def _ours(obj: object) -> bool:
    """Whether a garbage object was made by the gateway (its frames, its exceptions);
    the mock upstream (flintproxy.tools) is the test's, on aiohttp, and not counted."""
    if isinstance(obj, types.FrameType):
        return _in_gateway(obj.f_code.co_filename)
    if isinstance(obj, types.TracebackType):
        return _in_gateway(obj.tb_frame.f_code.co_filename)
    module = type(obj).__module__
    return module.startswith("flintproxy") and not module.startswith("flintproxy.tools")


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.garbage.clear()
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()


async def _fault(session: aiohttp.ClientSession, gw: Gateway, fault: str, stream: bool) -> int:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "stream": stream}
    async with session.post(gw.base_url + "/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {gw.key}",
                                     "x-mock-fault": fault}) as resp:
        await resp.read()
        return resp.status


@pytest.mark.parametrize("fault", ["reset:0", "reset:2", "http500", "malformed"])
async def test_faulted_upstream_requests_leave_no_cycles(
        gateway: Gateway, saved_garbage: list[object], fault: str) -> None:
    async with aiohttp.ClientSession() as session:
        for i in range(FAULTED):
            # A stream cut after its head: the client sees the break.
            with contextlib.suppress(aiohttp.ClientPayloadError):
                await _fault(session, gateway, fault, stream=bool(i % 2))
    gc.collect()
    ours = [obj for obj in saved_garbage if _ours(obj)]
    kinds = sorted({type(o).__qualname__ for o in ours})
    assert not ours, f"{len(ours)} objects of flintproxy's in cycles: {kinds[:20]}"
