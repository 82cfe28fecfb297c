"""Micro-benchmark of API-key lookup on the hot path (flintproxy/auth.py).

    .venv/bin/python bench/micro_keys.py [iterations]

Creates an account and 1,000 keys in a temporary SQLite store, warms the cache,
then prints µs per call, best of 5, for: hash_key (SHA-256), bearer_token on a
request's headers, and KeyAuthenticator.authenticate on a cache hit (driven
without an event-loop round trip, as a hit awaits nothing), plus a rejected key
that fails the format check and a cached unknown key.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from microbench import bench

from flintproxy.errors import FlintError
from flintproxy.gate.gate import bearer_token
from flintproxy.gate.keys import KeyAuthenticator
from flintproxy.http.exchange import Exchange
from flintproxy.store import sqlite
from flintproxy.store.accounts import Accounts, hash_key
from flintproxy.store.db import SqliteDatabase

KEYS = 1000
PER_ACCOUNT = 50




def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (a cache hit) to completion, synchronously."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine suspended: not a cache hit")


async def setup(repo: Accounts) -> tuple[KeyAuthenticator, list[str]]:
    keys = []
    for a in range(KEYS // PER_ACCOUNT):  # accounts cap their live keys
        account = await repo.create_account(f"micro{a}@example.com", None)
        for i in range(PER_ACCOUNT):
            _, key = await repo.create_key(account, f"k{i}")
            keys.append(key)
    auth = KeyAuthenticator(repo, negative_ttl_s=3600.0)  # outlive the run
    for key in keys:  # warm: one DB lookup each
        await auth.authenticate(key)
    return auth, keys


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="flint-micro-") as d:
        db = loop.run_until_complete(sqlite.open_store(Path(d) / "keys.db"))
        try:
            repo = Accounts(SqliteDatabase(db), bcrypt_cost=4, session_ttl_s=3600)
            auth, keys = loop.run_until_complete(setup(repo))
            run(loop, auth, keys, n)
        finally:
            loop.run_until_complete(db.close())
    loop.close()


def run(loop: asyncio.AbstractEventLoop, auth: KeyAuthenticator, keys: list[str],
        n: int) -> None:
    authenticate = auth.authenticate
    hot = keys[KEYS // 2]
    lookups = auth.db_lookups
    request = Exchange("POST", "/v1/chat/completions", "/v1/chat/completions",
                       [(b"Authorization", f"Bearer {hot}".encode()),
                        (b"Content-Type", b"application/json")], "127.0.0.1")
    bad_format = "not-a-key"
    unknown = hot[:-4] + ("AAAA" if not hot.endswith("AAAA") else "BBBB")
    with contextlib.suppress(FlintError):  # the first miss queries the DB, then is remembered
        loop.run_until_complete(authenticate(unknown))

    def h(n: int) -> None:
        for _ in range(n):
            hash_key(hot)

    def bt(n: int) -> None:
        for _ in range(n):
            bearer_token(request)

    def hit(n: int) -> None:
        for _ in range(n):
            drive(authenticate(hot))

    def hit_spread(n: int) -> None:
        for i in range(n):
            drive(authenticate(keys[i % KEYS]))

    def rejected(n: int, token: str) -> None:
        for _ in range(n):
            try:  # noqa: SIM105 - cheaper than contextlib.suppress in the loop
                drive(authenticate(token))
            except FlintError:
                pass

    print(f"{n} iterations, best of 5, Python {sys.version.split()[0]}, {KEYS} cached keys")
    bench("hash_key (SHA-256 of the bearer key)", h, n)
    bench("bearer_token (parse the Authorization header)", bt, n)
    bench("KeyAuthenticator.authenticate, cache hit", hit, n)
    bench("KeyAuthenticator.authenticate, hit, 1,000 keys", hit_spread, n)
    bench("authenticate, malformed key (format check)", lambda k: rejected(k, bad_format),
          n // 4)
    bench("authenticate, unknown key (negative cache)", lambda k: rejected(k, unknown),
          n // 4)
    assert auth.db_lookups == lookups + 1, "a hit went to the database"
    loop.run_until_complete(auth.close())


if __name__ == "__main__":
    main()
