"""Translation between OpenAI's chat completions and Anthropic's Messages: what both
directions share (the Translation interface, SSE and JSON helpers, the reason maps).

A ``/v1/messages`` client reaches an OpenAI-compatible upstream (``relay.via_chat``),
and a chat-completions client an Anthropic upstream (``relay.via_messages``): requests,
whole responses, streamed events (text, tool calls with their streamed arguments, stop
and finish reasons, usage) and errors; ``relay.formats.translation`` picks one. When
formats match the relay forwards bytes and never comes here: translation is the one
place where events are parsed and re-encoded (its cost is its own row in ``make bench``).

A translation holds one stream's state; the relay makes one per upstream attempt. Its
stream side takes whole SSE events (``http.sse.StreamScanner`` frames them and takes
the usage the gateway bills, from the upstream's own events) and returns the client's.
Malformed upstream events are skipped, as the byte relay would forward them unread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from flintproxy.errors import BadRequest

__all__ = ["ERROR_TYPES", "FINISH_OF_STOP", "STOP_OF_FINISH", "Translation", "arguments", "bad",
           "dict_of", "int_of", "list_of", "load", "named", "sse", "sse_events", "text_of"]

# Anthropic stop reasons and OpenAI finish reasons, both ways.
FINISH_OF_STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                  "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "stop"}
STOP_OF_FINISH = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                  "function_call": "tool_use", "content_filter": "refusal"}
# Anthropic's error types by the status an OpenAI-compatible upstream answered.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 529: "overloaded_error"}


def bad(message: str, param: str | None = None) -> BadRequest:
    return BadRequest(message, param=param)


def sse_events(block: bytes) -> Iterator[bytes]:
    """The data of each SSE event in a block of whole events (comments skipped)."""
    for event in block.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].lstrip(b" ") for line in event.split(b"\n")
                if line.startswith(b"data:")]
        if data:
            yield b"\n".join(data)


def load(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def text_of(content: object) -> str:
    """The text of a content that is a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def arguments(raw: object) -> Any:
    """A tool call's JSON arguments as an object (Anthropic's ``input``)."""
    if isinstance(raw, str):
        try:
            value = orjson.loads(raw or "{}")
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}
    return raw if isinstance(raw, dict) else {}


def dict_of(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def list_of(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def int_of(value: object) -> int:
    """An index as sent, 0 when it is not an integer (events are the upstream's text)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def named(obj: dict[str, Any]) -> bytes:
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
