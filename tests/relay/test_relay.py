"""End-to-end: the official openai SDK through the real gateway to the real mock upstream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from flintproxy.tools.mock import expected_content
from tests.conftest import Gateway, MockServer, raw_config, start_mock

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


def sdk(gw: Gateway, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0,
                              default_headers=headers or None)


async def test_chat_non_stream(gateway: Gateway) -> None:
    async with sdk(gateway) as client:
        resp = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert resp.choices[0].message.content == expected_content(20)
    assert resp.usage is not None and resp.usage.completion_tokens == 20


async def test_chat_stream_without_usage_strips_usage_chunk(
        gateway: Gateway, mock_upstream: MockServer) -> None:
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                      stream=True)
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_content(20)
    assert all(c.choices for c in chunks), "the usage-only chunk must be stripped"
    # The gateway always asks the upstream for usage.
    assert mock_upstream.stats.last_body["stream_options"] == {"include_usage": True}


async def test_chat_stream_with_usage(gateway: Gateway) -> None:
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        == expected_content(20)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


async def test_completions_and_embeddings_and_models(gateway: Gateway) -> None:
    async with sdk(gateway) as client:
        comp = await client.completions.create(model="gpt-4o-mini", prompt="Once", max_tokens=5)
        assert comp.choices[0].text == expected_content(5)  # the mock honours max_tokens
        assert comp.choices[0].finish_reason == "length"
        stream = await client.completions.create(model="gpt-4o-mini", prompt="Once",
                                                 stream=True)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        assert text == expected_content(20)
        emb = await client.embeddings.create(model="text-embedding-3-small",
                                             input=["a", "b"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
        models = await client.models.list()
        assert sorted(m.id for m in models.data) == sorted(
            ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"])


async def test_keys_and_request_ids_at_the_boundary(tmp_path: Path, mock_upstream: MockServer,
                                                    gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["upstreams"][0]["api_key_env"] = "TEST_UPSTREAM_KEY"
    gw = await gateway_factory(raw, {"TEST_UPSTREAM_KEY": "sk-upstream-secret-zzz"})
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.base_url + "/chat/completions",
                             json={"model": "gpt-4o-mini", "messages": MESSAGES},
                             headers={"Authorization": f"Bearer {gw.key}",
                                      "X-Request-Id": "my-trace-1",
                                      "X-Forwarded-For": "203.0.113.9",
                                      "Cookie": "a=b"}) as resp:
            body = await resp.text()
            assert resp.status == 200
            assert resp.headers["x-request-id"] == "my-trace-1"
            assert "sk-upstream-secret-zzz" not in body + str(dict(resp.headers))
        seen = mock_upstream.stats.last_headers
        assert seen["authorization"] == "Bearer sk-upstream-secret-zzz"
        assert gw.key not in str(seen)
        assert seen["x-request-id"] == "my-trace-1"
        assert "x-forwarded-for" not in seen and "cookie" not in seen
        async with http.post(gw.base_url + "/chat/completions",
                             json={"model": "gpt-4o-mini", "messages": MESSAGES},
                             headers={"Authorization": f"Bearer {gw.key}"}) as resp:
            generated = resp.headers["x-request-id"]
        assert generated.startswith("req_") and len(generated) > 12
        assert mock_upstream.stats.last_headers["x-request-id"] == generated


async def _failing_upstream(status: int, hits: list[int]) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.Response:
        hits.append(1)
        return web.json_response({"error": {"message": "boom", "type": "server_error",
                                            "param": None, "code": None}}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"


async def test_failover_before_first_byte(tmp_path: Path, mock_upstream: MockServer,
                                          gateway_factory: Any) -> None:
    hits: list[int] = []
    runner, bad_url = await _failing_upstream(500, hits)
    try:
        raw = raw_config(tmp_path, {"bad": bad_url, "good": mock_upstream.base_url})
        raw["upstreams"][1]["priority"] = 1  # only a fallback
        gw = await gateway_factory(raw)
        async with sdk(gw) as client:
            for _ in range(2):
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, stream=True)
                text = "".join([c.choices[0].delta.content or "" async for c in stream])
                assert text == expected_content(20)
            # After failure_threshold failures the circuit opens: the bad upstream
            # is skipped while cooling down.
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert len(hits) == 3
    finally:
        await runner.cleanup()


async def test_no_retry_after_first_byte(tmp_path: Path, mock_upstream: MockServer,
                                         gateway_factory: Any) -> None:
    other = await start_mock()
    try:
        raw = raw_config(tmp_path, {"a": mock_upstream.base_url, "b": other.base_url})
        raw["upstreams"][1]["priority"] = 1
        gw = await gateway_factory(raw)
        async with sdk(gw, **{"x-mock-fault": "reset:3"}) as client:
            stream = await client.chat.completions.create(model="gpt-4o-mini",
                                                          messages=MESSAGES, stream=True)
            got: list[str] = []
            with pytest.raises(openai.APIError, match="failed"):
                async for chunk in stream:
                    got.append(chunk.choices[0].delta.content or "")
        assert "".join(got) == expected_content(3)
        assert other.stats.requests == 0
        # ...and the gateway keeps serving.
        async with sdk(gw) as client:
            ok = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert ok.choices[0].message.content == expected_content(20)
    finally:
        await other.runner.cleanup()


async def test_client_disconnect_cancels_upstream(gateway: Gateway,
                                                  mock_upstream: MockServer) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            gateway.base_url + "/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {gateway.key}", "x-mock-fault": "endless",
                     "x-mock-delay-ms": "5"})
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: ")
        assert mock_upstream.stats.active_streams == 1
        resp.close()
    for _ in range(200):
        if mock_upstream.stats.disconnects == 1:
            break
        await asyncio.sleep(0.01)
    assert mock_upstream.stats.disconnects == 1
    assert mock_upstream.stats.active_streams == 0


async def test_upstream_failures_map_to_502_504_and_429_passes(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Any) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["upstreams"][0]["read_timeout_s"] = 0.3
    raw["upstreams"][0]["failure_threshold"] = 100
    gw = await gateway_factory(raw)
    async with sdk(gw, **{"x-mock-fault": "hang"}) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 504
    async with sdk(gw, **{"x-mock-fault": "http500", "x-request-id": "trace-502"}) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 502
    # Admitted, then failed upstream: the limits and the id come with the error.
    assert info.value.response.headers["x-request-id"] == "trace-502"
    assert info.value.response.headers["x-ratelimit-remaining-requests"].isdigit()
    async with sdk(gw, **{"x-mock-fault": "http429"}) as client:
        with pytest.raises(openai.RateLimitError) as rl:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert rl.value.response.headers["retry-after"] == "1"
    dead = raw_config(tmp_path, {"dead": "http://127.0.0.1:9/v1"})
    gw2 = await gateway_factory(dead)
    async with sdk(gw2) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_error"  # type: ignore[index]


async def test_malformed_upstream_sse_is_relayed_and_server_survives(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
                gateway.base_url + "/chat/completions",
                json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
                headers={"Authorization": f"Bearer {gateway.key}",
                         "x-mock-fault": "malformed"}) as resp:
            assert resp.status == 200
            body = await resp.read()
    assert b"data: {not json" in body
    async with sdk(gateway) as client:
        ok = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert ok.choices[0].message.content == expected_content(20)


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, "invalid_json"),
        (b"[1, 2]", {}, 400, None),
        (b'{"messages": []}', {}, 400, "missing_model"),
        (b'{"model": 5}', {}, 400, None),
        (b'{"model": "gpt-4o-mini", "stream": "yes"}', {}, 400, None),
        (b'{"model": "gpt-4o-mini", "max_tokens": -1}', {}, 400, None),
        (b'{"model": "no-such-model"}', {}, 404, "model_not_found"),
        (b'{"model": "gpt-4o-mini"}', {"Content-Type": "text/plain"}, 415,
         "unsupported_media_type"),
        (b'{"model": "gpt-4o-mini"}', {"Authorization": "Bearer wrong"}, 401,
         "invalid_api_key"),
        (b'{"model": "gpt-4o-mini"}', {"Authorization": ""}, 401, "missing_api_key"),
        (b'{"model": "gpt-4o-mini"}', {"Authorization": "Basic abc"}, 401, "invalid_api_key"),
    ],
)
async def test_bad_input(gateway: Gateway, body: bytes, headers: dict[str, str], status: int,
                         code: str | None) -> None:
    hdrs = {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}
    hdrs.update(headers)
    if not hdrs["Authorization"]:
        del hdrs["Authorization"]
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions", data=body,
                             headers=hdrs) as resp:
            payload = await resp.json()
            assert resp.status == status
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code


async def test_unknown_path_method_and_huge_body(gateway: Gateway) -> None:
    auth = {"Authorization": f"Bearer {gateway.key}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/nope", json={}, headers=auth) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with http.get(gateway.base_url + "/chat/completions", headers=auth) as resp:
            assert resp.status == 405
            assert "error" in await resp.json()
        # Declared too large: refused from the header alone, before the body is read.
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + gateway.key.encode() + b"\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: 999999999\r\n\r\n{")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert b" 413 " in status_line
        writer.close()
        # Chunked with no length: cut off at the configured limit.
        big = b'{"model": "gpt-4o-mini", "x": "' + b"a" * (5 * 1024 * 1024) + b'"}'

        async def gen() -> Any:
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]

        async with http.post(gateway.base_url + "/chat/completions", data=gen(),
                             headers={**auth, "Content-Type": "application/json"}) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "payload_too_large"
        async with http.get(gateway.url + "/healthz") as resp:
            assert resp.status == 200


@pytest.mark.parametrize(
    ("body", "sent_options"),
    [
        (b'{"model":"gpt-4o-mini","stream":true,"messages":[]}', {"include_usage": True}),
        (b'  \n{ "model" : "gpt-4o-mini", "stream": true, "messages": [] }\n',
         {"include_usage": True}),
        (b'{"model":"gpt-4o-mini","stream":true,"messages":[],"stream_options":null}',
         {"include_usage": True}),
        (b'{"model":"gpt-4o-mini","stream":true,"messages":[],'
         b'"stream_options":{"include_usage":false,"x":1}}', {"include_usage": True, "x": 1}),
    ],
)
async def test_usage_is_asked_for_whatever_the_body_looks_like(
        gateway: Gateway, mock_upstream: MockServer, body: bytes,
        sent_options: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.base_url + "/chat/completions", data=body,
                             headers=headers) as resp:
            assert resp.status == 200
            text = await resp.text()
    assert '"usage":{' not in text  # stripped: the client did not ask
    sent = mock_upstream.stats.last_body
    assert sent.pop("stream_options") == sent_options
    expected = json.loads(body)
    expected.pop("stream_options", None)
    # Nothing else changed but the limit the reservation holds the upstream to.
    assert sent == {**expected, "max_tokens": gateway.config.billing.default_max_tokens}
