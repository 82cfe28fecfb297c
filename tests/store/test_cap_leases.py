"""Cap leases on a real PostgreSQL (store.cap_leases): grants never lease more than a
key's cap leaves free, under any interleaving of many connections; closes and the
expiry sweep give back exactly what was not spent; the writer's charges never take a
key's spend in a period beyond its cap, even for late rows of an expired cap lease."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from flintproxy.store import caps, postgres
from flintproxy.store.db import PgDatabase
from flintproxy.store.debitplan import plan_debits
from flintproxy.store.leases import LeaseStore
from flintproxy.store.ledger import UsageRow

pytestmark = pytest.mark.timeout(120)

TTL_MS = 30_000
STARTED = 1_764_720_000_000  # 2025-12-03 00:00 UTC
DAY, MONTH = caps.periods(STARTED)


@pytest.fixture
async def db(postgres_dsn: str) -> AsyncIterator[PgDatabase]:
    database = await postgres.open_database(postgres_dsn, 40)
    await postgres.migrate(database)
    yield database
    await database.close()


async def account(db: PgDatabase, credit: int) -> int:
    return int(await db.pool.fetchval(
        "INSERT INTO accounts (status, created_at, credited_nano, balance_nano) "
        "VALUES ('active', 0, $1, $1) RETURNING id", credit))


async def key(db: PgDatabase, account_id: int, day: int | None, month: int | None = None
              ) -> int:
    return int(await db.pool.fetchval(
        "INSERT INTO api_keys (account_id, key_hash, prefix, last4, created_at, "
        "cap_day_nano, cap_month_nano) VALUES ($1, $2, 'fp-', 'abcd', 0, $3, $4) "
        "RETURNING id", account_id, secrets.token_bytes(32), day, month))


async def pot(db: PgDatabase, key_id: int, period: str) -> tuple[int, int, int]:
    """(spent, leased, sum of open cap leases' unspent part)."""
    row = await db.pool.fetchrow(
        "SELECT COALESCE((SELECT spent_nano FROM key_spend WHERE key_id = $1 AND period = $2)"
        ", 0), COALESCE((SELECT leased_nano FROM key_spend WHERE key_id = $1 AND period = $2)"
        ", 0), (SELECT COALESCE(SUM(granted_nano - spent_nano), 0) FROM cap_leases "
        "WHERE key_id = $1 AND period = $2)", key_id, period)
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def usage(request_id: str, account_id: int, key_id: int, cost: int) -> tuple[object, ...]:
    return tuple(UsageRow(request_id, account_id, key_id, "m", "local", 10, 10, 0, 0, 0,
                          cost, 200, "ok", STARTED, STARTED, 5, None))


async def test_concurrent_cap_grants_over_many_connections_never_lease_more_than_the_cap(
        db: PgDatabase) -> None:
    store = LeaseStore(db).caps
    key_id = await key(db, await account(db, 10**9), 5_000)
    grants = await asyncio.gather(
        *[store.grant((key_id, DAY), f"node{i % 7}", 37 + i % 13, TTL_MS) for i in range(200)])
    assert sum(g.granted_nano for g in grants if g is not None) == 5_000
    assert await pot(db, key_id, DAY) == (0, 5_000, 5_000)
    # Every lease closed: all of it is free again, exactly.
    for i, g in enumerate(grants):
        if g is not None:
            await store.close(g.lease_id, (key_id, DAY), f"node{i % 7}")
    assert await pot(db, key_id, DAY) == (0, 0, 0)


async def test_a_revoked_key_or_an_uncapped_period_gets_no_cap_lease(db: PgDatabase) -> None:
    store = LeaseStore(db).caps
    acct = await account(db, 1000)
    day_only = await key(db, acct, 100)
    assert await store.grant((day_only, MONTH), "a", 10, TTL_MS) is None
    revoked = await key(db, acct, 100)
    await db.pool.execute("UPDATE api_keys SET revoked_at = 1 WHERE id = $1", revoked)
    assert await store.grant((revoked, DAY), "a", 10, TTL_MS) is None
    grant = await store.grant((day_only, DAY), "a", 60, TTL_MS)
    assert grant is not None and grant.granted_nano == 60
    # A lowered cap: a top-up adds only what the new cap leaves free (nothing here).
    await db.pool.execute("UPDATE api_keys SET cap_day_nano = 50 WHERE id = $1", day_only)
    assert await store.top_up(grant.lease_id, (day_only, DAY), "a", 10, TTL_MS) == 0
    assert await store.give_back(grant.lease_id, (day_only, DAY), "a", 20)
    assert await pot(db, day_only, DAY) == (0, 40, 40)


async def test_an_expired_cap_lease_is_swept_back_to_its_cap_once(db: PgDatabase) -> None:
    store = LeaseStore(db).caps
    key_id = await key(db, await account(db, 1000), 500)
    gone = await store.grant((key_id, DAY), "a", 300, 1)
    kept = await store.grant((key_id, DAY), "b", 100, TTL_MS)
    assert gone is not None and kept is not None
    await asyncio.sleep(0.01)
    assert sorted(await asyncio.gather(store.sweep(), store.sweep())) == [0, 1]
    assert await pot(db, key_id, DAY) == (0, 100, 100)
    assert await store.extend("a", TTL_MS, [gone.lease_id]) == set()
    assert await store.extend("b", TTL_MS, [kept.lease_id]) == {kept.lease_id}


async def test_a_late_row_of_an_expired_cap_lease_is_charged_only_the_caps_free_part(
        db: PgDatabase) -> None:
    leases = LeaseStore(db)
    store = leases.caps
    acct = await account(db, 10_000)
    key_id = await key(db, acct, 1_000)
    gone = await store.grant((key_id, DAY), "a", 500, TTL_MS)
    other = await store.grant((key_id, DAY), "b", 400, TTL_MS)
    assert gone is not None and other is not None
    assert await store.close(gone.lease_id, (key_id, DAY), "a") == 500
    # The cap's free part is 1000 - 400 = 600; node a's late rows cost 450 + 450.
    async with db.pool.acquire() as conn, conn.transaction():
        free, held = await leases.lock_for_debits(conn, [acct], [])
        pot_free, pot_leases = await store.lock(conn, [(key_id, DAY), (key_id, MONTH)],
                                                [gone.lease_id])
        assert pot_leases == {} and pot_free == {(key_id, DAY): 600, (key_id, MONTH): None}
        row_pots = [[((key_id, DAY), gone.lease_id), ((key_id, MONTH), None)]] * 2
        plan = plan_debits([(acct, 450, None), (acct, 450, None)], free, held, row_pots,
                           pot_free, pot_leases)
        assert plan.costs == [450, 150]
        assert plan.written_off == 300
    # Rows with their live cap lease spend it first, then the cap's free part.
    async with db.pool.acquire() as conn, conn.transaction():
        free, held = await leases.lock_for_debits(conn, [acct], [])
        pot_free, pot_leases = await store.lock(conn, [(key_id, DAY)], [other.lease_id])
        plan = plan_debits([(acct, 700, None)], free, held,
                           [[((key_id, DAY), other.lease_id)]], pot_free, pot_leases)
        assert plan.costs == [700]
        assert plan.cap_spends == {other.lease_id: 400}
        assert plan.cap_from_leases == {(key_id, DAY): 400}


async def test_the_writers_batch_charges_cap_leases_and_never_lets_spend_pass_the_cap(
        db: PgDatabase) -> None:
    leases = LeaseStore(db)
    store = leases.caps
    acct = await account(db, 10_000)
    key_id = await key(db, acct, 1_000, 1_500)
    day = await store.grant((key_id, DAY), "a", 600, TTL_MS)
    month = await store.grant((key_id, MONTH), "a", 600, TTL_MS)
    other = await store.grant((key_id, DAY), "b", 300, TTL_MS)
    assert day is not None and month is not None and other is not None
    held = {DAY: day.lease_id, MONTH: month.lease_id}
    batch = [usage("r1", acct, key_id, 250), usage("r2", acct, key_id, 250)]
    for _ in range(2):  # a retried batch charges nothing twice
        await leases.commit_usage(UsageRow._fields, batch, lambda _a: None,
                                  lambda _k: held)
        assert await pot(db, key_id, DAY) == (500, 400, 400)  # 100 left on a, 300 on b
        assert await pot(db, key_id, MONTH) == (500, 100, 100)
    # Lease a on the day is gone: its late rows get only the day's free 1000-500-300.
    assert await store.close(day.lease_id, (key_id, DAY), "a") == 100
    late = [usage("r3", acct, key_id, 150), usage("r4", acct, key_id, 150)]
    await leases.commit_usage(UsageRow._fields, late, lambda _a: None, lambda _k: held)
    assert leases.written_off_nano == 100
    assert await pot(db, key_id, DAY) == (700, 300, 300)  # b's 300 stays backed
    assert await pot(db, key_id, MONTH) == (700, 0, 0)
    costs = {str(r[0]): int(r[1])
             for r in await db.pool.fetch("SELECT request_id, cost_nano FROM usage")}
    assert costs == {"r1": 250, "r2": 250, "r3": 150, "r4": 50}
    balance = await db.pool.fetchval("SELECT balance_nano FROM accounts WHERE id = $1", acct)
    assert balance == 10_000 - 700
