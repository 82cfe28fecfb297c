"""The API formats of the data plane: which upstream kind serves which endpoint, how, and
in what shape a client gets its errors.

Two upstream kinds (``config.UpstreamKind``). An endpoint an upstream speaks is relayed
byte for byte; ``messages`` to an OpenAI-compatible upstream and ``chat/completions``
to an Anthropic one go through ``relay.translate`` (the one place events are
re-encoded); anything else is not served by that upstream.

Errors: OpenAI's shape on every route but Anthropic's two, which get Anthropic's
(``{"type": "error", "error": {"type", "message"}}``, its type names and its 529 for
overload); mid-stream, each format's own error event.

Provider storage (CONTRACT promise 10): the Responses API stores conversations at the
provider unless told ``store: false``, and chat's ``store: true`` asks it to. Unless
the model's ``allow_provider_storage`` is set, the body is sent with ``store: false``
and requests that need stored state are refused with a 400 that says why.
"""

from __future__ import annotations

from typing import Any

import orjson

from flintproxy.config import UpstreamKind
from flintproxy.errors import BadRequest, FlintError
from flintproxy.http.sse import StreamStyle
from flintproxy.relay.translate import Translation
from flintproxy.relay.via_chat import MessagesViaChat
from flintproxy.relay.via_messages import ChatViaMessages

__all__ = ["ANTHROPIC_ENDPOINTS", "NAMED_EVENTS", "OPENAI_NATIVE", "STORED_STATE",
           "error_event", "error_response", "provider_storage", "stream_style", "translation",
           "upstream_endpoint"]

# What each kind answers natively.
NATIVE: dict[UpstreamKind, frozenset[str]] = {
    UpstreamKind.OPENAI: frozenset(("chat/completions", "completions", "embeddings",
                                    "responses")),
    UpstreamKind.ANTHROPIC: frozenset(("messages", "messages/count_tokens")),
}
OPENAI_NATIVE = NATIVE[UpstreamKind.OPENAI]
# (client endpoint, upstream kind) -> the upstream endpoint a translation calls.
TRANSLATED: dict[tuple[str, UpstreamKind], str] = {
    ("messages", UpstreamKind.OPENAI): "chat/completions",
    ("chat/completions", UpstreamKind.ANTHROPIC): "messages",
}
ANTHROPIC_ENDPOINTS = frozenset(("messages", "messages/count_tokens"))
# Endpoints whose streams name their events (an error event is ``event: error``).
NAMED_EVENTS = ANTHROPIC_ENDPOINTS | {"responses"}
_ANTHROPIC_ROUTES = frozenset(("/v1/messages", "/v1/messages/count_tokens"))
_STYLES = {"responses": StreamStyle.RESPONSES, "messages": StreamStyle.ANTHROPIC}

# Anthropic's error type names by status; others by class (api_error).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 408: "timeout_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
    504: "timeout_error", 529: "overloaded_error",
}

STORED_STATE = (
    "This gateway processes payloads ephemerally: it asks the provider not to store "
    "responses (store: false), so there is no stored state to refer to. Send the whole "
    "conversation instead, or ask the operator to allow provider storage for this model.")


def upstream_endpoint(endpoint: str, kind: UpstreamKind) -> str | None:
    """The endpoint to call on an upstream of ``kind`` for a client's ``endpoint``
    (itself when native), or None when that kind cannot serve it."""
    if endpoint in NATIVE[kind]:
        return endpoint
    return TRANSLATED.get((endpoint, kind))


def translation(endpoint: str, kind: UpstreamKind, model: str,
                wants_usage: bool) -> Translation | None:
    """The translation a client's ``endpoint`` needs to an upstream of ``kind``, if any
    (``model``: the client's name for it, echoed back)."""
    if endpoint == "messages" and kind is UpstreamKind.OPENAI:
        return MessagesViaChat(model, wants_usage)
    if endpoint == "chat/completions" and kind is UpstreamKind.ANTHROPIC:
        return ChatViaMessages(model, wants_usage)
    return None


def stream_style(upstream_ep: str) -> StreamStyle:
    """How the stream of an upstream endpoint carries its usage and end."""
    return _STYLES.get(upstream_ep, StreamStyle.CHAT)


def _anthropic_payload(err: FlintError) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(err.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def error_response(route: str | None, err: FlintError) -> tuple[int, bytes]:
    """The status and body of an error response on ``route`` (a ROUTES path), in its
    API's shape: on Anthropic's routes, our overload (503) is its 529."""
    if route in _ANTHROPIC_ROUTES:
        return (529 if err.status == 503 else err.status,
                orjson.dumps(_anthropic_payload(err)))
    return err.status, err.body()


def error_event(endpoint: str, err: FlintError) -> bytes:
    """The final event of a stream that broke off after it began, in its API's shape."""
    if endpoint in ANTHROPIC_ENDPOINTS:
        return b"event: error\ndata: " + orjson.dumps(_anthropic_payload(err)) + b"\n\n"
    if endpoint == "responses":
        data = {"type": "error", "code": err.code, "message": err.message, "param": err.param}
        return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"
    return err.sse_event()


def _splice(body: bytes, member: bytes) -> bytes:
    """``body`` (a JSON object holding at least "model") with ``member`` added first."""
    i = body.index(b"{") + 1
    return body[:i] + member + b"," + body[i:]


def provider_storage(endpoint: str, data: dict[str, Any], body: bytes, allowed: bool) -> bytes:
    """The body to send under the provider-storage policy (see the module docstring);
    ``data`` is updated too. Raises 400 for a request that needs stored state."""
    if allowed or (endpoint != "responses" and endpoint != "chat/completions"):
        return body
    store = data.get("store")
    if endpoint == "chat/completions":  # the provider's default is not to store
        if store is None or store is False:
            return body
    else:
        for name in ("previous_response_id", "conversation"):
            if data.get(name) is not None:
                raise BadRequest(f"'{name}' is not available: {STORED_STATE}", param=name,
                                 code="provider_storage_disabled")
        if store is False:
            return body
        if "store" not in data:
            data["store"] = False
            return _splice(body, b'"store":false')
    data["store"] = False
    try:
        return orjson.dumps(data)
    except orjson.JSONEncodeError:
        raise BadRequest("The request body is nested too deeply.") from None
