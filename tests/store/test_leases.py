"""Credit leases on a real PostgreSQL (store.leases): grants never lease more than the
balance, under any interleaving of many connections; returns, closes and the expiry
sweep give back exactly what was not spent; debits never take a balance below zero."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from flintproxy.errors import StoreUnavailable
from flintproxy.store import postgres
from flintproxy.store.db import PgDatabase
from flintproxy.store.debitplan import plan_debits
from flintproxy.store.leases import LeaseStore
from flintproxy.store.ledger import UsageRow

pytestmark = pytest.mark.timeout(120)

TTL_MS = 30_000

@pytest.fixture
async def db(postgres_dsn: str) -> AsyncIterator[PgDatabase]:
    """A migrated PostgreSQL database (``flintproxy admin migrate``), pool of 40."""
    database = await postgres.open_database(postgres_dsn, 40)
    await postgres.migrate(database)
    yield database
    await database.close()


async def account(db: PgDatabase, credit: int, status: str = "active") -> int:
    return int(await db.pool.fetchval(
        "INSERT INTO accounts (status, created_at, credited_nano, balance_nano) "
        "VALUES ($1, 0, $2, $2) RETURNING id", status, credit))


async def books(db: PgDatabase, account_id: int) -> tuple[int, int, int]:
    """(balance, leased, sum of open leases' unspent part)."""
    row = await db.pool.fetchrow(
        "SELECT balance_nano, leased_nano, (SELECT COALESCE(SUM(granted_nano - spent_nano), 0)"
        " FROM credit_leases WHERE account_id = $1) FROM accounts WHERE id = $1", account_id)
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def test_a_grant_takes_what_was_asked_and_the_last_grant_takes_what_is_left(
        db: PgDatabase) -> None:
    store = LeaseStore(db)
    acct = await account(db, 1000)
    first = await store.grant(acct, "a", 700, TTL_MS)
    second = await store.grant(acct, "b", 700, TTL_MS)
    assert first is not None and first.granted_nano == 700
    assert second is not None and second.granted_nano == 300
    assert await store.grant(acct, "c", 1, TTL_MS) is None  # nothing left: refused
    assert await books(db, acct) == (1000, 1000, 1000)
    assert store.round_trips["grant"] == 3


async def test_a_disabled_or_unknown_account_gets_no_lease(db: PgDatabase) -> None:
    store = LeaseStore(db)
    disabled = await account(db, 1000, "disabled")
    assert await store.grant(disabled, "a", 10, TTL_MS) is None
    assert await store.grant(999_999, "a", 10, TTL_MS) is None
    live = await account(db, 1000)
    grant = await store.grant(live, "a", 10, TTL_MS)
    assert grant is not None
    await db.pool.execute("UPDATE accounts SET status = 'disabled' WHERE id = $1", live)
    assert await store.top_up(grant.lease_id, live, "a", 10, TTL_MS) == 0
    assert await books(db, live) == (1000, 10, 10)


async def test_concurrent_grants_over_many_connections_never_lease_more_than_the_balance(
        db: PgDatabase) -> None:
    store = LeaseStore(db)
    acct = await account(db, 10_000)
    grants = await asyncio.gather(
        *[store.grant(acct, f"node{i % 7}", 37 + i % 13, TTL_MS) for i in range(300)])
    leases = [(f"node{i % 7}", g) for i, g in enumerate(grants) if g is not None]
    # Demand (~13k) exceeds supply: all of it is leased, not a nano more.
    assert sum(g.granted_nano for _, g in leases) == 10_000
    assert await books(db, acct) == (10_000, 10_000, 10_000)
    # Top-ups racing returns and closes on the same account stay exact too.
    await db.pool.execute("UPDATE accounts SET credited_nano = credited_nano + 5000, "
                       "balance_nano = balance_nano + 5000 WHERE id = $1", acct)
    ops = []
    for i, (node, g) in enumerate(leases):
        if i % 3 == 0:
            ops.append(store.top_up(g.lease_id, acct, node, 100, TTL_MS))
        elif i % 3 == 1:
            ops.append(store.give_back(g.lease_id, acct, node, g.granted_nano // 2))
        else:
            ops.append(store.close(g.lease_id, acct, node))
    await asyncio.gather(*ops)
    balance, leased, open_unspent = await books(db, acct)
    assert balance == 15_000
    assert leased == open_unspent <= balance


async def test_a_top_up_renews_and_adds_at_most_what_is_free(db: PgDatabase) -> None:
    store = LeaseStore(db)
    acct = await account(db, 1000)
    grant = await store.grant(acct, "a", 400, 50)
    assert grant is not None
    assert await store.top_up(grant.lease_id, acct, "a", 900, TTL_MS) == 600
    assert await store.top_up(grant.lease_id, acct, "a", 1, TTL_MS) == 0
    # Renewed to the long TTL: the sweep leaves it alone.
    await asyncio.sleep(0.1)
    assert await store.sweep() == 0
    assert await books(db, acct) == (1000, 1000, 1000)
    # Another node cannot top up (or close, or return) a lease it does not hold.
    assert await store.top_up(grant.lease_id, acct, "b", 1, TTL_MS) == 0
    assert await store.close(grant.lease_id, acct, "b") == 0
    assert not await store.give_back(grant.lease_id, acct, "b", 1)


async def test_give_back_and_close_free_exactly_the_unspent_part(db: PgDatabase) -> None:
    store = LeaseStore(db)
    acct = await account(db, 1000)
    grant = await store.grant(acct, "a", 600, TTL_MS)
    assert grant is not None
    async with db.pool.acquire() as conn, conn.transaction():
        free, leases = await store.lock_for_debits(conn, [acct], [grant.lease_id])
        plan = plan_debits([(acct, 150, grant.lease_id)], free, leases)
        await store.apply_debits(conn, plan)
    assert await books(db, acct) == (850, 450, 450)
    assert not await store.give_back(grant.lease_id, acct, "a", 451)  # more than unspent
    assert await store.give_back(grant.lease_id, acct, "a", 200)
    assert await books(db, acct) == (850, 250, 250)
    assert await store.close(grant.lease_id, acct, "a") == 250
    assert await store.close(grant.lease_id, acct, "a") == 0  # idempotent
    assert await books(db, acct) == (850, 0, 0)


async def test_an_expired_lease_is_swept_back_to_the_account_once(db: PgDatabase) -> None:
    store = LeaseStore(db)
    acct = await account(db, 1000)
    dead = await store.grant(acct, "dead", 300, 1)
    live = await store.grant(acct, "live", 300, TTL_MS)
    assert dead is not None and live is not None
    await asyncio.sleep(0.05)
    assert await store.extend("dead", TTL_MS, [dead.lease_id]) == set()  # too late
    assert await store.extend("live", TTL_MS, [live.lease_id, dead.lease_id]) == {
        live.lease_id}
    results = await asyncio.gather(*[LeaseStore(db).sweep() for _ in range(5)])
    assert sum(results) == 1  # five sweepers at once: swept once
    assert await books(db, acct) == (1000, 300, 300)
    assert await store.top_up(dead.lease_id, acct, "dead", 10, TTL_MS) == 0


async def test_a_late_row_is_charged_only_from_free_money_and_the_rest_written_off(
        db: PgDatabase) -> None:
    store = LeaseStore(db)
    acct = await account(db, 1000)
    gone = await store.grant(acct, "a", 500, TTL_MS)
    other = await store.grant(acct, "b", 400, TTL_MS)
    assert gone is not None and other is not None
    assert await store.close(gone.lease_id, acct, "a") == 500
    # free is 1000 - 400 = 600; node a's late rows cost 450 + 450 (its lease is gone).
    async with db.pool.acquire() as conn, conn.transaction():
        free, leases = await store.lock_for_debits(conn, [acct], [gone.lease_id])
        assert leases == {}
        plan = plan_debits([(acct, 450, gone.lease_id), (acct, 450, gone.lease_id)],
                           free, leases)
        assert plan.costs == [450, 150]
        assert plan.written_off == 300
        await store.apply_debits(conn, plan)
    balance, leased, _ = await books(db, acct)
    assert (balance, leased) == (400, 400)  # node b's lease is still fully backed
    # Rows of a lease of another account never spend it.
    mine = await account(db, 100)
    async with db.pool.acquire() as conn, conn.transaction():
        free, leases = await store.lock_for_debits(conn, [mine], [other.lease_id])
        plan = plan_debits([(mine, 150, other.lease_id)], free, leases)
        assert plan.costs == [100] and plan.spends == {}
        await store.apply_debits(conn, plan)
    assert await books(db, mine) == (0, 0, 0)
    assert await books(db, acct) == (400, 400, 400)


async def test_an_unreachable_database_is_a_clear_503(db: PgDatabase) -> None:
    await db.close()
    store = LeaseStore(db)
    with pytest.raises(StoreUnavailable) as info:
        await store.grant(1, "a", 1, TTL_MS)
    assert info.value.status == 503


def usage(request_id: str, account_id: int, cost: int) -> tuple[object, ...]:
    return tuple(UsageRow(request_id, account_id, None, "m", "local", 10, 10, 0, 0, 0, cost,
                          200, "ok", 0, 0, 5, None))


async def test_the_writers_batch_charges_leases_once_and_a_late_row_only_what_is_free(
        db: PgDatabase) -> None:
    store = LeaseStore(db)
    acct = await account(db, 1000)
    lease = await store.grant(acct, "a", 600, TTL_MS)
    other = await store.grant(acct, "b", 300, TTL_MS)
    assert lease is not None and other is not None
    batch = [usage("r1", acct, 250), usage("r2", acct, 250)]
    await store.commit_usage(UsageRow._fields, batch, lambda _a: lease.lease_id)
    assert await books(db, acct) == (500, 400, 400)  # 600 - 500 left on a, 300 on b
    # A retried batch (the COMMIT's answer was lost) inserts and charges nothing twice.
    await store.commit_usage(UsageRow._fields, batch, lambda _a: lease.lease_id)
    assert await books(db, acct) == (500, 400, 400)
    # Lease a is gone; its node's late rows get only the free 500 - 300 = 200 (b's 300
    # stays backed), the rest is written off.
    assert await store.close(lease.lease_id, acct, "a") == 100
    late = [usage("r3", acct, 150), usage("r4", acct, 150)]
    await store.commit_usage(UsageRow._fields, late, lambda _a: lease.lease_id)
    assert store.written_off_nano == 100
    assert await books(db, acct) == (300, 300, 300)
    costs = {str(r[0]): int(r[1])
             for r in await db.pool.fetch("SELECT request_id, cost_nano FROM usage")}
    assert costs == {"r1": 250, "r2": 250, "r3": 150, "r4": 50}  # what each was charged
    assert sum(costs.values()) == 1000 - 300  # the ledger still sums to credited - balance
