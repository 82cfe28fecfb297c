"""A fast, deterministic OpenAI-compatible upstream for tests, `make run` and the bench.

Content is predictable (chunk i is ``f"tok{i} "``, one token each), usage is computed
from the request, and ``x-mock-*`` request headers tune or break single responses:
``x-mock-chunks``, ``x-mock-delay-ms``, ``x-mock-first-delay-ms`` and ``x-mock-fault``:

- ``http500``, ``http429``, ``hang``, ``reset:N``, ``malformed``, ``endless``: the
  upstream fails, slowly or at once;
- ``shapeless``: a 200 whose JSON is not a completion;
- ``http400_lines``: after ``x-mock-first-delay-ms``, a 400 whose body has blank lines
  and an SSE event in it;
- ``leaky_headers``: a proxy's internals in the response headers (x-litellm-*,
  the upstream's org, rate limits, cookie, server);
- ``huge_head:N``, ``huge_body:N``, ``huge_event:N``: a response header, a
  non-streaming body or one SSE event of N bytes;
- ``usage_in_content``: the stream's usage rides on its last content chunk (choices
  not empty), as LiteLLM sends it;
- ``linger:MS``: after ``data: [DONE]`` the stream stays open MS milliseconds, then
  sends a comment and ends.

Like a real provider, it honours ``max_tokens`` / ``max_completion_tokens``: a
completion stops at the limit with ``finish_reason: "length"``. It returns one
choice, but bills (reports usage for) every completion the request asks for:
``n``, and on /v1/completions ``best_of`` and each prompt of a prompt array.

It speaks Anthropic's Messages (``/v1/messages``, ``/v1/messages/count_tokens``:
tools.mock_anthropic) and OpenAI's Responses API (``/v1/responses``:
tools.mock_responses) too, with the same faults and limits, and answers chat requests
that force a tool with a tool call (tools.mock_chat_tools).

Why this module: it is the mock's face, the app and the command: its routes (one line
each, to the module that answers them), its server and its collector. The core every
route goes through is tools.mock_core, the ``x-mock-*`` headers and fault modes are
tools.mock_faults, and the formats are tools.mock_chat (the OpenAI routes above),
tools.mock_responses, tools.mock_anthropic and tools.mock_chat_tools. What tests and the
bench import from the mock is re-exported here.
"""

from __future__ import annotations

import asyncio
import functools
import gc

from aiohttp import web

from flintproxy.tools import mock_anthropic, mock_responses
from flintproxy.tools.mock_chat import (
    ChatRoutes,
    embedding_vector,
    expected_content,
    prompt_tokens_for,
)
from flintproxy.tools.mock_core import MOCK_STATS, Mock, MockSettings, MockStats
from flintproxy.tools.mock_faults import LEAKY_HEADERS

__all__ = ["IDLE_COLLECT_S", "LEAKY_HEADERS", "MOCK_STATS", "MockSettings", "MockStats",
           "create_mock_app", "embedding_vector", "expected_content", "prompt_tokens_for",
           "run_mock"]

IDLE_COLLECT_S = 1.0
_DEFAULTS = MockSettings()


def create_mock_app(settings: MockSettings = _DEFAULTS) -> web.Application:
    """The mock upstream as an aiohttp app; its counters are at ``app[MOCK_STATS]``."""
    mock = Mock(settings)
    chat = ChatRoutes(mock, settings)
    app = web.Application()
    app[MOCK_STATS] = mock.stats
    app.router.add_post("/v1/chat/completions", functools.partial(chat.generate, "chat"))
    app.router.add_post("/v1/completions", functools.partial(chat.generate, "completions"))
    app.router.add_post("/v1/embeddings", chat.embeddings)
    app.router.add_get("/v1/models", chat.list_models)
    app.router.add_post("/v1/responses", functools.partial(mock_responses.responses, mock))
    app.router.add_post("/v1/messages", functools.partial(mock_anthropic.messages, mock))
    app.router.add_post("/v1/messages/count_tokens",
                        functools.partial(mock_anthropic.count_tokens, mock))
    app.router.add_get("/_mock/stats", mock.stats_view)
    app.router.add_post("/_mock/reset", mock.reset_stats)
    return app


async def run_mock(host: str, port: int, settings: MockSettings) -> None:
    """Serve the mock until cancelled, printing its base URL once it listens."""
    # handler_cancellation: a client that leaves cancels its handler at once, so
    # disconnects are seen promptly. No access log: this is the bench's upstream.
    app = create_mock_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=2048).start()
        bound = runner.addresses[0][1] if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        print(f"mock upstream listening on http://{shown}:{bound}/v1", flush=True)
        await _collect_when_idle(app[MOCK_STATS])
    finally:
        await runner.cleanup()


async def _collect_when_idle(stats: MockStats) -> None:
    """Run the cyclic GC only while no stream is open, until cancelled.

    With thousands of streams open, a full collection of their objects stalled the
    mock for 50-100 ms, and with it every stream it served: the bench's baselines
    measured the mock's collector rather than the gateway. Cycles still get
    collected, in the pauses between loads.
    """
    gc.disable()
    try:
        while True:
            await asyncio.sleep(IDLE_COLLECT_S)
            if stats.active_streams == 0 and gc.get_count()[0] > 0:
                gc.collect()
    finally:
        gc.enable()
