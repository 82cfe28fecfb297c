"""Translation between OpenAI's chat completions and Anthropic's Messages.

A ``/v1/messages`` client reaches an OpenAI-compatible upstream (``MessagesViaChat``),
and a chat-completions client an Anthropic upstream (``ChatViaMessages``): requests,
whole responses, streamed events (text, tool calls with their streamed arguments, stop
and finish reasons, usage) and errors. When formats match the relay forwards bytes and
never comes here: this is the one place where events are parsed and re-encoded (its
cost is its own row in ``make bench``).

A translation holds one stream's state; the relay makes one per upstream attempt. Its
stream side takes whole SSE events (``http.sse.StreamScanner`` frames them and takes
the usage the gateway bills, from the upstream's own events) and returns the client's.
Malformed upstream events are skipped, as the byte relay would forward them unread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson

from flintproxy.config import UpstreamKind
from flintproxy.errors import BadRequest
from flintproxy.http.sse import usage_from_dict

__all__ = ["ChatViaMessages", "MessagesViaChat", "Translation", "translation"]

# Anthropic stop reasons and OpenAI finish reasons, both ways.
FINISH_OF_STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop"}
STOP_OF_FINISH = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                  "function_call": "tool_use", "content_filter": "refusal"}
# Anthropic's error types by the status an OpenAI-compatible upstream answered.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 529: "overloaded_error"}


def _bad(message: str, param: str | None = None) -> BadRequest:
    return BadRequest(message, param=param)


def _events(block: bytes) -> Iterator[bytes]:
    """The data of each SSE event in a block of whole events (comments skipped)."""
    for event in block.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].lstrip(b" ") for line in event.split(b"\n")
                if line.startswith(b"data:")]
        if data:
            yield b"\n".join(data)


def _load(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _text_of(content: object) -> str:
    """The text of a content that is a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _arguments(raw: object) -> Any:
    """A tool call's JSON arguments as an object (Anthropic's ``input``)."""
    if isinstance(raw, str):
        try:
            value = orjson.loads(raw or "{}")
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}
    return raw if isinstance(raw, dict) else {}


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _named(obj: dict[str, Any]) -> bytes:
    kind: str = obj["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


class Translation:
    """One request's translation; see the module docstring."""

    upstream_endpoint = ""

    def __init__(self, model: str, wants_usage: bool = False) -> None:
        self.model = model  # the client's name for it, as the client sees it echoed
        self.wants_usage = wants_usage
        self.done = False

    def request(self, data: dict[str, Any], model: str) -> bytes:
        """The upstream's request body for the client's ``data`` (``model``: its name)."""
        raise NotImplementedError

    def response(self, body: bytes) -> bytes | None:
        """The client's body for an upstream's 200 body; None when that is malformed."""
        raise NotImplementedError

    def error(self, status: int, body: bytes) -> bytes:
        """The client's error body for an upstream's error response."""
        raise NotImplementedError

    def stream(self, block: bytes) -> bytes:
        """The client's events for a block of whole upstream events."""
        raise NotImplementedError

    def finish(self) -> bytes:
        """The client's last events when the upstream ended without its own last one."""
        raise NotImplementedError


def translation(endpoint: str, kind: UpstreamKind, model: str,
                wants_usage: bool) -> Translation | None:
    """The translation a client's ``endpoint`` needs to an upstream of ``kind``, if any."""
    if endpoint == "messages" and kind is UpstreamKind.OPENAI:
        return MessagesViaChat(model, wants_usage)
    if endpoint == "chat/completions" and kind is UpstreamKind.ANTHROPIC:
        return ChatViaMessages(model, wants_usage)
    return None


# --- a Messages client, an OpenAI-compatible upstream ----------------------------------


def _chat_content(blocks: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                              list[dict[str, Any]]]:
    """(content parts, tool calls, tool messages) of one Messages message's blocks."""
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in blocks:
        if not isinstance(block, dict):
            raise _bad("Each content block must be an object.", "messages")
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            source = block.get("source")
            if not isinstance(source, dict):
                raise _bad("An image block needs a source object.", "messages")
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
                            "content": _text_of(block.get("content"))})
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
            raise _bad("'messages' must be an array.", "messages")
        out: list[dict[str, Any]] = []
        system = data.get("system")
        if system is not None:
            if not isinstance(system, str | list):
                raise _bad("'system' must be a string or an array of text blocks.", "system")
            out.append({"role": "system", "content": _text_of(system)})
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ("user",
                                                                              "assistant"):
                raise _bad("Each message must be an object with role 'user' or 'assistant'.",
                           "messages")
            role, content = message["role"], message.get("content")
            if isinstance(content, str):
                out.append({"role": role, "content": content})
                continue
            if not isinstance(content, list):
                raise _bad("A message's content must be a string or an array.", "messages")
            parts, calls, results = _chat_content(content)
            out.extend(results)  # tool results answer the previous turn's calls first
            if role == "assistant":
                turn: dict[str, Any] = {"role": "assistant",
                                        "content": _text_of(parts) or None}
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
                raise _bad("'tools' must be an array of objects.", "tools")
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
        obj = _load(body)
        choices = obj.get("choices") if obj else None
        if obj is None or not isinstance(choices, list) or not choices \
                or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        message = _dict(choice.get("message"))
        content: list[dict[str, Any]] = []
        text = message.get("content")
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        for call in message.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                content.append({"type": "tool_use", "id": call.get("id"),
                                "name": fn.get("name"), "input": _arguments(fn.get("arguments"))})
        return orjson.dumps({
            "id": f"msg_{obj.get('id', '')}", "type": "message", "role": "assistant",
            "model": self.model, "content": content,
            "stop_reason": STOP_OF_FINISH.get(str(choice.get("finish_reason")), "end_turn"),
            "stop_sequence": None, "usage": self._usage(obj.get("usage"))})

    def error(self, status: int, body: bytes) -> bytes:
        obj = _load(body)
        err = obj.get("error") if obj else None
        message = (err.get("message") if isinstance(err, dict) else None) or \
            f"The upstream answered HTTP {status}."
        return orjson.dumps({"type": "error", "error": {
            "type": _ERROR_TYPES.get(status, "api_error"), "message": str(message)}})

    def _close_block(self, out: list[bytes]) -> None:
        if self.block >= 0 and self.block_kind:
            out.append(_named({"type": "content_block_stop", "index": self.block}))
            self.block_kind = ""

    def _open_block(self, out: list[bytes], block: dict[str, Any]) -> None:
        self._close_block(out)
        self.block += 1
        self.block_kind = block["type"]
        out.append(_named({"type": "content_block_start", "index": self.block,
                           "content_block": block}))

    def stream(self, block: bytes) -> bytes:
        out: list[bytes] = []
        for data in _events(block):
            if self.done:
                break
            if data == b"[DONE]":
                out.append(self.finish())
                continue
            obj = _load(data)
            if obj is None:
                continue
            if isinstance(obj.get("error"), dict):
                err = obj["error"]
                out.append(_named({"type": "error", "error": {
                    "type": "api_error", "message": str(err.get("message", "upstream error"))}}))
                self.done = True
                break
            if not self.started:
                self.started = True
                self.id = f"msg_{obj.get('id', '')}"
                out.append(_named({"type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": 0, "output_tokens": 0}}}))
                out.append(_named({"type": "ping"}))
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
            out.append(_named({"type": "content_block_delta", "index": self.block,
                               "delta": {"type": "text_delta", "text": text}}))
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            fn = _dict(call.get("function"))
            index = call.get("index", 0)
            if self.block_kind != "tool_use" or index != self.tool:
                self.tool = index
                self._open_block(out, {"type": "tool_use", "id": call.get("id"),
                                       "name": fn.get("name"), "input": {}})
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                out.append(_named({"type": "content_block_delta", "index": self.block,
                                   "delta": {"type": "input_json_delta", "partial_json": args}}))

    def finish(self) -> bytes:
        if self.done:
            return b""
        self.done = True
        out: list[bytes] = []
        if not self.started:
            return _named({"type": "error", "error": {
                "type": "api_error", "message": "The upstream's stream ended empty."}})
        self._close_block(out)
        out.append(_named({"type": "message_delta",
                           "delta": {"stop_reason": self.stop or "end_turn",
                                     "stop_sequence": None},
                           "usage": self.usage or {"output_tokens": 0}}))
        out.append(_named({"type": "message_stop"}))
        return b"".join(out)


# --- a chat-completions client, an Anthropic upstream ----------------------------------


def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        media, _, payload = url[5:].partition(";base64,")
        return {"type": "image", "source": {"type": "base64", "media_type": media,
                                            "data": payload}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _anthropic_blocks(content: object) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        if content is None:
            return []
        raise _bad("A message's content must be a string or an array of parts.", "messages")
    blocks = []
    for part in content:
        if not isinstance(part, dict):
            raise _bad("Each content part must be an object.", "messages")
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str):
                blocks.append(_image_block(url))
    return blocks


class ChatViaMessages(Translation):
    """A chat-completions client, an upstream that speaks Anthropic's Messages."""

    upstream_endpoint = "messages"

    def __init__(self, model: str, wants_usage: bool = False) -> None:
        super().__init__(model, wants_usage)
        self.id = ""
        self.created = int(time.time())
        self.tools: dict[int, int] = {}  # Anthropic's block index -> the tool call's index
        self.finish_reason = "stop"
        self.usage: dict[str, Any] = {}

    def request(self, data: dict[str, Any], model: str) -> bytes:
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise _bad("'messages' must be an array.", "messages")
        n = data.get("n")
        if n is not None and n != 1:
            raise _bad("This model's upstream generates one choice per request: 'n' must be 1.",
                       "n")
        system: list[str] = []
        out: list[dict[str, Any]] = []
        for message in messages:
            if not isinstance(message, dict):
                raise _bad("Each message must be an object.", "messages")
            role = message.get("role")
            content = message.get("content")
            if role in ("system", "developer"):
                system.append(_text_of(content))
                continue
            if role == "tool":
                blocks = [{"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                           "content": _text_of(content)}]
                role = "user"
            elif role == "assistant":
                blocks = _anthropic_blocks(content)
                for call in message.get("tool_calls") or ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        blocks.append({"type": "tool_use", "id": call.get("id"),
                                       "name": fn.get("name"),
                                       "input": _arguments(fn.get("arguments"))})
            elif role == "user":
                blocks = _anthropic_blocks(content)
            else:
                raise _bad(f"Unknown message role {str(role)[:40]!r}.", "messages")
            if not blocks:
                continue
            if out and out[-1]["role"] == role:  # Anthropic alternates roles
                out[-1]["content"].extend(blocks)
            else:
                out.append({"role": role, "content": blocks})
        limits = [v for v in (data.get("max_tokens"), data.get("max_completion_tokens"))
                  if isinstance(v, int) and not isinstance(v, bool)]
        body: dict[str, Any] = {"model": model, "messages": out,
                                "max_tokens": min(limits) if limits else 4096}
        if system:
            body["system"] = "\n\n".join(system)
        for name in ("temperature", "top_p"):
            if data.get(name) is not None:
                body[name] = data[name]
        stop = data.get("stop")
        if stop is not None:
            body["stop_sequences"] = [stop] if isinstance(stop, str) else stop
        if data.get("stream") is True:
            body["stream"] = True
        tools = data.get("tools")
        if tools is not None:
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise _bad("'tools' must be an array of objects.", "tools")
            body["tools"] = [self._tool(t) for t in tools]
        choice = data.get("tool_choice")
        if isinstance(choice, str):
            body["tool_choice"] = {"type": {"required": "any"}.get(choice, choice)}
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            body["tool_choice"] = {"type": "tool", "name": choice["function"].get("name")}
        if isinstance(data.get("user"), str):
            body["metadata"] = {"user_id": data["user"]}
        return orjson.dumps(body)

    @staticmethod
    def _tool(tool: dict[str, Any]) -> dict[str, Any]:
        fn = _dict(tool.get("function"))
        return {"name": fn.get("name"), "description": fn.get("description", ""),
                "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}

    def _usage(self, usage: object) -> dict[str, Any]:
        u = usage_from_dict(usage)
        if u is None:
            return {}
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": 0}}

    def response(self, body: bytes) -> bytes | None:
        obj = _load(body)
        content = obj.get("content") if obj else None
        if obj is None or not isinstance(content, list):
            return None
        text = "".join(b["text"] for b in content
                       if isinstance(b, dict) and b.get("type") == "text"
                       and isinstance(b.get("text"), str))
        calls = [{"id": b.get("id"), "type": "function",
                  "function": {"name": b.get("name"),
                               "arguments": orjson.dumps(b.get("input", {})).decode()}}
                 for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]
        message: dict[str, Any] = {"role": "assistant", "content": text or None,
                                   "refusal": None}
        if calls:
            message["tool_calls"] = calls
        return orjson.dumps({
            "id": f"chatcmpl-{obj.get('id', '')}", "object": "chat.completion",
            "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH_OF_STOP.get(str(obj.get("stop_reason")),
                                                             "stop")}],
            "usage": self._usage(obj.get("usage"))})

    def error(self, status: int, body: bytes) -> bytes:
        obj = _load(body)
        err = obj.get("error") if obj else None
        message = (err.get("message") if isinstance(err, dict) else None) or \
            f"The upstream answered HTTP {status}."
        kind = err.get("type") if isinstance(err, dict) else None
        return orjson.dumps({"error": {"message": str(message),
                                       "type": str(kind or "invalid_request_error"),
                                       "param": None, "code": None}})

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.model, "choices": [{"index": 0, "delta": delta,
                                                       "logprobs": None,
                                                       "finish_reason": finish}]})

    def stream(self, block: bytes) -> bytes:
        out: list[bytes] = []
        for data in _events(block):
            if self.done:
                break
            obj = _load(data)
            if obj is None:
                continue
            kind = obj.get("type")
            if kind == "message_start":
                message = _dict(obj.get("message"))
                self.id = f"chatcmpl-{message.get('id', '')}"
                self._note(message.get("usage"))
                out.append(self._chunk({"role": "assistant", "content": ""}))
            elif kind == "content_block_start":
                self._block_start(out, obj)
            elif kind == "content_block_delta":
                self._block_delta(out, obj)
            elif kind == "message_delta":
                delta = _dict(obj.get("delta"))
                self.finish_reason = FINISH_OF_STOP.get(str(delta.get("stop_reason")), "stop")
                self._note(obj.get("usage"))
            elif kind == "message_stop":
                out.append(self.finish())
            elif kind == "error":
                err = _dict(obj.get("error"))
                out.append(_sse({"error": {"message": str(err.get("message", "upstream error")),
                                           "type": str(err.get("type", "api_error")),
                                           "param": None, "code": None}}))
                self.done = True
        return b"".join(out)

    def _note(self, usage: object) -> None:
        if isinstance(usage, dict):
            merged = {**self.usage, **{k: v for k, v in usage.items() if v is not None}}
            self.usage = merged

    def _block_start(self, out: list[bytes], obj: dict[str, Any]) -> None:
        block = obj.get("content_block")
        if isinstance(block, dict) and block.get("type") == "tool_use":
            index = len(self.tools)
            self.tools[obj.get("index", 0)] = index
            out.append(self._chunk({"tool_calls": [{
                "index": index, "id": block.get("id"), "type": "function",
                "function": {"name": block.get("name"), "arguments": ""}}]}))

    def _block_delta(self, out: list[bytes], obj: dict[str, Any]) -> None:
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return
        if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
            out.append(self._chunk({"content": delta["text"]}))
        elif delta.get("type") == "input_json_delta":
            index = self.tools.get(obj.get("index", 0))
            if index is not None and isinstance(delta.get("partial_json"), str):
                out.append(self._chunk({"tool_calls": [{
                    "index": index, "function": {"arguments": delta["partial_json"]}}]}))

    def finish(self) -> bytes:
        if self.done:
            return b""
        self.done = True
        out = [self._chunk({}, self.finish_reason)]
        if self.wants_usage:
            out.append(_sse({"id": self.id, "object": "chat.completion.chunk",
                             "created": self.created, "model": self.model, "choices": [],
                             "usage": self._usage(self.usage)}))
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)
