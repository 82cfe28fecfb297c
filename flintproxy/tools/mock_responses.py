"""The mock upstream's OpenAI Responses API: ``POST /v1/responses`` (stream and not), from
OpenAI's published API reference.

Content is the mock's (``tok0 tok1 ...``, one output token each); ``max_output_tokens``
below that ends the response ``status: "incomplete"`` (reason ``max_output_tokens``).
Usage: ``input_tokens`` counts ``instructions`` and the input's texts (len // 4 + 1
each); ``x-mock-cache: W,R`` reports R of them as cached. The stream's events, in
order: ``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``...,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, then ``response.completed`` (or
``response.incomplete``), whose response repeats the output and carries the usage
last. The ``x-mock-fault`` modes are the chat routes' (tools.mock_faults).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from flintproxy.tools.mock_events import MockCore, Plan, cache_tokens, event, stream_events
from flintproxy.tools.mock_events import tokens_of as _tokens

__all__ = ["responses"]


def input_tokens(body: dict[str, Any]) -> int:
    """The input_tokens the mock reports for a Responses body."""
    items = body.get("input")
    count = _tokens(body.get("instructions"))
    if isinstance(items, str):
        return count + _tokens(items)
    if isinstance(items, list):
        count += sum(_tokens(i.get("content")) for i in items if isinstance(i, dict))
    return count


def _response(body: dict[str, Any], resp_id: str, created: int, status: str,
              output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {"id": resp_id, "object": "response", "created_at": created, "status": status,
            "error": None, "incomplete_details": incomplete,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": body["model"],
            "output": output, "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": body.get("store", True),
            "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
            "tools": body.get("tools", []), "top_p": 1.0, "truncation": "disabled",
            "user": None, "metadata": {}, "usage": usage}


async def responses(core: MockCore, request: web.Request) -> web.StreamResponse:
    body, ov = await core.intake(request)
    if body.get("input") is None:
        raise web.HTTPBadRequest(text=orjson.dumps({"error": {
            "message": "Missing required parameter: 'input'.", "type": "invalid_request_error",
            "param": "input", "code": "missing_required_parameter"}}).decode(),
            content_type="application/json")
    n = next(core.ids)
    resp_id, item_id = f"resp_mock{n}", f"msg_mock{n}"
    chunks, status = ov.chunks, "completed"
    limit = body.get("max_output_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < chunks:
        chunks, status = limit, "incomplete"
    prompt = input_tokens(body)
    cached = min(cache_tokens(request)[1], prompt)
    usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
             "output_tokens": chunks, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": prompt + chunks}
    text = "".join(f"tok{i} " for i in range(chunks))
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [part]}
    final = _response(body, resp_id, core.created, status, [item], usage)
    if not body.get("stream"):
        wait = ov.first + ov.delay * chunks
        if wait and not await core.wait(request, wait):
            raise core.gone()
        return await core.plain(request, orjson.dumps(final), ov)
    seq = iter(range(1 << 62))
    opening_response = _response(body, resp_id, core.created, "in_progress", [], None)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    opening = [
        event({"type": "response.created", "sequence_number": next(seq),
               "response": opening_response}),
        event({"type": "response.in_progress", "sequence_number": next(seq),
               "response": opening_response}),
        event({"type": "response.output_item.added", "sequence_number": next(seq),
               "output_index": 0, "item": {**item, "status": "in_progress", "content": []}}),
        event({"type": "response.content_part.added", "sequence_number": next(seq), **where,
               "part": {"type": "output_text", "text": "", "annotations": []}}),
    ]
    base = next(seq)

    def delta(i: int) -> bytes:
        return event({"type": "response.output_text.delta", "sequence_number": base + i,
                      **where, "delta": f"tok{i} ", "logprobs": []})

    after = base + chunks
    closing = [
        event({"type": "response.output_text.done", "sequence_number": after, **where,
               "text": text, "logprobs": []}),
        event({"type": "response.content_part.done", "sequence_number": after + 1, **where,
               "part": part}),
        event({"type": "response.output_item.done", "sequence_number": after + 2,
               "output_index": 0, "item": item}),
        event({"type": f"response.{status}", "sequence_number": after + 3,
               "response": final}),
    ]
    return await stream_events(core, request, Plan(opening, delta, closing), chunks, ov)
