"""The mock's chat tool calls: a chat request with ``tools`` and a ``tool_choice`` of
``"required"`` or a named function is answered with one ``tool_calls`` entry, as
OpenAI sends it (arguments ``{"query": "tok0 ... tokN"}``, streamed in pieces, one
token each; ``finish_reason: "tool_calls"``, or ``"length"`` at ``max_tokens``).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from flintproxy.tools.mock_events import MockCore, Plan, stream_events
from flintproxy.tools.mock_faults import Overrides

__all__ = ["forced_tool", "tool_call"]


def forced_tool(body: dict[str, Any]) -> str | None:
    """The function the request makes the model call, if any."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return str(choice["function"].get("name"))
    first = tools[0].get("function")
    return str(first.get("name")) if choice == "required" and isinstance(first, dict) else None


def _piece(i: int, chunks: int) -> str:
    return ('{"query": "' if i == 0 else "") + f"tok{i} " + ('"}' if i == chunks - 1 else "")


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def tool_call(core: MockCore, request: web.Request, body: dict[str, Any], ov: Overrides,
                    name: str, chunks: int, finish: str, usage: dict[str, Any]
                    ) -> web.StreamResponse:
    """Answer with one call of ``name`` whose arguments take ``chunks`` tokens."""
    finish = "tool_calls" if finish == "stop" else finish
    head = {"id": f"chatcmpl-mock-{next(core.ids)}", "created": core.created,
            "model": body["model"], "system_fingerprint": None}
    call = {"id": "call_mock1", "type": "function"}
    if not body.get("stream"):
        args = "".join(_piece(i, chunks) for i in range(chunks))
        message = {"role": "assistant", "content": None, "refusal": None,
                   "tool_calls": [{**call, "function": {"name": name, "arguments": args}}]}
        return await core.plain(request, orjson.dumps({
            **head, "object": "chat.completion", "choices": [{
                "index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage}), ov)
    chunk = {**head, "object": "chat.completion.chunk"}

    def choice(delta: dict[str, Any], reason: str | None = None) -> bytes:
        return _data({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                            "finish_reason": reason}]})

    def delta(i: int) -> bytes:
        return choice({"tool_calls": [{"index": 0,
                                       "function": {"arguments": _piece(i, chunks)}}]})

    opening = [choice({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, **call, "function": {"name": name, "arguments": ""}}]})]
    closing = [choice({}, finish)]
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage") is True:
        closing.append(_data({**chunk, "choices": [], "usage": usage}))
    closing.append(b"data: [DONE]\n\n")
    return await stream_events(core, request, Plan(opening, delta, closing), chunks, ov)
