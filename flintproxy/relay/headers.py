"""Which headers cross the relay, in each direction: allow-lists, never deny-lists.

A deny-list lets through whatever a client or an upstream invents: the client's IP
under a new name (CF-Connecting-IP, True-Client-IP, ...), an org selector, a proxy's
internals. With allow-lists, everything stays on its side unless it is named here.
Cost: one frozenset lookup per header, as the deny-list was.

- To the upstream: ``REQUEST_ALLOW`` or, for an Anthropic upstream, ``ANTHROPIC_ALLOW``
  (what a provider of its kind needs to serve the request: Content-Type, Accept, and
  OpenAI-Beta or Anthropic-Version/-Beta),
  plus the upstream's ``forward_headers`` names and "prefix*" globs; never anything
  in ``NEVER_FORWARD`` (credentials, cookies, client addresses, framing), whatever
  the config says. We add our X-Request-Id, Accept-Encoding and the upstream's key.
  Not forwarded: User-Agent and the SDK's x-stainless-* (they describe the client's
  machine), OpenAI-Organization / OpenAI-Project (they would let a client pick the
  operator's org or project).
- To the client: ``RESPONSE_ALLOW`` (content type, caching, the upstream's retry
  advice on its errors). Our x-ratelimit-* and X-Request-Id are added by us; the
  upstream's rate limits, org, cookies and proxy headers (x-litellm-*) are not.
"""

from __future__ import annotations

from flintproxy.relay.routing import Upstream

# RFC 9110 §7.6.1: connection-specific fields are never forwarded (names lower-cased).
HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
     b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade")
)
# The client's request headers a provider needs (names lower-cased): an OpenAI-compatible
# one, and an Anthropic one (its API version and beta features; never OpenAI-Beta).
REQUEST_ALLOW = frozenset((b"content-type", b"accept", b"openai-beta"))
ANTHROPIC_ALLOW = frozenset((b"content-type", b"accept", b"anthropic-version",
                             b"anthropic-beta"))
# Never sent upstream, even when an upstream's forward_headers names or globs them:
# credentials, cookies, the client's address in any of its spellings, framing, and
# what we set ourselves.
NEVER_FORWARD = HOP_BY_HOP | frozenset(
    (b"host", b"content-length", b"authorization", b"cookie", b"api-key",
     b"accept-encoding", b"expect", b"x-request-id", b"forwarded", b"x-forwarded-for",
     b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port", b"x-forwarded-server",
     b"x-real-ip", b"x-client-ip", b"x-cluster-client-ip", b"client-ip",
     b"cf-connecting-ip", b"cf-connecting-ipv6", b"true-client-ip", b"fastly-client-ip",
     b"x-original-forwarded-for", b"x-appengine-user-ip", b"openai-organization",
     b"openai-project", b"x-api-key", b"anthropic-version")
)
# The upstream's response headers a client may see; we add our own x-ratelimit-*,
# X-Request-Id and the framing.
# Connection values that name no other header (the usual ones): nothing more to drop.
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"Keep-Alive", b"Close"))
_NONE: frozenset[bytes] = frozenset()
RESPONSE_ALLOW = frozenset(
    (b"content-type", b"cache-control", b"retry-after", b"retry-after-ms",
     b"x-should-retry")
)


def request_head(raw: list[tuple[bytes, bytes]], up: Upstream,
                 connection: bytes | None = None) -> bytes:
    """The client's header lines this upstream may see (see the module docstring);
    ``connection``: the client's Connection value, whose names are hop-by-hop too."""
    names, prefixes = up.forward_names, up.forward_prefixes
    allow = ANTHROPIC_ALLOW if up.anthropic else REQUEST_ALLOW
    hop: frozenset[bytes] = _NONE
    if connection is not None and connection not in _PLAIN_CONNECTION:  # names headers
        hop = frozenset(t.strip().lower() for t in connection.split(b","))
    lines = []
    for name, value in raw:
        lname = name.lower()
        if (lname in allow or (
            (lname in names or (prefixes and lname.startswith(prefixes)))
            and lname not in NEVER_FORWARD
        )) and lname not in hop:
            lines.append(name + b": " + value + b"\r\n")
    return b"".join(lines)


def response_head(raw: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    """The upstream's header lines a client may see; and whether a Content-Type was
    among them."""
    lines = []
    content_type = False
    for name, value in raw:
        lname = name.lower()
        if lname in RESPONSE_ALLOW:
            if lname == b"content-type":
                content_type = True
            lines.append(name + b": " + value + b"\r\n")
    return b"".join(lines), content_type
