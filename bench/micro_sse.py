"""Micro-benchmark of the SSE hot path (flintproxy/sse.py).

    .venv/bin/python bench/micro_sse.py [iterations]

Prints µs per call, best of 5, for: StreamScanner.feed on one content event (the
common case: frame check and usage regex miss), on the usage event (the once per
stream slow path that parses it), on an event split across two reads, a whole
20-chunk stream fed event by event and in one block, and extract_usage on a
non-streaming body (small, and with 64 KiB of content before the usage).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from canned import json_body, sse_body

from flintproxy.http.sse import StreamScanner, extract_usage


def bench(name: str, fn: Callable[[int], None], n: int, per: int = 1) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        fn(n)
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    print(f"{name:<52} {best:8.3f} µs" + (f"  ({best / per:.3f} µs per event)" if per > 1
                                          else ""))
    return best


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    stream = sse_body()
    events = [e + b"\n\n" for e in stream.split(b"\n\n") if e]
    content = events[3]
    usage_event = next(e for e in events if b'"usage":{' in e)
    half = len(content) // 2
    body = json_body()
    big = body.replace(b'"content":"', b'"content":"' + b"x" * 65536, 1)
    assert extract_usage(body) is not None and extract_usage(big) is not None

    def feed_content(n: int) -> None:
        sc = StreamScanner(strip_usage=True)
        feed = sc.feed
        for _ in range(n):
            feed(content)

    def feed_usage(n: int) -> None:
        for _ in range(n):
            StreamScanner(strip_usage=True).feed(usage_event)

    def feed_split(n: int) -> None:
        sc = StreamScanner(strip_usage=True)
        feed = sc.feed
        a, b = content[:half], content[half:]
        for _ in range(n):
            feed(a)
            feed(b)

    def whole_stream_events(n: int) -> None:
        for _ in range(n):
            sc = StreamScanner(strip_usage=True)
            for e in events:
                sc.feed(e)
            sc.flush()

    def whole_stream_block(n: int) -> None:
        for _ in range(n):
            sc = StreamScanner(strip_usage=True)
            sc.feed(stream)
            sc.flush()

    def extract_small(n: int) -> None:
        for _ in range(n):
            extract_usage(body)

    def extract_big(n: int) -> None:
        for _ in range(n):
            extract_usage(big)

    def loop(n: int) -> None:
        for _ in range(n):
            pass

    print(f"{n} iterations, best of 5, Python {sys.version.split()[0]}; content event "
          f"{len(content)} B, stream {len(events)} events / {len(stream)} B, "
          f"body {len(body)} B")
    bench("empty loop (overhead, not subtracted)", loop, n)
    bench("StreamScanner.feed, one content event", feed_content, n)
    bench("StreamScanner.feed, the usage event (+ new scanner)", feed_usage, n // 4)
    bench("StreamScanner.feed, one event in two reads", feed_split, n // 2)
    bench("whole 20-chunk stream, fed event by event", whole_stream_events, n // 20,
          per=len(events))
    bench("whole 20-chunk stream, fed as one block", whole_stream_block, n // 20)
    bench("extract_usage, non-streaming body", extract_small, n // 2)
    bench("extract_usage, body with 64 KiB of content", extract_big, max(1, n // 200))


if __name__ == "__main__":
    main()
