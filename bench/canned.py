"""Canned OpenAI responses for the zero-delay upstream, and a fallback server for them.

The bench serves these bytes from nginx (``return 200 '...'``) when nginx is
installed. Without nginx, ``python bench/canned.py --port P`` serves the same
bytes from a bare uvloop ``asyncio.Protocol`` (no framework: the fastest upstream
the project can offer in Python). Paths:

    POST /json/v1/...   a chat.completion JSON body with usage
    POST /sse/v1/...    an SSE stream: role chunk, CHUNKS content chunks, a finish
                        chunk, the usage chunk (``choices: []``) and ``data: [DONE]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import cast

import orjson

CHUNKS = 20
CREATED = 1_700_000_000
PROMPT_TOKENS = 12
_USAGE = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": CHUNKS,
          "total_tokens": PROMPT_TOKENS + CHUNKS,
          "prompt_tokens_details": {"cached_tokens": 0},
          "completion_tokens_details": {"reasoning_tokens": 0}}


def json_body(model: str = "bench-json") -> bytes:
    text = "".join(f"tok{i} " for i in range(CHUNKS))
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": CREATED,
        "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": _USAGE})


def sse_body(model: str = "bench-sse", chunks: int = CHUNKS) -> bytes:
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED,
            "model": model, "system_fingerprint": None}

    def event(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**head, "choices": [choice], "usage": None}) + b"\n\n"

    parts = [event({"role": "assistant", "content": "", "refusal": None})]
    parts += [event({"content": f"tok{i} "}) for i in range(chunks)]
    parts.append(event({}, "stop"))
    parts.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": _USAGE}) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def _response(body: bytes, content_type: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: keep-alive\r\n\r\n" + body)


class _Canned(asyncio.Protocol):
    """Keep-alive HTTP/1.1: read head + Content-Length body, answer by path prefix."""

    def __init__(self, json_resp: bytes, sse_resp: bytes) -> None:
        self.json_resp = json_resp
        self.sse_resp = sse_resp
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            length = 0
            i = head.lower().find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17: j if j >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                break
            resp = self.sse_resp if head[head.find(b" ") + 1:].startswith(b"/sse/") \
                else self.json_resp
            assert self.transport is not None
            self.transport.write(resp)
            buf = buf[total:]
        self.buf = buf


async def serve(port: int) -> None:
    j = _response(json_body(), b"application/json")
    s = _response(sse_body(), b"text/event-stream")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Canned(j, s), "127.0.0.1", port, backlog=4096)
    print(f"canned upstream on http://127.0.0.1:{port} (pid {os.getpid()})", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description="canned OpenAI upstream (fallback when no nginx)")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port))
    else:
        uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
