"""Money round trips per request in the shared mode (issue 14 target: <= 0.1).

    .venv/bin/python bench/lease_trips.py [REQUESTS] [--nodes N] [--accounts A]
        [--model M] [--max-tokens T] [--cap-usd USD]

Starts a throwaway PostgreSQL (tests/engines.py), the mock upstream and N gateway
nodes in this process on one database, sends REQUESTS chat completions (32 at a
time, round-robin over the nodes, A accounts with one key each) and prints the
gateways' own counters (``flintproxy_money_round_trips_total{op}``): lease
operations (grant, top-up, give-back, close, renewal, sweep) per request, and the
statements the lease rules add to usage batches (``debit``) per request. With
``--cap-usd``, every key carries that daily and monthly spend cap, so its requests
also spend cap leases (``cap_*`` operations, gate.capleases). The counts, not the
time, are the measurement: the machine may be busy.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flintproxy.money import usd_to_nano
from flintproxy.store import postgres
from tests.conftest import raw_config, start_gateway, start_mock
from tests.engines import PostgresServer


def body(model: str, max_tokens: int) -> bytes:
    return (f'{{"model": "{model}", "max_tokens": {max_tokens}, '
            '"messages": [{"role": "user", "content": "hi"}]}').encode()


async def run(requests: int, nodes: int, accounts: int, data: bytes, cap_nano: int | None
              ) -> None:
    server = PostgresServer.start()
    mock = await start_mock()
    gateways = []
    try:
        dsn = server.new_database()
        db = await postgres.open_database(dsn, 2)
        await postgres.migrate(db)
        await db.close()
        with tempfile.TemporaryDirectory() as tmp:
            raw = raw_config(Path(tmp), {"local": mock.url + "/v1"})
            raw["storage"] = {"backend": "postgresql", "dsn": dsn}
            raw["limits"] = {"default_rpm": 10**7, "default_tpm": 10**9,
                             "default_max_concurrent": 10**4}
            raw["metrics"] = {"access_log": False}
            for _ in range(nodes):
                gateways.append(await start_gateway(raw, credit_nano=0))
            repo = gateways[0].components.accounts
            keys = []
            for i in range(accounts):
                account = await repo.create_account(f"bench{i}@example.com", None)
                await repo.credit(account, 100 * 10**9)
                record, plaintext = await repo.create_key(account, "bench")
                keys.append(plaintext)
                if cap_nano is not None:
                    await repo.set_key_caps(record.id, None,
                                            {"day": cap_nano, "month": cap_nano})
            sent = 0
            started = time.perf_counter()
            async with aiohttp.ClientSession() as http:
                async def worker(w: int) -> None:
                    nonlocal sent
                    while sent < requests:
                        i = sent
                        sent += 1
                        gw = gateways[i % nodes]
                        async with http.post(
                                gw.url + "/v1/chat/completions", data=data,
                                headers={"Authorization": f"Bearer {keys[i % accounts]}",
                                         "Content-Type": "application/json"}) as resp:
                            text = await resp.read()
                            assert resp.status == 200, (resp.status, text[:300])
                await asyncio.gather(*[worker(w) for w in range(32)])
            elapsed = time.perf_counter() - started
            for gw in gateways:
                await gw.components.usage.sync(30)
            trips: dict[str, int] = {}
            for gw in gateways:
                leases = gw.components.leases
                assert leases is not None
                for op, n in leases.store.round_trips.items():
                    trips[op] = trips.get(op, 0) + n
            lease_ops = sum(n for op, n in trips.items() if op != "debit")
            print(f"{requests} requests, {nodes} node(s), {accounts} account(s), "
                  f"{requests / elapsed:.0f} requests/s")
            print(f"money round trips by operation: {trips}")
            print(f"lease operations per request: {lease_ops / requests:.4f}")
            cap_ops = sum(n for op, n in trips.items() if op.startswith("cap_"))
            print(f"of them cap lease operations per request: {cap_ops / requests:.4f}")
            print(f"debit statements per request: {trips['debit'] / requests:.4f}")
            print(f"all money round trips per request: "
                  f"{(lease_ops + trips['debit']) / requests:.4f}")
    finally:
        for gw in gateways:
            await gw.server.shutdown()
        await mock.runner.cleanup()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("requests", type=int, nargs="?", default=5000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--accounts", type=int, default=4)
    # gpt-4o with max_tokens 4096 reserves ~$0.04 a request: a $0.50 first slice
    # covers ~12, so the rate-sized top-ups are exercised.
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--cap-usd", default=None,
                        help="a daily and monthly spend cap on every key (USD)")
    args = parser.parse_args()
    cap = None if args.cap_usd is None else usd_to_nano(args.cap_usd)
    asyncio.run(run(args.requests, args.nodes, args.accounts,
                    body(args.model, args.max_tokens), cap))


if __name__ == "__main__":
    main()
