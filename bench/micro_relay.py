"""Micro-benchmark of the whole hot path in one process: CPU per relayed request.

    .venv/bin/python bench/micro_relay.py [--requests 4000] [--rounds 7] [--conns 16]
    .venv/bin/python bench/micro_relay.py --instructions    # under valgrind, ~1 minute

Why: ``make bench`` measures the gateway's CPU per request against nginx in separate
processes, which is right for the ratios but moves by +-10% when other work shares
the machine. This runs the gateway as ``flintproxy serve`` builds it (``Server``:
auth, limits, billing, the usage writer, metrics, the access log to a null sink),
the canned upstream (bench/canned.py's protocol) and a keep-alive client in one
process and one event loop, and reports the process CPU time per request of the
best of ``--rounds`` rounds: the least disturbed one. The figure includes the
client's and the upstream's share (the same for any gateway change), so compare
two figures by their difference in µs, not as a ratio to make's.

``--instructions``: the user-space instructions per request instead, counted by
valgrind (cachegrind without its cache simulation): the process is run twice, with
100 and 1,100 requests, and the difference of the two counts divided by 1,000, so
start-up drops out. Repeats within 0.5% on a busy machine where CPU time moves by
10%: the figure to compare two versions of the hot path by (kernel time, a quarter
of the gateway's CPU in ``make bench``, is not in it).

Streaming: the canned 20-chunk stream with its usage chunk (one upstream block, as
nginx sends it); non-streaming: the canned chat.completion.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from canned import _Canned, _response, json_body, sse_body
from targets import PROMPT

from flintproxy.app.runner import Server
from flintproxy.config import build_config

TITLES = {"sse": "streaming (20 chunks)", "json": "non-streaming",
          "direct-sse": "streaming, direct", "direct-json": "non-streaming, direct"}
PRICE = {"input_usd_per_mtok": "0.15", "output_usd_per_mtok": "0.60",
         "cached_input_usd_per_mtok": "0.075"}


class _NullSink:
    def write(self, data: bytes | bytearray, /) -> object:
        return len(data)

    def flush(self) -> None:
        pass


class _Client(asyncio.Protocol):
    """One keep-alive connection sending the same request, counting whole responses."""

    def __init__(self, request: bytes, end: bytes, done: asyncio.Future[None],
                 counter: list[int]) -> None:
        self.request = request
        self.end = end  # how one response ends
        self.done = done
        self.counter = counter
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.buf.endswith(self.end):
            return
        if not self.buf.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"the gateway answered: {self.buf[:400]!r}")
        self.buf = b""
        self.counter[0] -= 1
        if self.counter[0] >= 0:
            self.send()
        elif not self.done.done() and self.counter[0] <= -self.counter[1]:
            self.done.set_result(None)


async def _round(loop: asyncio.AbstractEventLoop, port: int, request: bytes, end: bytes,
                 n: int, conns: int) -> float:
    done: asyncio.Future[None] = loop.create_future()
    counter = [n - conns, conns]  # requests still to send once each first one is answered
    clients = []
    for _ in range(conns):
        _, c = await loop.create_connection(
            lambda: _Client(request, end, done, counter), "127.0.0.1", port)
        clients.append(c)
    t0 = time.process_time()
    for c in clients:
        c.send()
    await done
    cpu = time.process_time() - t0
    for c in clients:
        assert c.transport is not None
        c.transport.close()
    return cpu / n


def _instructions(n: int, kind: str, conns: int) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, __file__, "--requests", str(n), "--rounds", "1", "--warm", "100",
         "--kinds", kind, "--conns", str(conns)],
        capture_output=True, text=True, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if found is None:
        raise SystemExit(f"no instruction count from valgrind: {out.stderr[-500:]}")
    return int(found.group(1).replace(",", ""))


def instructions(kinds: list[str], conns: int) -> None:
    """Instructions per request of each kind (see the module docstring), and the
    gateway's share: less what the client and the upstream take without it."""
    for kind in kinds:
        with ThreadPoolExecutor(2) as pool:  # two processes at a time: one per core
            few, many, direct_few, direct_many = pool.map(
                _instructions, (100, 1100, 100, 1100),
                (kind, kind, f"direct-{kind}", f"direct-{kind}"), (conns,) * 4)
        total, direct = (many - few) / 1000, (direct_many - direct_few) / 1000
        print(f"{TITLES[kind]:<24} {total - direct:10,.0f} instructions per request in the "
              f"gateway ({total:,.0f} with the client and the upstream, {direct:,.0f} "
              "without the gateway)", flush=True)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4000, help="per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--kinds", default="sse,json")
    p.add_argument("--warm", type=int, default=500, help="requests before the rounds")
    p.add_argument("--instructions", action="store_true",
                   help="count instructions per request under valgrind instead")
    args = p.parse_args()
    if args.instructions:
        instructions(args.kinds.split(","), args.conns)
        return
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(
        lambda: _Canned(_response(json_body(), b"application/json"),
                        _response(sse_body(), b"text/event-stream")), "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        raw: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": 0, "max_connections": 0,
                       "max_connections_per_ip": 0},
            "console": {"host": "127.0.0.1", "port": 0},
            "storage": {"path": str(Path(tmp) / "flintproxy.db")},
            "upstreams": [
                {"name": "canned-json", "base_url": f"http://127.0.0.1:{up_port}/json/v1",
                 "models": ["bench-json"]},
                {"name": "canned-sse", "base_url": f"http://127.0.0.1:{up_port}/sse/v1",
                 "models": ["bench-sse"]},
                # As make bench's config: an Anthropic upstream makes the relay filter
                # candidates by kind.
                {"name": "apis-anthropic", "kind": "anthropic",
                 "base_url": f"http://127.0.0.1:{up_port}/v1", "models": ["claude-x"]}],
            "models": {m: PRICE for m in ("bench-json", "bench-sse", "claude-x")},
            "limits": {"default_rpm": 1_000_000_000, "default_tpm": 1_000_000_000_000,
                       "default_max_concurrent": 1_000_000, "ip_rpm": 1_000_000_000},
            "accounts": {"bcrypt_cost": 4},
        }
        server = Server(build_config(raw, {}), access_sink=_NullSink())
        await server.startup("127.0.0.1", 0)
        try:
            repo = server.components.accounts
            account = await repo.create_account("bench@example.com", None)
            await repo.credit(account, 10**18)
            _, key = await repo.create_key(account, "bench")
            port = server.addresses[0][1]
            for kind in args.kinds.split(","):
                # direct-*: the same requests to the upstream itself (no gateway).
                direct = kind.startswith("direct-")
                stream = kind.endswith("sse")
                model = "bench-sse" if stream else "bench-json"
                body = orjson.dumps({"model": model, "messages": PROMPT,
                                     **({"stream": True} if stream else {})})
                path = (b"/sse" if stream else b"/json") if direct else b""
                request = (b"POST " + path + b"/v1/chat/completions HTTP/1.1\r\n"
                           b"Host: bench\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
                           b"Content-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
                # How a response ends: the chunked body's last chunk, the stream's [DONE]
                # unframed (direct), the JSON body's last braces.
                end = (b"[DONE]\n\n" if direct else b"0\r\n\r\n") if stream else b"}}"
                at = up_port if direct else port
                await _round(loop, at, request, end, args.warm, args.conns)
                best = min([await _round(loop, at, request, end, args.requests, args.conns)
                            for _ in range(args.rounds)])
                print(f"{TITLES[kind]:<24} {best * 1e6:8.1f} µs CPU per request (client and "
                      f"upstream included), best of {args.rounds} x {args.requests}",
                      flush=True)
        finally:
            await server.shutdown()
            upstream.close()


if __name__ == "__main__":
    uvloop.run(main())
