"""The vocabulary between a server and what answers its requests: Exchange and Responder.

The lean server makes an ``Exchange`` per request and a ``Responder`` to answer it;
the relay, the gate and the observers (metrics, access log) read the one and write
the other. Nothing here knows of the layers above: this module is what lets the wire
layer sit at the bottom of the house.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Exchange", "Responder", "index_headers"]


class Exchange:
    """One request as the gate, relay and observers see it, whichever server parsed it.

    ``headers`` maps lower-cased names to values (repeated fields joined with ", ",
    RFC 9110 §5.3); ``raw_headers`` keeps them as received, for forwarding.
    """

    __slots__ = ("body", "call", "headers", "method", "path", "raw_headers", "remote",
                 "route", "too_large")

    def __init__(self, method: str, path: str, route: str | None,
                 raw_headers: list[tuple[bytes, bytes]], remote: str | None,
                 body: bytes = b"", too_large: bool = False,
                 headers: dict[bytes, bytes] | None = None) -> None:
        self.method = method
        self.path = path
        # The matched route ("/v1/chat/completions"), None for an unknown URL: what
        # logs and metrics may name (a path is client-chosen text).
        self.route = route
        self.raw_headers = raw_headers
        self.headers = index_headers(raw_headers) if headers is None else headers
        self.remote = remote
        self.body = body
        # The body exceeded the limit and was not kept; answered 413 once authenticated.
        self.too_large = too_large
        # The gate's ``Call``, set by relay as soon as the body is parsed (for metrics and
        # the access log of a request refused before admission). Typed Any: this layer
        # knows nothing of the gate above it.
        self.call: Any = None

    def header(self, name: bytes) -> str | None:
        """A header's value by its lower-cased name."""
        value = self.headers.get(name)
        return None if value is None else value.decode("utf-8", "surrogateescape")


def index_headers(raw_headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Exchange.headers of ``raw_headers``: names lower-cased, a repeated field's values
    joined with ", " once at the end (linear: joining as each repeat arrives cost
    quadratic time, 6 ms of CPU for 12,000 repeats)."""
    headers: dict[bytes, bytes] = {}
    repeated: dict[bytes, list[bytes]] | None = None
    for name, value in raw_headers:
        key = name.lower()
        first = headers.get(key)
        if first is None:
            headers[key] = value
            continue
        if repeated is None:
            repeated = {}
        values = repeated.get(key)
        if values is None:
            repeated[key] = [first, value]
        else:
            values.append(value)
    if repeated is not None:
        for key, values in repeated.items():
            headers[key] = b", ".join(values)
    return headers


class Responder(Protocol):
    """How relay answers an Exchange, whichever server it came from.

    ``head`` is a block of serialized header lines (``b"Name: value\\r\\n"...``);
    the server adds the framing (Content-Length or chunked), Date and Connection.
    """

    @property
    def started(self) -> bool:
        """A response's head has been sent (a stream began)."""

    def respond(self, status: int, head: bytes, body: bytes) -> None:
        """Send a whole response."""

    async def stream(self, status: int, head: bytes, first: bytes = b"",
                     end: bool = False) -> None:
        """Send a streamed response's head, with its first bytes when there are any;
        ``end``: they are all of it (one write where the server can)."""

    async def write(self, data: bytes) -> None:
        """Send more of a stream, waiting while the client's socket is full.

        Raises ConnectionError once the client has gone.
        """

    async def end(self, last: bytes = b"") -> None:
        """Send the last bytes of a stream and end it."""
