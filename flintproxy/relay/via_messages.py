"""A chat-completions client served by an Anthropic upstream's Messages API: the
request, the whole response, the stream's events and errors each translated (see
``relay.translate``).

Requests: system and developer messages become ``system``, tool calls ``tool_use``
blocks, tool messages ``tool_result`` blocks in a user turn, consecutive turns of one
role merged (Anthropic alternates), ``n`` above 1 refused. The stream: a role chunk at
``message_start``, a chunk per text or tool-argument delta, at ``message_stop`` the
finish chunk, the usage chunk when the client asked for it, and ``[DONE]``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from flintproxy.http.sse import usage_from_dict
from flintproxy.relay.translate import (
    FINISH_OF_STOP,
    Translation,
    arguments,
    bad,
    dict_of,
    int_of,
    list_of,
    load,
    sse,
    sse_events,
    text_of,
)


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
        raise bad("A message's content must be a string or an array of parts.", "messages")
    blocks = []
    for part in content:
        if not isinstance(part, dict):
            raise bad("Each content part must be an object.", "messages")
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str):
                blocks.append(_image_block(url))
        else:  # never content silently lost on the way
            raise bad(f"A {str(part.get('type'))[:40]!r} part cannot be sent to this model's "
                      "upstream (an Anthropic one).", "messages")
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
            raise bad("'messages' must be an array.", "messages")
        n = data.get("n")
        if n is not None and n != 1:
            raise bad("This model's upstream generates one choice per request: 'n' must be 1.",
                       "n")
        system: list[str] = []
        out: list[dict[str, Any]] = []
        for message in messages:
            if not isinstance(message, dict):
                raise bad("Each message must be an object.", "messages")
            role = message.get("role")
            content = message.get("content")
            if role in ("system", "developer"):
                system.append(text_of(content))
                continue
            if role == "tool":
                blocks = [{"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                           "content": text_of(content)}]
                role = "user"
            elif role == "assistant":
                blocks = _anthropic_blocks(content)
                for call in list_of(message.get("tool_calls")):
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        blocks.append({"type": "tool_use", "id": call.get("id"),
                                       "name": fn.get("name"),
                                       "input": arguments(fn.get("arguments"))})
            elif role == "user":
                blocks = _anthropic_blocks(content)
            else:
                raise bad(f"Unknown message role {str(role)[:40]!r}.", "messages")
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
                raise bad("'tools' must be an array of objects.", "tools")
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
        fn = dict_of(tool.get("function"))
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
        obj = load(body)
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
        obj = load(body)
        err = obj.get("error") if obj else None
        message = (err.get("message") if isinstance(err, dict) else None) or \
            f"The upstream answered HTTP {status}."
        kind = err.get("type") if isinstance(err, dict) else None
        return orjson.dumps({"error": {"message": str(message),
                                       "type": str(kind or "invalid_request_error"),
                                       "param": None, "code": None}})

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.model, "choices": [{"index": 0, "delta": delta,
                                                       "logprobs": None,
                                                       "finish_reason": finish}]})

    def stream(self, block: bytes) -> bytes:
        out: list[bytes] = []
        for data in sse_events(block):
            if self.done:
                break
            obj = load(data)
            if obj is None:
                continue
            kind = obj.get("type")
            if kind == "message_start":
                message = dict_of(obj.get("message"))
                self.id = f"chatcmpl-{message.get('id', '')}"
                self._note(message.get("usage"))
                out.append(self._chunk({"role": "assistant", "content": ""}))
            elif kind == "content_block_start":
                self._block_start(out, obj)
            elif kind == "content_block_delta":
                self._block_delta(out, obj)
            elif kind == "message_delta":
                delta = dict_of(obj.get("delta"))
                self.finish_reason = FINISH_OF_STOP.get(str(delta.get("stop_reason")), "stop")
                self._note(obj.get("usage"))
            elif kind == "message_stop":
                out.append(self.finish())
            elif kind == "error":
                err = dict_of(obj.get("error"))
                out.append(sse({"error": {"message": str(err.get("message", "upstream error")),
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
            self.tools[int_of(obj.get("index"))] = index
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
            index = self.tools.get(int_of(obj.get("index")))
            if index is not None and isinstance(delta.get("partial_json"), str):
                out.append(self._chunk({"tool_calls": [{
                    "index": index, "function": {"arguments": delta["partial_json"]}}]}))

    def finish(self) -> bytes:
        if self.done:
            return b""
        self.done = True
        out = [self._chunk({}, self.finish_reason)]
        if self.wants_usage:
            out.append(sse({"id": self.id, "object": "chat.completion.chunk",
                             "created": self.created, "model": self.model, "choices": [],
                             "usage": self._usage(self.usage)}))
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)
