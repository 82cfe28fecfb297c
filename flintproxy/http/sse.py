"""Server-sent events on the hot path: frame, scan for usage, strip, estimate.

The relay forwards the upstream's bytes untouched. To find usage without parsing
every chunk's JSON we search each block for ``"usage":{`` (a C-speed regex scan):
inside JSON string values a quote is always escaped, so an unescaped
``"usage":{`` can only be the key of a usage object, which appears once, in the
final usage chunk (``"usage":null`` on the other chunks does not match). Only the
event that matches is parsed.

Blocks are forwarded on SSE event boundaries: a trailing partial event is held
until its terminating blank line arrives, because a client cannot act on half an
event anyway, and because stripping the usage-only chunk needs whole events. A held
event larger than the configured bound is the upstream's fault (UpstreamTooLarge):
we never buffer without bound.

Usage the client did not ask for is removed: the usage-only chunk is cut out, and a
chunk that carries usage next to its choices (LiteLLM sends one) is re-encoded
without it. Every other event is forwarded byte for byte.

Three stream styles (``StreamStyle``), one scan. Chat and completions: usage in the
last chunk, the end is ``[DONE]``. The Responses API: usage once, in
``response.completed`` (whose response repeats the whole output: only its usage
object is parsed, never the event), the end is that event. Anthropic's Messages:
input and cache tokens in ``message_start``, output in ``message_delta`` (both small
events, parsed whole), the end is ``message_stop``. Their usage is never stripped:
it is part of those protocols.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import orjson

from flintproxy.http.client import UpstreamTooLarge

# The head lines of a stream whose upstream named no Content-Type.
SSE_HEAD = b"Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')
# The default bound on one held (partial) event; config: server.max_sse_event_bytes.
MAX_PENDING = 4 << 20
# The stream's end as upstreams send it: the last event of a block (or its first: a
# block starts on an event boundary). JSON text holds no raw newline, so after one it
# is the event itself, never content. Two suffix checks, no search: this runs per block.
DONE = b"data: [DONE]"
_DONE_ENDS = (b"\ndata: [DONE]\n\n", b"\ndata: [DONE]\r\n\r\n")
# Complete bodies up to this size are parsed whole for their usage (see extract_usage).
SMALL_BODY = 4096


class StreamStyle(StrEnum):
    """Where a stream carries its usage and its end (see the module docstring)."""

    CHAT = "chat"  # chat/completions and completions
    RESPONSES = "responses"
    ANTHROPIC = "anthropic"


@dataclass(slots=True)
class Usage:
    """Token counts, OpenAI's way: cached (cache reads) and cache_write are parts of prompt."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0

    def merge(self, other: Usage) -> None:
        """Counts reported in pieces (Anthropic's stream): the largest of each."""
        self.prompt_tokens = max(self.prompt_tokens, other.prompt_tokens)
        self.completion_tokens = max(self.completion_tokens, other.completion_tokens)
        self.cached_tokens = max(self.cached_tokens, other.cached_tokens)
        self.reasoning_tokens = max(self.reasoning_tokens, other.reasoning_tokens)
        self.cache_write_tokens = max(self.cache_write_tokens, other.cache_write_tokens)


def _int(value: object) -> int:
    # ``type() is int``: what JSON parses to a whole number, never a bool (which
    # isinstance lets through); one check instead of two isinstance calls.
    return value if type(value) is int and value >= 0 else 0


def _detail(obj: dict[str, object], name: str, key: str) -> int:
    details = obj.get(name)
    if type(details) is not dict:
        return 0
    value = details.get(key)
    return value if type(value) is int and value >= 0 else 0


def usage_from_dict(obj: object) -> Usage | None:
    """Usage in any of the three shapes: OpenAI's chat (prompt_tokens, ...), the Responses
    API's (input_tokens with input_tokens_details) and Anthropic's (input_tokens, which
    excludes its cache_creation_input_tokens and cache_read_input_tokens)."""
    if not isinstance(obj, dict):
        return None
    if "input_tokens" in obj or "output_tokens" in obj:
        written = _int(obj.get("cache_creation_input_tokens"))
        read = _int(obj.get("cache_read_input_tokens"))
        return Usage(
            prompt_tokens=_int(obj.get("input_tokens")) + written + read,
            completion_tokens=_int(obj.get("output_tokens")),
            cached_tokens=read + _detail(obj, "input_tokens_details", "cached_tokens"),
            reasoning_tokens=_detail(obj, "output_tokens_details", "reasoning_tokens"),
            # The Responses API counts its cache writes inside input_tokens already.
            cache_write_tokens=written + _detail(obj, "input_tokens_details",
                                                 "cache_write_tokens"),
        )
    # Chat's shape, once per stream: positional, as the fields are declared.
    return Usage(_int(obj.get("prompt_tokens")), _int(obj.get("completion_tokens")),
                 _detail(obj, "prompt_tokens_details", "cached_tokens"),
                 _detail(obj, "completion_tokens_details", "reasoning_tokens"))


def _object_end(buf: bytes, start: int) -> int:
    """Index just past the JSON object that opens at ``buf[start]``, or -1."""
    depth = 0
    in_string = False
    escaped = False
    for i in range(start, len(buf)):
        c = buf[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x7B:  # {
            depth += 1
        elif c == 0x7D:  # }
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


# A usage object as upstreams send it: at most one level of nested objects
# (prompt_tokens_details, completion_tokens_details); strings may hold anything.
_STR = rb'"(?:[^"\\]|\\.)*"'
USAGE_OBJECT_RE = re.compile(
    rb"\{(?:[^{}\"]|" + _STR + rb"|\{(?:[^{}\"]|" + _STR + rb")*\})*\}")


def _usage_at(buf: bytes, match: re.Match[bytes]) -> Usage | None:
    """Parse the usage object whose opening brace ends ``match``."""
    start = match.end() - 1
    obj = USAGE_OBJECT_RE.match(buf, start)
    # The regex covers what upstreams send; deeper nesting takes the general scanner.
    end = obj.end() if obj is not None else _object_end(buf, start)
    if end < 0:
        return None
    try:
        return usage_from_dict(orjson.loads(buf[start:end]))
    except orjson.JSONDecodeError:
        return None


def extract_usage(body: bytes) -> Usage | None:
    """Usage from a complete JSON response body, parsing only the usage object.

    A body up to SMALL_BODY is parsed whole instead: orjson reads a typical chat
    completion faster than the scan below finds and parses its usage object.
    """
    if len(body) <= SMALL_BODY:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return usage_from_dict(obj.get("usage")) if isinstance(obj, dict) else None
    match = None
    for match in USAGE_RE.finditer(body):  # noqa: B007 - the last one is the top level
        pass
    return None if match is None else _usage_at(body, match)


# What a well-formed 200 body of each endpoint holds: a list under this key.
_BODY_LIST = {"chat/completions": "choices", "completions": "choices", "embeddings": "data",
              "responses": "output", "messages": "content"}


def parse_body(body: bytes, endpoint: str) -> tuple[bool, Usage | None]:
    """Whether a complete 200 body is what ``endpoint`` answers (a JSON object with its
    ``choices``, ``data``, ``output`` or ``content`` list; count_tokens: its
    ``input_tokens``), and the usage it reports.

    One orjson parse of the whole body: an upstream's 200 is relayed only once it is
    known to be a response, never its garbage (nor a nesting orjson refuses).
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False, None
    if not isinstance(obj, dict):
        return False, None
    if endpoint == "messages/count_tokens":
        return isinstance(obj.get("input_tokens"), int), None
    if not isinstance(obj.get(_BODY_LIST.get(endpoint, "")), list):
        return False, None
    return True, usage_from_dict(obj.get("usage"))


def _last_boundary(buf: bytes, end: int) -> int:
    """Offset just past the last blank line (LF or CRLF) before ``end``, or 0."""
    lf = buf.rfind(b"\n\n", 0, end)
    # A CRLF boundary only matters after the last LF one: search just that far back.
    crlf = buf.rfind(b"\r\n\r\n", max(lf, 0), end)
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _event_end(buf: bytes, pos: int) -> int:
    """Offset just past the blank line ending the event holding ``buf[pos]``."""
    lf = buf.find(b"\n\n", pos)
    # Only a CRLF blank line that ends within the LF one's reach can come first, and
    # then it does (neither pair can begin inside the other).
    crlf = buf.find(b"\r\n\r\n", pos, lf + 4 if lf >= 0 else len(buf))
    if crlf >= 0:
        return crlf + 4
    return lf + 2 if lf >= 0 else len(buf)


def _event_data(event: bytes) -> bytes:
    """The payload of an SSE event (its data lines joined), for the rare parse."""
    line = event.rstrip(b"\r\n")
    if line.startswith(b"data:") and b"\n" not in line:  # one line, as upstreams send
        return line[5:].lstrip(b" ")
    lines = event.replace(b"\r\n", b"\n").split(b"\n")
    data = [ln[5:].lstrip(b" ") for ln in lines if ln.startswith(b"data:")]
    return b"\n".join(data)


# The events that end a stream of each style, as an event line: at the start of a
# block or after a raw newline (which JSON text never holds), so never content. Each
# name with and without its newline, made once: this runs per block.
def _last(*names: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((name, b"\n" + name) for name in names)


_LAST_EVENTS = {
    StreamStyle.RESPONSES: _last(b"event: response.completed", b"event: response.incomplete",
                                 b"event: response.failed"),
    StreamStyle.ANTHROPIC: _last(b"event: message_stop"),
}


def _ends_with_event(block: bytes, names: tuple[tuple[bytes, bytes], ...]) -> bool:
    return any(block.startswith(name) or line in block for name, line in names)


class StreamScanner:
    """Per-stream state: framing, usage, whether the stream's end went by, events relayed."""

    __slots__ = ("chat", "done", "events", "final", "last", "max_event", "pending",
                 "strip_usage", "style", "uncounted", "usage")

    def __init__(self, strip_usage: bool, max_event: int = MAX_PENDING,
                 style: StreamStyle = StreamStyle.CHAT) -> None:
        self.chat = style is StreamStyle.CHAT  # a plain bool: feed tests it per block
        self.strip_usage = strip_usage and self.chat
        self.max_event = max_event
        self.style = style
        self.last = _LAST_EVENTS.get(style, ())  # the events that end a non-chat stream
        self.pending = b""
        self.usage: Usage | None = None
        # The usage is the stream's total (chat: any usage; Responses: response.completed;
        # Anthropic: message_delta's). Otherwise it is what was known when it broke off.
        self.final = False
        self.events = 0  # data events forwarded, the basis of the token estimate
        # The last block returned, its data events not counted yet: counted when the
        # next block comes or the estimate is asked for, so the block that carries a
        # stream's total usage (often its only block) is never counted: the estimate
        # is not needed then (bench/micro_sse.py: 2.9 of the 12 us of a 20-chunk
        # stream fed as one block).
        self.uncounted = b""
        self.done = False  # the stream's last event is among the bytes returned

    def feed(self, data: bytes) -> bytes:
        """Take an upstream block; return the bytes to forward now (maybe empty).

        Raises UpstreamTooLarge when a partial event grows past ``max_event``.
        """
        if self.pending:
            data = self.pending + data
            self.pending = b""
        if data.endswith(b"\n\n"):
            complete = data
        else:
            # SSE allows CRLF line ends: "\r\n\r\n" ends an event too.
            cut = _last_boundary(data, len(data))
            if cut == 0:
                if len(data) > self.max_event:
                    raise UpstreamTooLarge(f"an SSE event over {self.max_event} bytes")
                self.pending = data
                return b""
            complete, self.pending = data[:cut], data[cut:]
            if len(self.pending) > self.max_event:
                raise UpstreamTooLarge(f"an SSE event over {self.max_event} bytes")
        if self.uncounted:
            self.events += self.uncounted.count(b"data:")
        if self.chat:
            if complete.endswith(_DONE_ENDS) or complete.startswith(DONE):
                self.done = True
        elif _ends_with_event(complete, self.last):
            self.done = True
        first = USAGE_RE.search(complete)
        if first is not None:
            if self.chat:
                complete = self._take_usage(complete, first.start())
            else:
                self._note_usage(complete, first.start())
        self.uncounted = complete  # as forwarded: without a usage-only event cut out
        return complete

    def _note_usage(self, complete: bytes, pos: int) -> None:
        """Usage of a Responses or Anthropic stream, which is never stripped."""
        anthropic = self.style is StreamStyle.ANTHROPIC
        seen: set[int] = set()
        for match in USAGE_RE.finditer(complete, pos):
            start = _last_boundary(complete, match.start())  # where its event begins
            if start in seen:
                continue
            seen.add(start)
            end = _event_end(complete, match.end())
            if anthropic:  # small events: parse whole, to know which one it is
                try:
                    obj = orjson.loads(_event_data(complete[start:end]))
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
                kind = obj.get("type")
                if kind == "message_start":
                    message = obj.get("message")
                    usage = usage_from_dict(message.get("usage")
                                            if isinstance(message, dict) else None)
                elif kind == "message_delta":
                    usage = usage_from_dict(obj.get("usage"))
                    self.final = usage is not None or self.final
                else:
                    continue
            else:
                # response.completed repeats the whole output: parse only the last
                # usage object of the event (the response's own; it follows "tools").
                last = match
                for later in USAGE_RE.finditer(complete, match.end(), end):
                    last = later
                usage = _usage_at(complete, last)
                self.final = usage is not None or self.final
            if usage is None:
                continue
            if self.usage is None:
                self.usage = usage
            else:
                self.usage.merge(usage)

    def _take_usage(self, complete: bytes, pos: int) -> bytes:
        # Slow path, normally once per stream: parse only the events holding usage;
        # when the client did not ask for usage, cut out the usage-only one and
        # re-encode one that also has choices without its usage. Matches (from the
        # first, at pos) are handled last to first so earlier offsets stay valid.
        latest: Usage | None = None
        for match in reversed(list(USAGE_RE.finditer(complete, pos))):
            start = _last_boundary(complete, match.start())  # where its event begins
            end = _event_end(complete, match.end())
            try:
                obj = orjson.loads(_event_data(complete[start:end]))
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            usage = usage_from_dict(obj.get("usage"))
            if usage is not None and latest is None:
                latest = usage  # the stream's last usage is its total
            if self.strip_usage and usage is not None:
                if obj.get("choices") == []:  # never forwarded, so never counted
                    complete = complete[:start] + complete[end:]
                else:
                    del obj["usage"]
                    event = b"data: " + orjson.dumps(obj) + b"\n\n"
                    complete = complete[:start] + event + complete[end:]
        if latest is not None:
            self.usage = latest
            self.final = True
        return complete

    def flush(self) -> bytes:
        """Whatever partial event is still held when the upstream ends cleanly."""
        rest, self.pending = self.pending, b""
        return rest

    def estimated_completion_tokens(self) -> int:
        # One content delta is about one token in OpenAI-style streams; the role
        # chunk and [DONE] make this a slight overestimate, never zero after output.
        if self.uncounted:
            self.events += self.uncounted.count(b"data:")
            self.uncounted = b""
        return self.events
