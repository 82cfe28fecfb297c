"""The one route table of the data plane, and request ids.

Everything that needs to know which /v1 routes exist (the relay, the routing's
upstream targets, metrics, the access log, the lean server's dispatch) reads it here.
"""

from __future__ import annotations

import random
import time

__all__ = ["ENDPOINTS", "ENDPOINT_PATHS", "HEALTH_ROUTES", "MODEL_ROUTE", "PATHS", "PREFIX_ROUTES",
           "ROUTES", "STORED_RESPONSE_ROUTE", "match_route", "new_request_id"]

# The routes the relay serves, and the upstream endpoint each relays to (None: answered
# locally, without an upstream).
ROUTES: dict[tuple[str, str], str | None] = {
    ("POST", "/v1/chat/completions"): "chat/completions",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/v1/embeddings"): "embeddings",
    ("POST", "/v1/responses"): "responses",
    ("POST", "/v1/messages"): "messages",
    ("POST", "/v1/messages/count_tokens"): "messages/count_tokens",
    ("GET", "/v1/models"): None,
}
# The relayed endpoints, and the path of each ("chat/completions": "/v1/chat/completions").
ENDPOINT_PATHS = {endpoint: path for (_, path), endpoint in ROUTES.items() if endpoint}
ENDPOINTS = tuple(ENDPOINT_PATHS)
# Answered by ops.health, beside the relay, on the same port.
HEALTH_ROUTES = (("GET", "/healthz"), ("GET", "/readyz"))
# Routes with an id in their last segment: (method, prefix) -> the route's name, which
# is what logs and metrics see (the id is the client's text).
MODEL_ROUTE = "/v1/models/{id}"
# A stored response: the gateway keeps none and asks providers to keep none (a 400
# that says so, relay.formats.STORED_STATE).
STORED_RESPONSE_ROUTE = "/v1/responses/{id}"
PREFIX_ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/v1/models/"): MODEL_ROUTE,
    ("GET", "/v1/responses/"): STORED_RESPONSE_ROUTE,
    ("DELETE", "/v1/responses/"): STORED_RESPONSE_ROUTE,
    ("POST", "/v1/responses/"): STORED_RESPONSE_ROUTE,
}
# Every path of the data plane: another method on one of them is a 405, not a 404.
PATHS = frozenset(path for _, path in (*ROUTES, *HEALTH_ROUTES))


def match_route(method: str, path: str) -> str | None:
    """The name of the prefix route ``path`` is on (``MODEL_ROUTE``), or None."""
    for (m, prefix), name in PREFIX_ROUTES.items():
        if m == method and path.startswith(prefix) and len(path) > len(prefix):
            return name
    return None


def new_request_id() -> str:
    """A server-made ledger id: ``req_`` + 12 hex digits of unix ms + 12 random hex digits.

    Time-ordered ids are appended to the end of the ``request_id`` UNIQUE index
    instead of landing on random pages: with random ids the writer's rate falls as
    the table grows (about 40k rows/s at 500k rows here, against 75k+ ordered).
    """
    # random, not secrets: an id needs uniqueness, not secrecy, and os.urandom is
    # a syscall per request. random's generator is seeded from os.urandom in each
    # process, so processes do not share a sequence.
    return f"req_{time.time_ns() // 1_000_000:012x}{random.getrandbits(48):012x}"
