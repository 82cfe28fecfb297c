"""The relay against hostile upstreams and clients (issue 12: 2, 4, 5, 8, 10 and a 200
that is not a response), through real HTTP: the openai SDK and aiohttp against the
gateway, the mock upstream's fault modes behind it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from flintproxy.tools.mock import LEAKY_HEADERS, expected_content
from tests.conftest import Gateway, MockServer, raw_config

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}
CLIENT_IP = "203.0.113.77"


def sdk(gw: Gateway, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0,
                              default_headers=headers or None)


def auth(gw: Gateway, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.key}", **headers}


async def usage_rows(gw: Gateway) -> list[tuple[Any, ...]]:
    """(status, outcome, cost_nano, estimated) of every usage row, in order."""
    assert await gw.components.usage.sync(10)
    return [tuple(r) for r in await gw.components.usage_db.fetch(
        "SELECT status, outcome, cost_nano, estimated FROM usage WHERE account_id = ? "
        "ORDER BY started_at, request_id", gw.account_id)]


async def still_serves(gw: Gateway) -> None:
    async with sdk(gw) as client:
        ok = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert ok.choices[0].message.content == expected_content(20)


def failures(gw: Gateway, reason: str) -> int:
    return sum(up.failures.get(reason, 0) for up in gw.components.router.upstreams)


# --- 2. outcomes say what happened ------------------------------------------------------

async def test_a_stream_read_to_done_is_ok_whatever_the_upstream_sends_after(
        gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions",
                             json={**CHAT, "stream": True},
                             headers=auth(gateway, **{"x-mock-fault": "linger:1500"})) as resp:
            assert resp.status == 200
            body = await resp.read()
    # The stream ends with [DONE]; the upstream's late bytes never reach the client.
    assert body.endswith(b"data: [DONE]\n\n") and b": bye" not in body
    async with aiohttp.ClientSession() as http:  # a client that leaves right after [DONE]
        async with http.post(gateway.base_url + "/chat/completions",
                             json={**CHAT, "stream": True},
                             headers=auth(gateway, **{"x-mock-fault": "linger:1500"})) as resp:
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    break
            resp.close()
    await asyncio.sleep(0.2)
    rows = await usage_rows(gateway)
    assert [(r[0], r[1], r[3]) for r in rows] == [(200, "ok", 0), (200, "ok", 0)]


async def test_after_done_the_upstream_connection_is_kept_when_its_end_comes_soon(
        gateway: Gateway, mock_upstream: MockServer) -> None:
    peers = []
    for linger in ("linger:50", "linger:50", "linger:2500", None):
        fault = {"x-mock-fault": linger} if linger else {}
        async with aiohttp.ClientSession() as http:
            async with http.post(gateway.base_url + "/chat/completions",
                                 json={**CHAT, "stream": True},
                                 headers=auth(gateway, **fault)) as resp:
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        await asyncio.sleep(0.2)  # the first two ended 50 ms after [DONE]: pooled
        peers.append(mock_upstream.stats.last_peer)
    # The third's end came too late: its connection was closed, the fourth is new.
    assert peers[0] == peers[1] == peers[2] != peers[3]
    rows = await usage_rows(gateway)
    assert [(r[0], r[1]) for r in rows] == [(200, "ok")] * 4


async def test_a_client_gone_before_the_first_byte_is_recorded_as_499(
        gateway: Gateway, mock_upstream: MockServer) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await http.post(gateway.base_url + "/chat/completions", json=CHAT,
                                headers=auth(gateway, **{"x-mock-fault": "hang"}))
    for _ in range(200):
        if mock_upstream.stats.disconnects:
            break
        await asyncio.sleep(0.01)
    for _ in range(200):
        if rows := await usage_rows(gateway):
            break
        await asyncio.sleep(0.01)
    assert [(r[0], r[1]) for r in rows] == [(499, "client_disconnect")]
    assert rows[0][2] > 0  # charged its estimate, as before: the upstream had the prompt
    await still_serves(gateway)


async def test_a_client_gone_after_heartbeats_sent_its_200_is_recorded_as_200(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["heartbeat_interval_s"] = 0.05
    gw = await gateway_factory(raw)
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.base_url + "/chat/completions", json={**CHAT, "stream": True},
                             headers=auth(gw, **{"x-mock-fault": "hang"})) as resp:
            assert resp.status == 200
            assert await resp.content.readline() == b": keep-alive\n"
            resp.close()
    for _ in range(200):
        if rows := await usage_rows(gw):
            break
        await asyncio.sleep(0.01)
    assert [(r[0], r[1]) for r in rows] == [(200, "client_disconnect")]


async def test_an_upstream_error_after_heartbeats_is_one_event_whatever_its_lines(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["heartbeat_interval_s"] = 0.05
    gw = await gateway_factory(raw)
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.base_url + "/chat/completions", json={**CHAT, "stream": True},
                             headers=auth(gw, **{"x-mock-fault": "http400_lines",
                                                 "x-mock-first-delay-ms": "300"})) as resp:
            body = await resp.read()
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data:")]
    assert len(events) == 1 and b"forged" in events[0]  # inside the one error event
    assert events[0].startswith(b'data: {"error": {"message": "bad"')


# --- 4. header allow-lists in both directions -----------------------------------------

SPOOFED = {
    "CF-Connecting-IP": CLIENT_IP, "True-Client-IP": CLIENT_IP, "X-Real-IP": CLIENT_IP,
    "X-Client-IP": CLIENT_IP, "Fastly-Client-IP": CLIENT_IP, "Client-IP": CLIENT_IP,
    "Forwarded": f"for={CLIENT_IP}", "X-Forwarded-For": CLIENT_IP,
    "X-Forwarded-Host": "victim.example", "X-Cluster-Client-IP": CLIENT_IP,
    "OpenAI-Organization": "org-chosen-by-client", "OpenAI-Project": "proj-chosen-by-client",
    "Cookie": "session=client-secret", "User-Agent": f"agent-of {CLIENT_IP}",
    "X-Stainless-OS": "Linux-host-of-the-client", "X-Custom-Anything": CLIENT_IP,
}


@pytest.mark.parametrize("forward", [["x-mock-*"], ["x-mock-*", "x-*", "cf-*", "true-client-ip",
                                                    "openai-organization", "forwarded"]])
async def test_client_addresses_and_org_selectors_never_reach_the_upstream(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any,
        forward: list[str]) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["upstreams"][0]["forward_headers"] = forward  # even an operator's glob cannot
    gw = await gateway_factory(raw)
    async with sdk(gw, **SPOOFED, **{"OpenAI-Beta": "assistants=v2",
                                     "x-mock-chunks": "3"}) as client:
        resp = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert resp.choices[0].message.content == expected_content(3)  # x-mock-* forwarded
    seen = mock_upstream.stats.last_headers
    assert seen["openai-beta"] == "assistants=v2"
    assert seen["x-request-id"]
    never = {"cf-connecting-ip", "true-client-ip", "x-real-ip", "x-client-ip",
             "fastly-client-ip", "client-ip", "forwarded", "x-forwarded-for",
             "x-forwarded-host", "x-cluster-client-ip", "openai-organization",
             "openai-project", "cookie", "user-agent"}
    assert never.isdisjoint(seen)
    opted = {"x-custom-anything", "x-stainless-os"}  # what an "x-*" glob lets through
    assert opted <= set(seen) if "x-*" in forward else opted.isdisjoint(seen)
    assert not [k for k, v in seen.items() if k not in opted and (CLIENT_IP in v or "client" in v)]
    assert gw.key not in " ".join(seen.values())


async def test_headers_the_clients_connection_header_names_are_not_forwarded(
        gateway: Gateway, mock_upstream: MockServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions", json=CHAT,
                             headers=auth(gateway, **{
                                 "Connection": "keep-alive, OpenAI-Beta, x-mock-hop",
                                 "OpenAI-Beta": "hop", "x-mock-hop": "1",
                                 "x-mock-chunks": "2"})) as resp:
            assert resp.status == 200
    seen = mock_upstream.stats.last_headers
    assert "openai-beta" not in seen and "x-mock-hop" not in seen
    assert seen["x-mock-chunks"] == "2"


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_internals_never_reach_the_client(gateway: Gateway, stream: bool) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions",
                             json={**CHAT, "stream": stream},
                             headers=auth(gateway, **{"x-mock-fault": "leaky_headers"})) as resp:
            assert resp.status == 200
            await resp.read()
            names = {k.lower() for k in resp.headers}
            values = " ".join(resp.headers.values())
    assert not {n for n in names if n.startswith("x-litellm")}
    assert {"openai-organization", "set-cookie", "x-mock-leak", "server"}.isdisjoint(names)
    for leaked in LEAKY_HEADERS.values():
        assert leaked not in values
    assert resp.headers["content-type"].startswith(
        "text/event-stream" if stream else "application/json")
    assert resp.headers["x-request-id"]


async def test_a_header_glob_in_the_config_is_validated(tmp_path: Path,
                                                        mock_upstream: MockServer,
                                                        gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    for bad in (["*"], ["x mock"], "x-mock-*", [5]):
        raw["upstreams"][0]["forward_headers"] = bad
        with pytest.raises(ValueError, match=r"upstreams\[0\]\.forward_headers"):
            await gateway_factory(raw)


# --- 5. usage the client did not ask for ----------------------------------------------

async def test_usage_on_a_content_chunk_never_reaches_a_client_that_did_not_ask(
        gateway: Gateway) -> None:
    fault = {"x-mock-fault": "usage_in_content"}
    async with sdk(gateway, **fault) as client:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                      stream=True)
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_content(20)
        assert all(c.usage is None for c in chunks)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True})
        asked = [c async for c in stream]
    usage = asked[-1].usage
    assert usage is not None and usage.completion_tokens == 20
    # Billed on the upstream's usage both times, never on an estimate.
    assert [(r[1], r[3]) for r in await usage_rows(gateway)] == [("ok", 0), ("ok", 0)]


# --- 8. bounds on what the upstream makes us hold -------------------------------------

async def test_an_upstream_head_over_64_kib_is_a_502_and_never_relayed(
        gateway: Gateway) -> None:
    for stream in (False, True):
        async with sdk(gateway, **{"x-mock-fault": "huge_head:2000000"}) as client:
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                     stream=stream)
        assert info.value.status_code == 502
        assert info.value.body["code"] == "upstream_error"  # type: ignore[index]
        assert "x-mock-padding" not in info.value.response.headers
    assert failures(gateway, "too_large") == 2
    await still_serves(gateway)


async def test_a_non_streaming_body_over_its_bound_is_a_502(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["max_upstream_body_bytes"] = 1 << 20
    gw = await gateway_factory(raw)
    async with sdk(gw, **{"x-mock-fault": "huge_body:5000000"}) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_error"  # type: ignore[index]
    assert failures(gw, "too_large") == 1
    async with sdk(gw, **{"x-mock-fault": "huge_body:900000"}) as client:  # within it
        raw_resp = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES)
    assert raw_resp.status_code == 200 and len(raw_resp.content) == 900000
    assert failures(gw, "too_large") == 1
    assert [(r[0], r[1]) for r in await usage_rows(gw)] == [(502, "upstream_error"), (200, "ok")]
    assert (await usage_rows(gw))[0][2] == 0  # the failed one charges nothing
    await still_serves(gw)


async def test_an_sse_event_over_its_bound_ends_the_stream_with_an_error_event(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["server"]["max_sse_event_bytes"] = 1 << 20
    gw = await gateway_factory(raw)
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.base_url + "/chat/completions", json={**CHAT, "stream": True},
                             headers=auth(gw, **{"x-mock-fault": "huge_event:3000000"})) as resp:
            body = await resp.read()
    if resp.status == 200:  # the stream had begun: its last event is the error
        last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_error"
    else:
        assert resp.status == 502
    assert b"a" * 1000 not in body
    assert failures(gw, "too_large") == 1
    async with aiohttp.ClientSession() as http:  # within the bound: relayed whole
        async with http.post(gw.base_url + "/chat/completions", json={**CHAT, "stream": True},
                             headers=auth(gw, **{"x-mock-fault": "huge_event:900000"})) as resp:
            body = await resp.read()
    assert b"a" * 800_000 in body and body.endswith(b"data: [DONE]\n\n")
    await still_serves(gw)


# --- a 200 that is not a response -----------------------------------------------------

@pytest.mark.parametrize("fault", ["malformed", "shapeless"])
async def test_a_malformed_upstream_body_is_a_502_and_charges_nothing(
        gateway: Gateway, fault: str) -> None:
    async with sdk(gateway, **{"x-mock-fault": fault}) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_error"  # type: ignore[index]
    assert b"not json" not in info.value.response.content
    assert [(r[0], r[1], r[2]) for r in await usage_rows(gateway)] == [
        (502, "upstream_error", 0)]
    await still_serves(gateway)


# --- 10. deep nesting ------------------------------------------------------------------

@pytest.mark.parametrize("options", [{"include_usage": False}, {}])
async def test_json_nested_too_deep_to_re_encode_is_a_400(gateway: Gateway,
                                                          options: dict[str, Any]) -> None:
    deep = b"[" * 300 + b"]" * 300
    body = (b'{"model":"gpt-4o-mini","stream":true,"stream_options":' + orjson.dumps(options)
            + b',"messages":[{"role":"user","content":"x"}],"metadata":' + deep + b"}")
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions", data=body,
                             headers=auth(gateway, **{"Content-Type": "application/json"})
                             ) as resp:
            assert resp.status == 400
            err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and "nested" in err["message"]
    assert "Traceback" not in err["message"]
    await still_serves(gateway)
