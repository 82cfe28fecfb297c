"""A ``/v1/messages`` (Anthropic) client served by an OpenAI-compatible upstream's chat
completions: the request, the whole response, the stream's events and errors each
translated (see ``relay.translate``).

The stream: ``message_start`` and ``ping`` on the first chunk, a ``text`` block for
content deltas, a ``tool_use`` block per tool call (its arguments as
``input_json_delta`` pieces, as they arrive), and at ``[DONE]`` the blocks' stops,
``message_delta`` (the stop reason, the usage of the stream's usage chunk) and
``message_stop``.
"""

from __future__ import annotations

from typing import Any

import orjson

from flintproxy.http.sse import usage_from_dict
from flintproxy.relay.translate import (
    ERROR_TYPES,
    STOP_OF_FINISH,
    Translation,
    arguments,
    bad,
    dict_of,
    int_of,
    list_of,
    load,
    named,
    sse_events,
    text_of,
)

# Blocks of the model's own reasoning, which an OpenAI-compatible upstream cannot take back.
_DROPPED = frozenset(("thinking", "redacted_thinking"))


def _chat_content(blocks: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                              list[dict[str, Any]]]:
    """(content parts, tool calls, tool messages) of one Messages message's blocks."""
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in blocks:
        if not isinstance(block, dict):
            raise bad("Each content block must be an object.", "messages")
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            source = block.get("source")
            if not isinstance(source, dict):
                raise bad("An image block needs a source object.", "messages")
            url = (source.get("url") if source.get("type") == "url" else
                   f"data:{source.get('media_type')};base64,{source.get('data')}")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input", {}))
                                       .decode()}})
        elif kind == "tool_result":
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": text_of(block.get("content"))})
        elif kind not in _DROPPED:  # never content silently lost on the way
            raise bad(f"A {str(kind)[:40]!r} block cannot be sent to this model's upstream "
                      "(an OpenAI-compatible one).", "messages")
    return parts, calls, results


class MessagesViaChat(Translation):
    """A ``/v1/messages`` client, an upstream that speaks chat completions."""

    upstream_endpoint = "chat/completions"

    def __init__(self, model: str, wants_usage: bool = False) -> None:
        super().__init__(model, wants_usage)
        self.started = False
        self.block = -1  # the index of the open content block (-1: none)
        self.block_kind = ""
        self.tool = -1  # the upstream's index of the tool call in the open block
        self.stop: str | None = None
        self.usage: dict[str, Any] = {}
        self.id = ""

    def request(self, data: dict[str, Any], model: str) -> bytes:
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise bad("'messages' must be an array.", "messages")
        out: list[dict[str, Any]] = []
        system = data.get("system")
        if system is not None:
            if not isinstance(system, str | list):
                raise bad("'system' must be a string or an array of text blocks.", "system")
            out.append({"role": "system", "content": text_of(system)})
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ("user",
                                                                              "assistant"):
                raise bad("Each message must be an object with role 'user' or 'assistant'.",
                           "messages")
            role, content = message["role"], message.get("content")
            if isinstance(content, str):
                out.append({"role": role, "content": content})
                continue
            if not isinstance(content, list):
                raise bad("A message's content must be a string or an array.", "messages")
            parts, calls, results = _chat_content(content)
            out.extend(results)  # tool results answer the previous turn's calls first
            if role == "assistant":
                turn: dict[str, Any] = {"role": "assistant",
                                        "content": text_of(parts) or None}
                if calls:
                    turn["tool_calls"] = calls
                out.append(turn)
            elif parts:
                out.append({"role": "user", "content": parts})
        body: dict[str, Any] = {"model": model, "messages": out}
        for name in ("max_tokens", "temperature", "top_p"):
            if data.get(name) is not None:
                body[name] = data[name]
        if data.get("stop_sequences") is not None:
            body["stop"] = data["stop_sequences"]
        if data.get("stream") is True:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        tools = data.get("tools")
        if tools is not None:
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise bad("'tools' must be an array of objects.", "tools")
            body["tools"] = [{"type": "function", "function": {
                "name": t.get("name"), "description": t.get("description", ""),
                "parameters": t.get("input_schema", {"type": "object"})}} for t in tools]
        choice = data.get("tool_choice")
        if isinstance(choice, dict):
            kind = choice.get("type")
            body["tool_choice"] = (
                {"type": "function", "function": {"name": choice.get("name")}}
                if kind == "tool" else {"any": "required", "none": "none"}.get(str(kind), "auto"))
        metadata = data.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
            body["user"] = metadata["user_id"]
        return orjson.dumps(body)

    def _usage(self, usage: object) -> dict[str, Any]:
        u = usage_from_dict(usage)
        if u is None:
            return {"input_tokens": 0, "output_tokens": 0}
        return {"input_tokens": u.prompt_tokens - u.cached_tokens,
                "output_tokens": u.completion_tokens,
                "cache_read_input_tokens": u.cached_tokens,
                "cache_creation_input_tokens": 0}

    def response(self, body: bytes) -> bytes | None:
        obj = load(body)
        choices = obj.get("choices") if obj else None
        if obj is None or not isinstance(choices, list) or not choices \
                or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        message = dict_of(choice.get("message"))
        content: list[dict[str, Any]] = []
        text = message.get("content")
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        for call in list_of(message.get("tool_calls")):
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                content.append({"type": "tool_use", "id": call.get("id"),
                                "name": fn.get("name"), "input": arguments(fn.get("arguments"))})
        return orjson.dumps({
            "id": f"msg_{obj.get('id', '')}", "type": "message", "role": "assistant",
            "model": self.model, "content": content,
            "stop_reason": STOP_OF_FINISH.get(str(choice.get("finish_reason")), "end_turn"),
            "stop_sequence": None, "usage": self._usage(obj.get("usage"))})

    def error(self, status: int, body: bytes) -> bytes:
        obj = load(body)
        err = obj.get("error") if obj else None
        message = (err.get("message") if isinstance(err, dict) else None) or \
            f"The upstream answered HTTP {status}."
        return orjson.dumps({"type": "error", "error": {
            "type": ERROR_TYPES.get(status, "api_error"), "message": str(message)}})

    def _close_block(self, out: list[bytes]) -> None:
        if self.block >= 0 and self.block_kind:
            out.append(named({"type": "content_block_stop", "index": self.block}))
            self.block_kind = ""

    def _open_block(self, out: list[bytes], block: dict[str, Any]) -> None:
        self._close_block(out)
        self.block += 1
        self.block_kind = block["type"]
        out.append(named({"type": "content_block_start", "index": self.block,
                           "content_block": block}))

    def stream(self, block: bytes) -> bytes:
        out: list[bytes] = []
        for data in sse_events(block):
            if self.done:
                break
            if data == b"[DONE]":
                out.append(self.finish())
                continue
            obj = load(data)
            if obj is None:
                continue
            if isinstance(obj.get("error"), dict):
                err = obj["error"]
                out.append(named({"type": "error", "error": {
                    "type": "api_error", "message": str(err.get("message", "upstream error"))}}))
                self.done = True
                break
            if not self.started:
                self.started = True
                self.id = f"msg_{obj.get('id', '')}"
                out.append(named({"type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0}}}))
                out.append(named({"type": "ping"}))
            if isinstance(obj.get("usage"), dict):
                self.usage = self._usage(obj["usage"])
            choices = obj.get("choices")
            if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
                continue
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(out, delta)
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.stop = STOP_OF_FINISH.get(reason, "end_turn")
        return b"".join(out)

    def _delta(self, out: list[bytes], delta: dict[str, Any]) -> None:
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self.block_kind != "text":
                self._open_block(out, {"type": "text", "text": ""})
            out.append(named({"type": "content_block_delta", "index": self.block,
                               "delta": {"type": "text_delta", "text": text}}))
        for call in list_of(delta.get("tool_calls")):
            if not isinstance(call, dict):
                continue
            fn = dict_of(call.get("function"))
            index = int_of(call.get("index"))
            if self.block_kind != "tool_use" or index != self.tool:
                self.tool = index
                self._open_block(out, {"type": "tool_use", "id": call.get("id"),
                                       "name": fn.get("name"), "input": {}})
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                out.append(named({"type": "content_block_delta", "index": self.block,
                                   "delta": {"type": "input_json_delta", "partial_json": args}}))

    def finish(self) -> bytes:
        if self.done:
            return b""
        self.done = True
        out: list[bytes] = []
        if not self.started:
            return named({"type": "error", "error": {
                "type": "api_error", "message": "The upstream's stream ended empty."}})
        self._close_block(out)
        out.append(named({"type": "message_delta",
                           "delta": {"stop_reason": self.stop or "end_turn",
                                     "stop_sequence": None},
                           "usage": self.usage or {"output_tokens": 0}}))
        out.append(named({"type": "message_stop"}))
        return b"".join(out)
