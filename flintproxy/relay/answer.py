"""The answer: how an upstream's response becomes the client's, once one was chosen.

A stream is copied as it arrives: each block goes through the stream's
``StreamScanner`` (usage, its end, the token estimate) and out at once, the last one
with the end of the stream in the same write; a stream cut short (upstream gone, too
large, or the client gone) ends with an error event or not at all, and its usage is
what was seen. A whole body is checked (a JSON object of its endpoint's shape)
before it is relayed; an upstream's 4xx is passed on (translated when the client
speaks another API), its 5xx become 502. Each sets the request's ``Outcome``, which
the gate's ``finish`` settles.

Split from ``relay.relay`` (parse, admit, choose and call the upstream), which calls
``Answer`` once per request: the per-block loop is ``Answer.stream``'s own, with no
indirection added (bench/micro_relay.py --instructions: the same count).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from flintproxy.errors import UpstreamError, UpstreamTimeout, header_lines
from flintproxy.gate.bounds import UNBILLED
from flintproxy.gate.gate import CLIENT_CLOSED, Admission, Ending, Outcome
from flintproxy.http.client import (
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamReadTimeout,
    UpstreamResponse,
    UpstreamTooLarge,
)
from flintproxy.http.exchange import Responder
from flintproxy.http.sse import SSE_HEAD, StreamScanner, Usage, parse_body
from flintproxy.relay.formats import NAMED_EVENTS, error_event, stream_style
from flintproxy.relay.headers import response_head
from flintproxy.relay.routing import Router, Upstream
from flintproxy.relay.translate import Translation

# After a stream's [DONE], how long its upstream connection may take to end the
# response and go back to the pool (it is closed otherwise).
DONE_GRACE_S = 1.0

# The upstream client's errors: what the client sees, and the metrics reason.
_FAILURES: tuple[tuple[type[Exception], type[UpstreamError], str, str], ...] = (
    (UpstreamTooLarge, UpstreamError, "too_large", "Upstream '{}' sent a response too large."),
    (UpstreamReadTimeout, UpstreamTimeout, "timeout", "Upstream '{}' timed out."),
    (UpstreamConnectError, UpstreamError, "connect", "Could not connect to upstream '{}'."),
    (UpstreamDisconnected, UpstreamError, "reset", "Upstream '{}' failed: {}."),
)


def _classify(exc: BaseException) -> tuple[type[UpstreamError], str, str]:
    for kind, error, reason, message in _FAILURES:
        if isinstance(exc, kind):
            return error, reason, message
    return UpstreamError, "other", "Upstream '{}' failed: {}."


def upstream_failure(exc: BaseException, up: Upstream) -> UpstreamError:
    """The one place where upstream-client errors become our error classes."""
    error, _, message = _classify(exc)
    return error(message.format(up.name, type(exc).__name__))


def failure_reason(exc: BaseException) -> str:
    """The ``routing.FAILURE_REASONS`` entry (a metrics label) for a failed attempt."""
    return _classify(exc)[1]


class StreamGauge:
    """Streams open now: written by the relay, read by metrics (a plain number)."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = 0


class Answer:
    """The client's answer to one upstream response (see the module docstring)."""

    def __init__(self, router: Router, streams: StreamGauge, max_sse_event: int) -> None:
        self.router = router  # a stream that breaks off is the upstream's failure
        self.streams = streams
        self.max_sse_event = max_sse_event

    def head(self, resp: UpstreamResponse, admission: Admission) -> tuple[bytes, bool]:
        head, content_type = response_head(resp.raw_headers)
        if admission.headers:
            head += header_lines(admission.headers)
        return (head + b"X-Request-Id: " + admission.call.trace_id.encode("ascii") + b"\r\n",
                content_type)

    async def upstream_error(self, out: Responder, resp: UpstreamResponse, body: bytes,
                             admission: Admission, outcome: Outcome,
                             conv: Translation | None) -> None:
        # 4xx are the client's own errors and an upstream 429 is passed through
        # (ours say "rate_limit_requests/tokens/concurrency"); 5xx become 502.
        outcome.status = resp.status if resp.status < 500 else 502
        outcome.outcome = Ending.UPSTREAM_ERROR
        endpoint = admission.call.endpoint
        if resp.status >= 500:
            message = f"Upstream '{outcome.upstream}' returned HTTP {resp.status}."
            if not out.started:
                raise UpstreamError(message)  # no local holds it: no cycle via this frame
            await out.end(error_event(endpoint, UpstreamError(message)))
            return
        if conv is not None:
            body = conv.error(resp.status, body)
        if out.started:  # one event: the upstream's line breaks cannot start another
            flat = body.strip().replace(b"\r", b" ").replace(b"\n", b" ")
            named = b"event: error\n" if endpoint in NAMED_EVENTS else b""
            await out.end(named + b"data: " + flat + b"\n\n")
            return
        out.respond(resp.status, self.head(resp, admission)[0], body)

    def plain(self, out: Responder, up: Upstream, resp: UpstreamResponse, body: bytes,
              admission: Admission, outcome: Outcome, conv: Translation | None) -> None:
        call = admission.call
        well_formed, usage = parse_body(body, conv.upstream_endpoint if conv else call.endpoint)
        if well_formed and conv is not None:
            translated = conv.response(body)
            well_formed, body = translated is not None, translated or b""
        if not well_formed:
            # Charged as any upstream error is (nothing known, nothing used).
            raise UpstreamError(f"Upstream '{up.name}' sent a malformed response.")
        outcome.status, outcome.outcome = 200, Ending.OK
        outcome.ttfb_s = time.perf_counter() - admission.started
        if usage is not None:
            _apply_usage(outcome, usage)
        elif call.endpoint not in UNBILLED:
            outcome.prompt_tokens = call.prompt_tokens_estimate
            outcome.estimated = True
        out.respond(200, self.head(resp, admission)[0], body)

    async def stream(self, out: Responder, up: Upstream, resp: UpstreamResponse,
                     first: bytes, admission: Admission, outcome: Outcome,
                     client_wants_usage: bool, conv: Translation | None) -> None:
        call = admission.call
        # Usage is read from the upstream's own events; a translation needs them all.
        scanner = StreamScanner(strip_usage=not client_wants_usage and conv is None,
                                max_event=self.max_sse_event,
                                style=stream_style(conv.upstream_endpoint if conv
                                                   else call.endpoint))
        outcome.status = 200
        self.streams.open += 1
        read = resp.readany
        try:
            # What has arrived is sent at once; when it is the upstream's last piece it
            # goes out with the end of the stream, in the same write. Once the stream's
            # last event ([DONE], message_stop, response.completed) has been relayed the
            # client has it all: the stream ends there, whatever the upstream still
            # sends (its lingering bytes are dropped with it).
            chunk = scanner.feed(first)
            done = resp.at_eof or scanner.done
            if done and not scanner.done:
                chunk += scanner.flush()
            if conv is not None:
                chunk = conv.stream(chunk) + (conv.finish() if done else b"")
            if not out.started:
                head, content_type = self.head(resp, admission)
                await out.stream(200, head if content_type else head + SSE_HEAD, chunk,
                                 end=done)
            elif done:  # heartbeats began it
                await out.end(chunk)
            elif chunk:
                await out.write(chunk)
            if done:
                outcome.outcome = Ending.OK
            outcome.ttfb_s = time.perf_counter() - admission.started
            while not done:
                data = await read()
                chunk = scanner.feed(data) if data else b""
                done = not data or resp.at_eof or scanner.done
                if done and not scanner.done:
                    chunk += scanner.flush()
                if conv is not None:
                    chunk = conv.stream(chunk) + (conv.finish() if done else b"")
                if done:  # the last event goes out with the end, in one write
                    await out.end(chunk)
                    outcome.outcome = Ending.OK
                elif chunk:
                    await out.write(chunk)
        except (UpstreamDisconnected, UpstreamReadTimeout) as exc:  # incl. UpstreamTooLarge
            self.router.failure(up, failure_reason(exc))
            outcome.outcome = Ending.UPSTREAM_ERROR
            if not out.started:  # its first bytes were already too much: a plain 502
                raise upstream_failure(exc, up) from None
            with contextlib.suppress(ConnectionError):
                await out.end(error_event(call.endpoint, upstream_failure(exc, up)))
        except ConnectionError:  # our write failed: the client left
            client_left(outcome, out)
        except asyncio.CancelledError:  # the handler was cancelled: the client left
            client_left(outcome, out)
            raise
        finally:
            self.streams.open -= 1
            if outcome.outcome is not Ending.OK:
                resp.close()
            elif not resp.at_eof:  # the last event before the upstream's end: keep it
                resp.release_at_end(DONE_GRACE_S)
            _stream_usage(outcome, scanner, call.prompt_tokens_estimate)


def client_left(outcome: Outcome, out: Responder) -> None:
    """The client went away: say so, unless it already had the whole answer ([DONE])."""
    if outcome.outcome is Ending.OK:
        return
    outcome.outcome = Ending.CLIENT_DISCONNECT
    if not out.started:  # as nginx: 499 unless a status was sent
        outcome.status = CLIENT_CLOSED
    elif outcome.status == 500:  # heartbeats had sent its 200
        outcome.status = 200


def _apply_usage(outcome: Outcome, usage: Usage) -> None:
    outcome.prompt_tokens = usage.prompt_tokens
    outcome.completion_tokens = usage.completion_tokens
    outcome.cached_tokens = usage.cached_tokens
    outcome.reasoning_tokens = usage.reasoning_tokens
    outcome.cache_write_tokens = usage.cache_write_tokens


def _stream_usage(outcome: Outcome, scanner: StreamScanner, prompt_estimate: int) -> None:
    """A stream's usage: the upstream's total, or, when it broke off before reporting
    one, what it had reported (Anthropic's prompt in message_start) with the relayed
    events as the completion estimate."""
    usage = scanner.usage
    if usage is not None and scanner.final:
        _apply_usage(outcome, usage)
        return
    if usage is not None:
        _apply_usage(outcome, usage)
    if not outcome.prompt_tokens:
        outcome.prompt_tokens = prompt_estimate
    outcome.completion_tokens = max(outcome.completion_tokens,
                                    scanner.estimated_completion_tokens())
    outcome.estimated = True
