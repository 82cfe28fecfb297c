"""The mock's OpenAI routes: ``/v1/chat/completions`` and ``/v1/completions`` (streamed
and not), ``/v1/embeddings`` and ``/v1/models``, and the content and usage they report.

Content is predictable (chunk i is ``f"tok{i} "``, one token each); a completion stops
at the request's limit; usage counts every completion the request asks for. A chat
request that forces a tool is answered by tools.mock_chat_tools.

Why a module of its own: these are the routes the bench drives, so their events are
encoded once per (kind, model, chunks) shape and cached, and a request only splices
its id in (``ChatRoutes._stream``, ``_body_tail``); the stream writer here honours the
same fault modes as tools.mock_events' does for the other formats.
"""

from __future__ import annotations

import base64
import functools
import itertools
import math
import struct
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from flintproxy.tools import mock_chat_tools
from flintproxy.tools.mock_core import Mock, MockSettings
from flintproxy.tools.mock_faults import (
    USAGE_CHUNK,
    Overrides,
    error,
    fault_headers,
    write_padded,
)

__all__ = ["ChatRoutes", "choices_billed", "completion_limit", "embedding_vector",
           "expected_content", "prompt_tokens_for"]


_CACHE_MAX = 512  # bound on cached (kind, model, chunks) shapes, as headers vary chunks
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"


def expected_content(chunks: int) -> str:
    """The exact assistant text of a completion made of ``chunks`` content chunks."""
    return "".join(f"tok{i} " for i in range(chunks))


def embedding_vector(text: str, dims: int = 8) -> list[float]:
    """The embedding of one input; exact in float32, so base64 round-trips losslessly."""
    crc = zlib.crc32(text.encode())
    return [(((crc >> (j % 24)) + 31 * j) & 0xFF) / 128 - 1.0 for j in range(dims)]


def _tokens(value: object) -> int:
    if isinstance(value, str):
        return len(value) // 4 + 1
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # already token ids
        return sum(_tokens(v) for v in value)
    return _tokens(value.get("text", "")) if isinstance(value, dict) else 0


def completion_limit(body: Mapping[str, Any]) -> int | None:
    """The per-choice output limit a provider applies: the least one sent, if any."""
    sent = [v for v in (body.get("max_tokens"), body.get("max_completion_tokens"))
            if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(sent, default=None)


def choices_billed(kind: str, body: Mapping[str, Any]) -> int:
    """Completions generated (and billed) for a body: ``n``, ``best_of``, prompt arrays."""
    def count(name: str) -> int:
        v = body.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1

    if kind == "chat":
        return count("n")
    prompt = body.get("prompt")
    batch = 1  # a string, or one token-id list
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        batch = len(prompt)  # strings or token-id lists: one set of choices each
    return max(count("n"), count("best_of")) * batch


def prompt_tokens_for(body: Mapping[str, Any]) -> int:
    """The prompt_tokens the mock reports for a chat, completions or embeddings body.

    ``len(text)//4 + 1`` per message (content parts counted alike), per prompt string
    or per input string; a token-id list counts its length.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(_tokens(m.get("content")) for m in messages if isinstance(m, dict))
    return _tokens(body.get("prompt", body.get("input", "")))


@functools.lru_cache(maxsize=4096)
def _usage_json(prompt: int, completion: int) -> bytes:
    return orjson.dumps(
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
    )


def _after_id(obj: Mapping[str, Any], end: bytes) -> bytes:
    # Responses are spliced as b'{"id":"' + id + this: the id is the only part that
    # varies per request, so the rest is encoded once and cached.
    return b'",' + orjson.dumps(obj)[1:-1] + end


class _Stream(NamedTuple):
    tails: tuple[bytes, ...]  # every event before the usage chunk, after its id
    start: int  # index in tails of the first content chunk
    usage_prefix: bytes  # the usage-only chunk, after its id, up to the usage value


class ChatRoutes:
    """The OpenAI routes' handlers over the mock's core, with their encoded-event caches."""

    def __init__(self, core: Mock, settings: MockSettings) -> None:
        self.core = core
        self.streams: dict[tuple[str, str, int, bool, str], _Stream] = {}
        self.bodies: dict[tuple[str, str, int, str], bytes] = {}
        listing = [
            {"id": m, "object": "model", "created": core.created, "owned_by": "flintproxy-mock"}
            for m in settings.models
        ]
        self.models_body = orjson.dumps({"object": "list", "data": listing})

    def _head(self, kind: str, model: str, stream: bool) -> dict[str, Any]:
        obj = "text_completion" if kind != "chat" else "chat.completion" + ".chunk" * stream
        return {"object": obj, "created": self.core.created, "model": model,
                "system_fingerprint": None}

    def _chunk(
        self, kind: str, model: str, text: str | None, usage: bool, role: bool = False,
        finish: str = "stop",
    ) -> bytes:
        choice: dict[str, Any]
        if kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", "content": "", "refusal": None}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"text": text or "", "index": 0}
        choice |= {"logprobs": None, "finish_reason": None if text is not None or role else finish}
        event = self._head(kind, model, True) | {"choices": [choice]}
        return _after_id(event | {"usage": None} if usage else event, b"}\n\n")

    def _stream(self, kind: str, model: str, chunks: int, usage: bool,
                finish: str = "stop") -> _Stream:
        key = (kind, model, chunks, usage, finish)
        if (cached := self.streams.get(key)) is not None:
            return cached
        tails = [self._chunk(kind, model, None, usage, role=True)] if kind == "chat" else []
        start = len(tails)
        tails += [self._chunk(kind, model, f"tok{i} ", usage) for i in range(chunks)]
        tails.append(self._chunk(kind, model, None, usage, finish=finish))
        prefix = _after_id(self._head(kind, model, True) | {"choices": []}, b',"usage":')
        plan = _Stream(tuple(tails), start, prefix)
        if len(self.streams) < _CACHE_MAX:
            self.streams[key] = plan
        return plan

    def _body_tail(self, kind: str, model: str, chunks: int, finish: str = "stop") -> bytes:
        key = (kind, model, chunks, finish)
        if (cached := self.bodies.get(key)) is not None:
            return cached
        text = expected_content(chunks)
        choice: dict[str, Any] = {"index": 0}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            choice["message"]["annotations"] = []
        else:
            choice["text"] = text
        choice |= {"logprobs": None, "finish_reason": finish}
        tail = _after_id(self._head(kind, model, False) | {"choices": [choice]}, b',"usage":')
        if len(self.bodies) < _CACHE_MAX:
            self.bodies[key] = tail
        return tail

    async def generate(self, kind: str, request: web.Request) -> web.StreamResponse:
        body, ov = await self.core.intake(request)
        model: str = body["model"]
        prompt = prompt_tokens_for(body)
        idb = (b"chatcmpl-mock-%d" if kind == "chat" else b"cmpl-mock-%d") % next(self.core.ids)
        limit = completion_limit(body)
        finish = "stop"
        if limit is not None and limit < ov.chunks:
            ov, finish = ov._replace(chunks=limit), "length"
        billed = ov.chunks * choices_billed(kind, body)
        tool = mock_chat_tools.forced_tool(body) if kind == "chat" else None
        if tool is not None:
            return await mock_chat_tools.tool_call(
                self.core, request, body, ov, tool, ov.chunks, finish,
                orjson.loads(_usage_json(prompt, billed)))
        if body.get("stream"):
            opts = body.get("stream_options")
            usage = isinstance(opts, dict) and opts.get("include_usage") is True
            return await self._stream_out(request, kind, model, idb, ov, usage, prompt,
                                          finish, billed)
        wait = ov.first + ov.delay * ov.chunks  # as long as the stream would have taken
        if wait and not await self.core.wait(request, wait):
            raise self.core.gone()
        parts = (b'{"id":"', idb, self._body_tail(kind, model, ov.chunks, finish))
        return await self.core.plain(
            request, b"".join((*parts, _usage_json(prompt, billed), b"}")), ov
        )

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, ov = await self.core.intake(request)
        if ov.first and not await self.core.wait(request, ov.first):
            raise self.core.gone()
        inputs = body.get("input")
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and all(isinstance(v, int) for v in inputs)
        ):
            inputs = [inputs]  # one text, or one pre-tokenized text
        if not (isinstance(inputs, list) and inputs):
            raise error(400, "'input' must be a string or a non-empty array", param="input")
        dims = body.get("dimensions")
        dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else 8
        b64 = body.get("encoding_format") == "base64"  # the openai SDK's default
        data = []
        for i, item in enumerate(inputs):
            vec = embedding_vector(item if isinstance(item, str) else str(item), dims)
            emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = prompt_tokens_for({"input": inputs})
        usage = {"prompt_tokens": n, "total_tokens": n}
        out = {"object": "list", "data": data, "model": body["model"], "usage": usage}
        return await self.core.plain(request, orjson.dumps(out), ov)

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        _, ov = await self.core.intake(request)
        if ov.first and not await self.core.wait(request, ov.first):
            raise self.core.gone()
        return await self.core.plain(request, self.models_body, ov)

    async def _stream_out(
        self,
        request: web.Request,
        kind: str,
        model: str,
        idb: bytes,
        ov: Overrides,
        usage: bool,
        prompt: int,
        finish: str = "stop",
        billed: int | None = None,
    ) -> web.StreamResponse:
        head = b'data: {"id":"' + idb
        plan = self._stream(kind, model, ov.chunks, usage, finish)
        tails: Iterable[bytes] = plan.tails
        stop, gap = float(plan.start + ov.chunks), ov.delay
        if ov.fault == "endless":
            more = (self._chunk(kind, model, f"tok{i} ", usage) for i in itertools.count())
            tails = itertools.chain(plan.tails[: plan.start], more)
            stop, gap = math.inf, max(gap, 0.001)
        cut = plan.start + min(ov.arg, ov.chunks) if ov.fault == "reset" else -1
        resp = web.StreamResponse(headers=_SSE_HEADERS | fault_headers(ov))
        if ov.fault == "usage_in_content" and usage:  # usage rides on the last chunk
            last = self._head(kind, model, True) | {
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                "usage": orjson.loads(_usage_json(prompt, ov.chunks))}
            tails = (*plan.tails[:-1], _after_id(last, b"}\n\n"))
        with self.core.watch(True):
            await resp.prepare(request)  # sends the headers now, before the first chunk
            await self.core.pause(request, ov.first)
            if ov.fault == "malformed":
                tails = ()
                await resp.write(b"data: {not json\n\n")
            if ov.fault == "huge_event":  # one event of arg bytes, in 64 KiB writes
                await write_padded(resp, b'data: {"pad":"', ov.arg, b'"}\n\n')
            for i, tail in enumerate(tails):
                if i == cut:
                    self.core.abort(request)
                    return resp
                if gap and plan.start <= i < stop:
                    await self.core.pause(request, gap)
                await resp.write(head + tail)  # one event per write, as a real upstream
            if usage and ov.fault in USAGE_CHUNK:
                await resp.write(
                    b"".join((head, plan.usage_prefix,
                              _usage_json(prompt, ov.chunks if billed is None else billed),
                              b"}\n\n"))
                )
            await resp.write(_DONE)
            if ov.fault == "linger":  # the upstream's last bytes come late
                await self.core.pause(request, ov.arg / 1000)
                await resp.write(b": bye\n\n")
            self.core.completed()
        return resp
