"""The data plane's HTTP/1.1 parser under mutated bytes, over raw sockets.

hypothesis mutates well-formed requests (flipped, inserted, deleted, duplicated and
spliced bytes; hostile header lines such as duplicate lengths, chunked framing,
huge numbers, NULs and bare CR/LF) and sends them to a gateway process. Each answer
must be well-formed HTTP responses or a close, within a deadline, never a 5xx
from the server itself or a traceback; afterwards the server still serves and no
secret reached its logs. The request is half-closed after it is sent, so a request
the parser still waits for ends at once; requests left open (slowloris) are the
deadline tests below.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import raw_config
from tests.support import LeakScanner, LiveGateway, LiveMock

EXAMPLES = 1500
DEADLINE_S = 5.0  # for an answer to a complete or half-closed request
IDLE_S = 2.0  # [server] keepalive, head and body timeouts of the gateway under test
KEY_MARK = "sk-fuzzkeymarker"  # a key-shaped secret planted in the mutated requests
_STATUS = re.compile(rb"HTTP/1\.[01] ([1-5]\d\d) [^\r\n]*\r\n")
_UPSTREAM = frozenset({502, 504})

_BODY = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'


def _seeds(key: str) -> list[bytes]:
    auth = f"Authorization: Bearer {key}\r\n".encode()
    fake = f"Authorization: Bearer {KEY_MARK}\r\n".encode()
    return [
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n" + auth + b"\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + auth
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(_BODY) + _BODY,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + fake
        + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(_BODY) + _BODY + b"\r\n0\r\n\r\n",
        b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\n" + fake + b"Expect: 100-continue\r\n"
        + b"Content-Length: 10\r\n\r\n{\"a\": 1}  ",
        b"GET /readyz HTTP/1.1\r\nHost: gw\r\n\r\nGET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n",
    ]


_TOKENS = [
    b"\r\n", b"\n", b"\r", b"\x00", b" ", b":", b"\t", b"\xff\xfe", b"%00", b"/../",
    b"Content-Length: 5\r\n", b"Content-Length: 99999999999999999999999\r\n",
    b"Content-Length: -1\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n", b"Expect: 100-continue\r\n",
    b"Connection: close\r\n", b"Host: a\r\nHost: b\r\n", b"X-Forwarded-For: 10.9.8.7\r\n",
    b"fffffffffffffffff\r\n", b"0\r\n\r\n", b"HTTP/1.0", b"HTTP/2.0", b"\x16\x03\x01",
    b" HTTP/1.1\r\n", b"A" * 300, b"X-A: " + b"b" * 9000 + b"\r\n",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "token", "delete", "dup", "cut"]))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "token":
            data[at:at] = draw(st.sampled_from(_TOKENS))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "dup":
            piece = data[at:at + draw(st.integers(1, 64))]
            data[at:at] = piece * draw(st.integers(1, 50))
        elif op == "cut" and len(data) > 1:
            del data[max(at, 1):]
    return bytes(data)


def exchange(port: int, data: bytes, half_close: bool = True,
             deadline: float = DEADLINE_S) -> tuple[bytes, bool]:
    """Send ``data``; everything read until the server closes; True if it closed in time."""
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=deadline) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before it has read everything
        end = time.monotonic() + deadline
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return bytes(got), False
            except OSError:
                return bytes(got), True  # reset: a close
            if not chunk:
                return bytes(got), True
            got += chunk
    return bytes(got), False


def statuses(answer: bytes) -> list[int]:
    """The statuses of the responses in ``answer``; fails if it does not start as one."""
    if not answer:
        return []
    assert _STATUS.match(answer), f"not an HTTP response: {answer[:200]!r}"
    assert b"\r\n\r\n" in answer, f"unterminated head: {answer[:300]!r}"
    return [int(m.group(1)) for m in _STATUS.finditer(answer)]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    tmp = tmp_path_factory.mktemp("wire")
    mock = LiveMock(tmp, ["--chunks", "3"]).start()
    raw = raw_config(tmp, {"local": mock.base_url})
    raw["server"].update(keepalive_timeout_s=IDLE_S, head_timeout_s=IDLE_S,
                         body_timeout_s=IDLE_S)
    raw["limits"] = {"default_rpm": 1_000_000, "default_tpm": 1_000_000_000}
    gw = LiveGateway(tmp, raw).start()
    try:
        yield gw
    finally:
        gw.stop()
        mock.stop()


def _still_serving(gw: LiveGateway) -> None:
    assert gw.alive()
    assert requests.get(gw.url + "/healthz", timeout=DEADLINE_S).status_code == 200
    # 429 allowed: after the fuzzer's bad keys, the IP guard may hold this address back
    # (whether a valid key must pass anyway is defect 11's test, below).
    models = requests.get(gw.url + "/v1/models", timeout=DEADLINE_S,
                          headers={"Authorization": f"Bearer {gw.key}"})
    assert models.status_code in (200, 429)


@pytest.mark.slow
def test_mutated_requests_get_a_response_or_a_close_in_time(live: LiveGateway) -> None:
    port = int(live.url.rsplit(":", 1)[1])
    seen: dict[int, int] = {}
    sent: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=mutated(_seeds(live.key)))
    def run(data: bytes) -> None:
        sent.append(len(data))
        answer, closed = exchange(port, data)
        assert closed, f"no close within {DEADLINE_S}s for {data[:300]!r}: {answer[:300]!r}"
        for status in statuses(answer):
            seen[status] = seen.get(status, 0) + 1
            assert status < 500 or status in _UPSTREAM, (
                f"{status} for {data[:300]!r}: {answer[:500]!r}")
        assert b"Traceback" not in answer and b'File "' not in answer

    run()
    assert len(sent) >= EXAMPLES // 2, len(sent)
    assert seen.get(400), f"the fuzzer never reached the parser's refusals: {seen}"
    print(f"{len(sent)} mutated requests, {sum(sent)} bytes; statuses {sorted(seen.items())}")
    _still_serving(live)
    scanner = LeakScanner()
    scanner.add(live.key, KEY_MARK, "10.9.8.7")
    scanner.assert_clean(data_dirs=[live.data_dir], logs=live.logs())
    assert "Traceback" not in live.stderr, live.stderr[-3000:]


def test_an_unfinished_head_is_closed_after_the_head_deadline(live: LiveGateway) -> None:
    port = int(live.url.rsplit(":", 1)[1])
    _, closed = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Slow: ",
                         half_close=False, deadline=IDLE_S + DEADLINE_S)
    assert closed
    _still_serving(live)


def test_an_unfinished_body_is_closed_after_the_body_deadline(live: LiveGateway) -> None:
    port = int(live.url.rsplit(":", 1)[1])
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
            + live.key.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")
    answer, closed = exchange(port, head, half_close=False, deadline=IDLE_S + DEADLINE_S)
    assert closed
    assert all(s < 500 for s in statuses(answer))
    _still_serving(live)


def test_a_valid_key_authenticates_after_bad_keys_from_the_same_address(
        live: LiveGateway) -> None:
    for _ in range(5):
        bad = requests.get(live.url + "/v1/models", timeout=DEADLINE_S,
                           headers={"Authorization": f"Bearer {KEY_MARK}"})
        assert bad.status_code in (401, 429)
    good = requests.get(live.url + "/v1/models", timeout=DEADLINE_S,
                        headers={"Authorization": f"Bearer {live.key}"})
    assert good.status_code == 200, good.text
