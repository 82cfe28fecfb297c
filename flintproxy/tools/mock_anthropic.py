"""The mock upstream's Anthropic Messages API: ``POST /v1/messages`` (stream and not) and
``POST /v1/messages/count_tokens``, from Anthropic's published API reference.

Content is the mock's (``tok0 tok1 ...``, one output token each) and stops at the
request's ``max_tokens`` with ``stop_reason: "max_tokens"``. A request with ``tools``
and a ``tool_choice`` of ``any`` or ``tool`` is answered with one ``tool_use`` block
(input ``{"query": "tok0 ... tokN"}``, streamed as ``input_json_delta`` pieces),
``stop_reason: "tool_use"``. Usage: ``input_tokens`` counts the texts of system and
messages (len // 4 + 1 each); ``x-mock-cache: W,R`` adds W cache-creation and R
cache-read tokens. A stream's events, in order: ``message_start``,
``content_block_start``, ``ping``, ``content_block_delta``..., ``content_block_stop``,
``message_delta`` (stop reason, output tokens), ``message_stop``.

Errors are Anthropic-shaped (``{"type": "error", "error": {"type", "message"}}``); the
``x-mock-fault`` modes are the chat routes' (tools.mock_faults), plus ``http529`` (overloaded).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from flintproxy.tools.mock_events import MockCore, Plan, cache_tokens, event, stream_events
from flintproxy.tools.mock_events import tokens_of as _tokens
from flintproxy.tools.mock_faults import Overrides

__all__ = ["count_tokens", "messages"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


class _Error(web.HTTPException):
    """An error of any status (aiohttp has no class for Anthropic's 529)."""

    def __init__(self, status: int, text: str) -> None:
        self.status_code = status
        super().__init__(text=text, content_type="application/json")


def anthropic_error(status: int, message: str) -> web.HTTPException:
    return _Error(status, orjson.dumps({"type": "error", "error": {
        "type": _TYPES.get(status, "api_error"), "message": message}}).decode())


async def _intake(core: MockCore, request: web.Request) -> tuple[dict[str, Any], Overrides]:
    """The mock's intake, its errors reshaped as Anthropic's."""
    if request.headers.get("x-mock-fault") == "http529":
        await request.read()
        raise anthropic_error(529, "Overloaded")
    try:
        return await core.intake(request)
    except web.HTTPException as exc:
        if exc.status == 499 or not exc.text:
            raise
        try:
            message = orjson.loads(exc.text)["error"]["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise exc from None
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "retry-after"}
        err = anthropic_error(exc.status, message)
        err.headers.update(headers)
        raise err from None


def input_tokens(body: dict[str, Any]) -> int:
    """The input_tokens the mock reports for a Messages body."""
    system = body.get("system")
    return _tokens(system) + sum(_tokens(m.get("content")) for m in body.get("messages", ())
                                 if isinstance(m, dict))


def _validate(body: dict[str, Any], count_only: bool = False) -> None:
    if not isinstance(body.get("messages"), list):
        raise anthropic_error(400, "messages: Field required (an array)")
    if count_only:
        return
    limit = body.get("max_tokens")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise anthropic_error(400, "max_tokens: Field required (a positive integer)")


def _tool(body: dict[str, Any]) -> str | None:
    """The tool the request makes the model call, if any."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not isinstance(tools, list) or not tools or not isinstance(choice, dict):
        return None
    if choice.get("type") == "tool":
        return str(choice.get("name"))
    return str(tools[0].get("name")) if choice.get("type") == "any" else None


def _usage(prompt: int, output: int, cache: tuple[int, int]) -> dict[str, int]:
    return {"input_tokens": prompt, "cache_creation_input_tokens": cache[0],
            "cache_read_input_tokens": cache[1], "output_tokens": output}


async def messages(core: MockCore, request: web.Request) -> web.StreamResponse:
    body, ov = await _intake(core, request)
    _validate(body)
    model: str = body["model"]
    prompt = input_tokens(body)
    cache = cache_tokens(request)
    chunks, stop = ov.chunks, "end_turn"
    if body["max_tokens"] < chunks:
        chunks, stop = body["max_tokens"], "max_tokens"
    tool = _tool(body)
    if tool is not None and stop == "end_turn":
        stop = "tool_use"
    msg_id = f"msg_mock{next(core.ids)}"
    text = "".join(f"tok{i} " for i in range(chunks))
    if not body.get("stream"):
        wait = ov.first + ov.delay * chunks
        if wait and not await core.wait(request, wait):
            raise core.gone()
        block: dict[str, Any] = ({"type": "tool_use", "id": "toolu_mock1", "name": tool,
                                  "input": {"query": text}} if tool is not None
                                 else {"type": "text", "text": text})
        out = {"id": msg_id, "type": "message", "role": "assistant", "model": model,
               "content": [block], "stop_reason": stop, "stop_sequence": None,
               "usage": _usage(prompt, chunks, cache)}
        return await core.plain(request, orjson.dumps(out), ov)
    start = {"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": _usage(prompt, 1, cache)}}
    if tool is None:
        first: dict[str, Any] = {"type": "text", "text": ""}

        def delta(i: int) -> bytes:
            return event({"type": "content_block_delta", "index": 0,
                          "delta": {"type": "text_delta", "text": f"tok{i} "}})
    else:
        first = {"type": "tool_use", "id": "toolu_mock1", "name": tool, "input": {}}
        # The arguments {"query": "tok0 tok1 "} in pieces: the opening, a token each, the end.

        def delta(i: int) -> bytes:
            piece = ('{"query": "' if i == 0 else "") + f"tok{i} " + \
                ('"}' if i == chunks - 1 else "")
            return event({"type": "content_block_delta", "index": 0,
                          "delta": {"type": "input_json_delta", "partial_json": piece}})
    closing = [event({"type": "content_block_stop", "index": 0}),
               event({"type": "message_delta",
                      "delta": {"stop_reason": stop, "stop_sequence": None},
                      "usage": {"output_tokens": chunks}}),
               event({"type": "message_stop"})]
    plan = Plan([event(start), event({"type": "content_block_start", "index": 0,
                                      "content_block": first}), event({"type": "ping"})],
                delta, closing)
    return await stream_events(core, request, plan, chunks, ov)


async def count_tokens(core: MockCore, request: web.Request) -> web.StreamResponse:
    body, ov = await _intake(core, request)
    _validate(body, count_only=True)
    return await core.plain(request, orjson.dumps({"input_tokens": input_tokens(body)}), ov)
