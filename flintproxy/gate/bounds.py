"""Money bounds of a request: what it can cost at most, and the limit that holds the upstream to it.

CONTRACT promise 5 says a request never costs more than it reserved. A reservation
is only a bound if both of its halves are:

- **Prompt**: an upper bound, not an estimate. Every BPE tokenizer spends at least
  one UTF-8 byte per token, and a JSON body holds each text at least as long as its
  UTF-8 form (escapes only lengthen it), so the body's byte length bounds the tokens
  of all its text: messages, tools, schemas, role overhead, token-id arrays (``1,``
  is two bytes for one token). Media parts (images, audio, files) are the
  exception: a short URL can cost a thousand tokens and a long base64 payload far
  fewer than its bytes. Their strings are taken out of the byte count and each part
  is bounded by ``billing.max_tokens_per_media_part`` instead.
- **Completion**: the per-choice limit times the number of choices the upstream
  generates (``n``; on /v1/completions ``best_of`` and one set per prompt of a
  prompt array). The per-choice limit is the client's ``max_tokens`` /
  ``max_completion_tokens``, else ``billing.default_max_tokens``, never above the
  model's ``max_output_tokens``, and lowered to what the balance affords
  (``Billing.reserve``). Whenever the limit granted is not already what the body
  says, the body is rewritten (``with_limit``) so the upstream stops there and the
  client sees ``finish_reason: "length"``.

Parameter names: a limit the client sent is lowered under its own name (both, if it
sent both, so no provider can pick the larger). A limit the client did not send is
added as ``max_tokens``: the one name every OpenAI-compatible server accepts, and
the only one of /v1/completions. OpenAI's reasoning models want
``max_completion_tokens`` instead: configure ``limit_param`` for such a model.

Rate limits keep using the cheap estimate (``Call.prompt_tokens_estimate``): they
shape traffic, they do not hold money.

Everything here is a pure function of the parsed body; it runs once per request.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from flintproxy.errors import BadRequest

__all__ = ["LIMIT_PARAMS", "UNBILLED", "Bound", "completion_choices", "default_limit_param",
           "measure", "with_limit"]

# The per-choice output limits a client may send, in the order they are rewritten.
LIMIT_PARAMS = ("max_completion_tokens", "max_tokens")
# Other APIs name their one limit otherwise: the Responses API max_output_tokens, and
# Anthropic's Messages max_tokens (which it requires).
_LIMIT_NAMES = {"responses": ("max_output_tokens",), "messages": ("max_tokens",)}
# Endpoints that generate nothing and are not billed (authenticated and counted by the
# rate limiter's requests only).
UNBILLED = frozenset(("messages/count_tokens",))
# Content parts that are text (their bytes count), in chat, Responses and Messages
# bodies; any other part type is media. Tool calls and results are JSON text too.
_TEXT_PARTS = frozenset(("text", "refusal", "input_text", "output_text", "tool_use",
                         "tool_result", "thinking", "redacted_thinking", "function_call",
                         "function_call_output", "reasoning", "message"))
# Where a body keeps its messages (each with a ``content`` list of parts).
_MESSAGE_LISTS = ("messages", "input")


class Bound(NamedTuple):
    """What one request can cost, measured from its body (before prices and balance)."""

    text_bytes: int  # bytes of the body outside media parts: >= their tokens
    media_parts: int  # image/audio/file parts, each bounded by a configured maximum
    choices: int  # completions the upstream generates per request (0: embeddings)
    requested: int | None  # the client's per-choice limit (the least it sent), or None
    largest: int | None  # the largest limit it sent (a provider might honour that one)
    params: tuple[str, ...]  # the limit parameters the client sent

    def prompt_tokens(self, per_media_part: int) -> int:
        """Upper bound on the prompt tokens the upstream can report."""
        return self.text_bytes + self.media_parts * per_media_part


def _positive_int(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer.", param=name)
    return value


def _media_in(content: object, depth: int = 0) -> tuple[int, int]:
    """(media parts, length of their strings) in one message's ``content``."""
    if not isinstance(content, list):
        return 0, 0
    parts = skipped = 0
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            if kind == "tool_result" and depth < 4:  # its content may hold images
                p, s = _media_in(part.get("content"), depth + 1)
                parts += p
                skipped += s
            continue
        parts += 1
        # The payload: {"type": "image_url", "image_url": {"url": ...}}, Responses'
        # {"type": "input_image", "image_url": "..."}, Anthropic's {"type": "image",
        # "source": {...}} and kin. A str's length never exceeds its bytes in the body.
        for name, value in part.items():
            if isinstance(value, dict):
                skipped += sum(len(v) for v in value.values() if isinstance(v, str))
            elif isinstance(value, str) and name != "type":
                skipped += len(value)
    return parts, skipped


def _media(data: dict[str, Any]) -> tuple[int, int]:
    parts = skipped = 0
    for name in _MESSAGE_LISTS:
        messages = data.get(name)
        if type(messages) is not list:
            continue
        for message in messages:
            # Plain-text messages (the usual case) cost one dict lookup and a type check.
            if type(message) is dict and type(content := message.get("content")) is list:
                p, s = _media_in(content)
                parts += p
                skipped += s
    return parts, skipped


def default_limit_param(endpoint: str, configured: str) -> str:
    """The limit parameter to add to a body that sent none (the model's ``limit_param``
    for chat and completions)."""
    names = _LIMIT_NAMES.get(endpoint)
    return configured if names is None else names[0]


def completion_choices(endpoint: str, data: dict[str, Any]) -> int:
    """How many completions the upstream generates (and bills) for this body."""
    if endpoint == "embeddings" or endpoint in UNBILLED:
        return 0
    if endpoint in _LIMIT_NAMES:  # one output per request
        return 1
    n = _positive_int(data, "n") or 1
    if endpoint != "completions":
        return n
    best_of = _positive_int(data, "best_of") or 1
    prompt = data.get("prompt")
    # A list of strings or of token-id lists is a batch: one set of choices per prompt.
    prompts = (len(prompt) if isinstance(prompt, list) and prompt
               and not isinstance(prompt[0], int) else 1)
    return max(n, best_of) * prompts


def measure(endpoint: str, data: dict[str, Any], body_len: int) -> Bound:
    """The request's Bound; raises 400 for a malformed ``n``, ``best_of`` or limit."""
    get = data.get
    params: tuple[str, ...] = ()
    least = most = None
    names = _LIMIT_NAMES.get(endpoint, LIMIT_PARAMS)
    sent = [name for name in names if get(name) is not None]
    if sent:  # validated only when sent
        limits = [_positive_int(data, name) or 0 for name in sent]
        params, least, most = tuple(sent), min(limits), max(limits)
    skipped = parts = 0
    if endpoint == "chat/completions":
        parts, skipped = _media(data)
        choices = 1 if get("n") is None else completion_choices(endpoint, data)
    else:
        if endpoint != "completions" and endpoint != "embeddings":
            parts, skipped = _media(data)
        choices = completion_choices(endpoint, data)
    return Bound(body_len - skipped, parts, choices, least, most, params)


def with_limit(data: dict[str, Any], body: bytes,
               limit: tuple[tuple[str, ...], int] | None) -> bytes:
    """The body to send: ``body`` itself when ``limit`` is None, else with the named
    limit parameters set to the granted tokens. ``data`` is updated too (a model
    rename re-encodes it later).

    An absent limit (the common case) is spliced in after the opening brace, as
    re-encoding a long prompt costs far more; a limit being lowered is re-encoded.
    """
    if limit is None:
        return body
    names, granted = limit
    if len(names) == 1 and names[0] not in data:
        data[names[0]] = granted
        # A JSON object with at least "model" in it (parse_call checked): a comma fits.
        i = body.index(b"{") + 1
        return b"%s\"%s\":%d,%s" % (body[:i], names[0].encode(), granted, body[i:])
    for name in names:
        data[name] = granted
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:  # orjson encodes 255 levels deep, decodes 1024
        raise BadRequest("The request body is nested too deeply.") from None
