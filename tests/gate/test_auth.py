"""The key cache and the change watcher, with a second connection playing "another process"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flintproxy.errors import AuthenticationError, PermissionDenied
from flintproxy.gate.keys import KeyAuthenticator
from flintproxy.store import sqlite
from flintproxy.store.accounts import Accounts
from flintproxy.store.changes import ChangeWatcher
from flintproxy.store.db import SqliteDatabase
from flintproxy.tasks import TaskGroup


@dataclass
class World:
    db: SqliteDatabase  # the server's connection
    other: SqliteDatabase  # another process (flintproxy admin)
    repo: Accounts  # server-side, publishing to the watcher
    admin: Accounts  # the other process: events only via the table
    watcher: ChangeWatcher
    keys: KeyAuthenticator
    clock: list[float]
    wall: list[int]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    db = SqliteDatabase(await sqlite.open_store(tmp_path / "a.db"))
    other = SqliteDatabase(await sqlite.connect(tmp_path / "a.db"))
    clock, wall = [100.0], [1_700_000_000_000]
    watcher = ChangeWatcher(db, 0.01)
    await watcher.start()
    repo = Accounts(db, 4, 60, notify=watcher.publish, clock=lambda: wall[0])
    keys = KeyAuthenticator(repo, clock=lambda: clock[0], wall_ms=lambda: wall[0])
    watcher.subscribe(keys.on_change)
    yield World(db, other, repo, Accounts(other, 4, 60, clock=lambda: wall[0]), watcher, keys,
                clock, wall)
    await keys.close()
    await other.close()
    await db.close()


async def new_key(w: World, email: str = "a@example.com", **kw: object) -> tuple[int, int, str]:
    aid = await w.repo.create_account(email, None)
    info, key = await w.repo.create_key(aid, **kw)  # type: ignore[arg-type]
    return aid, info.id, key


async def test_hit_path_uses_cache(world: World) -> None:
    aid, kid, key = await new_key(world, allowed_models=("gpt-4o-mini",))
    p = await world.keys.authenticate(key)
    assert (p.key_id, p.account_id, p.allowed_models) == (kid, aid, frozenset({"gpt-4o-mini"}))
    for _ in range(100):
        assert await world.keys.authenticate(key) is p
    assert world.keys.db_lookups == 1


async def test_unknown_keys_are_cached_briefly(world: World) -> None:
    bogus = "sk-flint-" + "x" * 40
    for _ in range(50):
        with pytest.raises(AuthenticationError):
            await world.keys.authenticate(bogus)
    assert world.keys.db_lookups == 1
    world.clock[0] += 11  # past the negative TTL: asked again, once
    with pytest.raises(AuthenticationError):
        await world.keys.authenticate(bogus)
    assert world.keys.db_lookups == 2
    # Not even well-formed: never reaches the database.
    for junk in ("hello", "sk-flint-short", "sk-flint-" + "é" * 40, "' OR 1=1 --"):
        with pytest.raises(AuthenticationError):
            await world.keys.authenticate(junk)
    assert world.keys.db_lookups == 2


async def test_concurrent_misses_share_one_query(world: World) -> None:
    _, _, key = await new_key(world)
    results = await asyncio.gather(*(world.keys.authenticate(key) for _ in range(50)))
    assert len({id(p) for p in results}) == 1
    assert world.keys.db_lookups == 1
    bogus = "sk-flint-" + "y" * 40
    outcomes = await asyncio.gather(*(world.keys.authenticate(bogus) for _ in range(50)),
                                    return_exceptions=True)
    assert all(isinstance(o, AuthenticationError) for o in outcomes)
    assert world.keys.db_lookups == 2


async def test_revoke_in_process_is_immediate(world: World) -> None:
    _, kid, key = await new_key(world)
    await world.keys.authenticate(key)
    await world.repo.revoke_key(kid)
    with pytest.raises(AuthenticationError):
        await world.keys.authenticate(key)


async def test_other_process_changes_arrive_via_events(world: World) -> None:
    aid, kid, key = await new_key(world)
    _, kid2, key2 = await new_key(world, "b@example.com")
    await world.keys.authenticate(key)
    await world.keys.authenticate(key2)
    await world.admin.set_status(aid, "disabled")
    assert (await world.keys.authenticate(key)).key_id == kid  # cached until the poll
    await world.watcher.poll_once()
    with pytest.raises(PermissionDenied) as info:
        await world.keys.authenticate(key)
    assert info.value.code == "account_disabled"
    await world.admin.set_status(aid, "active")
    await world.watcher.poll_once()
    assert (await world.keys.authenticate(key)).key_id == kid
    await world.admin.revoke_key(kid2)
    await world.watcher.poll_once()
    with pytest.raises(AuthenticationError):
        await world.keys.authenticate(key2)
    await world.admin.delete_account(aid)
    await world.watcher.poll_once()
    with pytest.raises(AuthenticationError):
        await world.keys.authenticate(key)


async def test_watcher_runs_subscribers_once(world: World) -> None:
    seen: list[tuple[str, int | None, int | None]] = []
    world.watcher.subscribe(lambda *ev: seen.append(ev))
    aid = await world.repo.create_account("c@example.com", None)  # published locally
    await world.admin.credit(aid, 1_000)  # only in the table
    await world.watcher.poll_once()
    await world.watcher.poll_once()
    assert seen == [("account_created", aid, None), ("credit", aid, None)]


async def test_watcher_loop_within_one_second(world: World) -> None:
    _, kid, key = await new_key(world)
    await world.keys.authenticate(key)
    tasks = TaskGroup()
    tasks.every("change feed poll", world.watcher.poll_s, world.watcher.poll)
    try:
        await world.admin.revoke_key(kid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while loop.time() < deadline:
            try:
                await world.keys.authenticate(key)
            except AuthenticationError:
                break
            await asyncio.sleep(0.005)
        else:
            pytest.fail("revocation did not arrive within one second")
    finally:
        await tasks.close()


async def test_watcher_survives_a_failing_subscriber(world: World) -> None:
    seen: list[str] = []

    def broken(kind: str, account_id: int | None, key_id: int | None) -> None:
        raise RuntimeError("subscriber bug")

    world.watcher.subscribe(broken)
    world.watcher.subscribe(lambda kind, a, k: seen.append(kind))
    await world.admin.create_account("d@example.com", None)
    await world.watcher.poll_once()
    assert seen == ["account_created"]


async def test_key_expiry(world: World) -> None:
    _, _, key = await new_key(world, expires_at=world.wall[0] + 1000)
    await world.keys.authenticate(key)
    world.wall[0] += 1000
    with pytest.raises(AuthenticationError, match="expired"):
        await world.keys.authenticate(key)
    fresh = KeyAuthenticator(world.repo, wall_ms=lambda: world.wall[0])
    with pytest.raises(AuthenticationError):
        await fresh.authenticate(key)  # expired in the database too


async def test_stale_read_is_not_cached(world: World) -> None:
    _, kid, key = await new_key(world)
    real_fetchrow = world.db.fetchrow
    # Hold the lookup until after the revocation event has been handled.
    gate = asyncio.Event()

    async def slow_fetchrow(sql: str, *args: object) -> object:
        await gate.wait()
        return await real_fetchrow(sql, *args)

    world.db.fetchrow = slow_fetchrow  # type: ignore[method-assign,assignment]
    pending = asyncio.ensure_future(world.keys.authenticate(key))
    for _ in range(5):  # let the lookup start and block
        await asyncio.sleep(0)
    world.keys.on_change("key_revoked", None, kid)  # an invalidation while it is in flight
    gate.set()
    await pending  # the in-flight request itself may pass...
    world.db.fetchrow = real_fetchrow  # type: ignore[method-assign]
    assert world.keys.db_lookups == 1
    await world.keys.authenticate(key)  # ...but its read was not cached: asked again
    assert world.keys.db_lookups == 2
    await world.keys.authenticate(key)
    assert world.keys.db_lookups == 2


async def test_last_used_is_flushed_in_batches(world: World) -> None:
    _, kid, key = await new_key(world)
    _, kid2, key2 = await new_key(world, "e@example.com")
    for _ in range(10):
        await world.keys.authenticate(key)
    await world.keys.authenticate(key2)
    assert await world.db.fetchval(
        "SELECT COUNT(*) FROM api_keys WHERE last_used_at IS NOT NULL") == 0  # none per request
    assert await world.keys.flush_last_used() == 2
    assert await world.keys.flush_last_used() == 0
    rows = [tuple(r) for r in await world.db.fetch("SELECT id, last_used_at FROM api_keys "
                                                   "ORDER BY id")]
    assert rows == [(kid, world.wall[0]), (kid2, world.wall[0])]


async def test_close_flushes(world: World) -> None:
    _, kid, key = await new_key(world)
    await world.keys.authenticate(key)
    await world.keys.close()
    assert await world.db.fetchval("SELECT last_used_at FROM api_keys WHERE id = ?",
                                   kid) == world.wall[0]


async def test_poll_never_reads_inside_an_open_transaction(world: World) -> None:
    before = world.watcher.last_id
    poll: asyncio.Future[int] | None = None
    with pytest.raises(RuntimeError):
        async with world.repo.transaction() as db:
            await db.execute("INSERT INTO events (kind, created_at) VALUES ('key_revoked', 0)")
            poll = asyncio.ensure_future(world.watcher.poll_once())
            await asyncio.sleep(0.05)
            assert not poll.done()  # waits for the transaction to end
            raise RuntimeError("rolled back")
    assert poll is not None
    assert await poll == 0
    assert world.watcher.last_id == before
