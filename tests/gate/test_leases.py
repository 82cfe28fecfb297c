"""The lease book (gate.leases) with Billing on a real PostgreSQL: requests reserve
against the node's lease with no round trip; top-ups come in the background; many
nodes together never reserve more than an account holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import suppress

import pytest

from flintproxy.config import BillingConfig, ModelPrice
from flintproxy.errors import InsufficientQuota, LeaseShortfall, ServiceUnavailable
from flintproxy.gate.billing import Billing, Reservation
from flintproxy.gate.bounds import Bound
from flintproxy.gate.gate import Ending, Outcome
from flintproxy.gate.leases import TOP_UP_WAIT_S, LeaseBook
from flintproxy.store import postgres
from flintproxy.store.db import PgDatabase
from flintproxy.store.debitplan import plan_debits
from flintproxy.store.leases import LeaseStore
from tests.store.test_leases import account, books

pytestmark = pytest.mark.timeout(120)

NANO = ModelPrice(input_nano_per_mtok=1_000_000, output_nano_per_mtok=1_000_000,
                  cached_input_nano_per_mtok=1_000_000)  # 1 nano a token
PRICES = {"m": NANO}
CFG = BillingConfig(default_max_tokens=100, lease_ttl_s=30.0, lease_min_nano=2_000,
                    lease_max_nano=100_000, lease_idle_return_s=0.2)
REQUEST = Bound(100, 0, 1, 100, 100, ("max_tokens",))  # reserves 200 nano


class Node:
    """One gateway node's money: Billing + LeaseBook + its background task."""

    def __init__(self, db: PgDatabase, cfg: BillingConfig = CFG) -> None:
        self.store = LeaseStore(db)
        self.billing = Billing(PRICES, cfg, balances=_NoBalances())
        self.leases = LeaseBook(self.store, self.billing, cfg)
        self.task = asyncio.get_running_loop().create_task(self.leases.run())

    async def reserve(self, account_id: int, bound: Bound = REQUEST) -> Reservation:
        """What ServiceGate.admit does with the billing."""
        if not self.billing.is_loaded(account_id):
            await self.billing.load(account_id)
        try:
            return self.billing.reserve(account_id, "m", bound)
        except LeaseShortfall as short:
            await self.billing.top_up(account_id, short.need_nano)
            return self.billing.reserve(account_id, "m", bound)

    async def spend(self, db: PgDatabase, res: Reservation, tokens: int) -> None:
        """Settle, then commit the row's debit as the usage writer does."""
        cost = self.billing.settle(res, Outcome(200, Ending.OK, prompt_tokens=tokens))
        self.billing.add_pending(res.account_id, cost)
        async with db.pool.acquire() as conn, conn.transaction():
            lease = self.leases.lease_of(res.account_id)
            free, held = await self.store.lock_for_debits(
                conn, [res.account_id], [] if lease is None else [lease])
            plan = plan_debits([(res.account_id, cost, lease)], free, held)
            await self.store.apply_debits(conn, plan)
        self.billing.committed({res.account_id: cost}, [])

    def trips(self) -> int:
        """Lease round trips (``debit`` counts this test's one-row "batches")."""
        return sum(n for op, n in self.store.round_trips.items() if op != "debit")

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.leases.close()


class _NoBalances:
    async def read(self, account_ids: list[int]) -> dict[int, int]:
        raise AssertionError("shared mode reads no balances")


@pytest.fixture
async def db(postgres_dsn: str) -> AsyncIterator[PgDatabase]:
    database = await postgres.open_database(postgres_dsn, 30)
    await postgres.migrate(database)
    yield database
    await database.close()


async def test_requests_spend_a_lease_locally_and_top_ups_stay_rare(
        db: PgDatabase) -> None:
    acct = await account(db, 10_000_000)
    node = Node(db)
    try:
        for _ in range(500):
            res = await node.reserve(acct)
            await node.spend(db, res, 150)
            await asyncio.sleep(0)  # let the background top-up run
        trips = node.trips()
        print(f"money round trips: {node.store.round_trips} = {trips / 500:.4f} a request")
        # 500 x 150 nano = 75,000 nano through slices of 2,000 growing with the rate.
        assert trips / 500 <= 0.1, node.store.round_trips
        balance, leased, _ = await books(db, acct)
        assert balance == 10_000_000 - 500 * 150
        assert leased == node.billing.snapshot(acct)[0]
    finally:
        await node.stop()
    assert await books(db, acct) == (10_000_000 - 75_000, 0, 0)  # returned at close


async def test_a_request_larger_than_the_lease_waits_for_one_top_up(db: PgDatabase) -> None:
    acct = await account(db, 1_000_000)
    node = Node(db)
    try:
        big = Bound(5_000, 0, 1, 5_000, 5_000, ("max_tokens",))  # reserves 10,000 > 2,000
        res = await node.reserve(acct, big)
        assert res.amount == 10_000 and res.max_tokens == 5_000  # not lowered: topped up
        assert node.store.round_trips["grant"] == 1 and node.store.round_trips["top_up"] == 1
    finally:
        await node.stop()


async def test_a_top_up_that_does_not_come_is_a_402_after_a_bounded_wait(
        db: PgDatabase) -> None:
    acct = await account(db, 1_000_000)
    node = Node(db)
    try:
        await node.reserve(acct)
        node.task.cancel()  # the top-up task is stuck (a shared store that hangs)
        big = Bound(5_000, 0, 1, 5_000, 5_000, ("max_tokens",))
        started = asyncio.get_running_loop().time()
        with pytest.raises(InsufficientQuota):
            await node.reserve(acct, big)
        waited = asyncio.get_running_loop().time() - started
        assert waited < TOP_UP_WAIT_S + 1.0  # one bounded wait, then the answer
    finally:
        await node.stop()


async def test_concurrent_requests_short_of_lease_share_one_top_up(db: PgDatabase) -> None:
    acct = await account(db, 10_000_000)
    node = Node(db)
    try:
        await node.reserve(acct)  # the first lease: 2,000 nano
        big = Bound(500, 0, 1, 500, 500, ("max_tokens",))  # 1,000 nano each
        held = await asyncio.gather(*[node.reserve(acct, big) for _ in range(50)])
        assert all(r.max_tokens == 500 for r in held)  # none lowered, none refused
        assert node.store.round_trips["top_up"] <= 3  # coalesced, not one per request
    finally:
        await node.stop()


async def test_an_exhausted_account_is_a_402_without_a_round_trip_per_request(
        db: PgDatabase) -> None:
    acct = await account(db, 1_000)  # affords 5 requests of 200 nano
    node = Node(db)
    try:
        held = [await node.reserve(acct) for _ in range(5)]
        assert sum(r.amount for r in held) == 1_000
        before = node.trips()
        for _ in range(50):
            with pytest.raises(InsufficientQuota):
                await node.reserve(acct)
        assert node.trips() - before <= 1  # asked once, then known exhausted
        # A credit made elsewhere is leasable at once (the change feed says so).
        await db.pool.execute("UPDATE accounts SET credited_nano = credited_nano + 200, "
                           "balance_nano = balance_nano + 200 WHERE id = $1", acct)
        node.billing.on_change("credit", acct, None)  # the lease book's business, not a reload
        assert not node.billing.has_stale()
        node.leases.on_change("credit", acct, None)
        assert (await node.reserve(acct)).amount == 200
    finally:
        await node.stop()


async def test_three_nodes_hammering_one_account_never_reserve_more_than_it_holds(
        db: PgDatabase) -> None:
    acct = await account(db, 20_000)  # 100 requests of 200 nano
    nodes = [Node(db) for _ in range(3)]
    admitted: list[Reservation] = []

    async def client(node: Node) -> None:
        for _ in range(60):
            with suppress(InsufficientQuota):
                admitted.append(await node.reserve(acct))
            await asyncio.sleep(0)

    try:
        await asyncio.gather(*[client(nodes[i % 3]) for i in range(12)])
        assert sum(r.amount for r in admitted) <= 20_000
        assert len(admitted) >= 80  # fragmentation over nodes costs little
        balance, leased, open_unspent = await books(db, acct)
        assert leased == open_unspent <= balance == 20_000
    finally:
        for node in nodes:
            await node.stop()


async def test_a_disabled_accounts_unreserved_lease_goes_back_at_once(
        db: PgDatabase) -> None:
    acct = await account(db, 1_000_000)
    node = Node(db)
    try:
        res = await node.reserve(acct)
        assert (await books(db, acct))[1] == 2_000
        await db.pool.execute("UPDATE accounts SET status = 'disabled' WHERE id = $1", acct)
        node.leases.on_change("account_disabled", acct, None)
        for _ in range(100):
            if (await books(db, acct))[1] == res.amount:
                break
            await asyncio.sleep(0.01)
        assert (await books(db, acct))[1] == res.amount  # only the reserved part stays
        with pytest.raises(InsufficientQuota):
            await node.reserve(acct)
        assert node.store.round_trips["top_up"] == 0  # refused locally
    finally:
        await node.stop()


async def test_a_node_that_cannot_renew_stops_spending_before_its_lease_expires(
        db: PgDatabase) -> None:
    acct = await account(db, 1_000_000)
    cfg = BillingConfig(default_max_tokens=100, lease_ttl_s=2.0, lease_min_nano=2_000,
                        lease_max_nano=100_000, lease_idle_return_s=60.0)
    node = Node(db, cfg)
    try:
        await node.reserve(acct)
        await asyncio.sleep(1.2)  # past TTL/2 with no renewal: frozen
        with pytest.raises(ServiceUnavailable):
            await node.reserve(acct)
        await node.leases.renew()  # the store answers again
        assert (await node.reserve(acct)).amount == 200
    finally:
        await node.stop()


async def test_an_idle_lease_goes_back_to_the_account(db: PgDatabase) -> None:
    acct = await account(db, 1_000_000)
    node = Node(db)
    try:
        res = await node.reserve(acct)
        await node.spend(db, res, 50)
        for _ in range(3):
            await node.leases.return_idle()
            await asyncio.sleep(0.15)
        await node.leases.return_idle()
        assert await books(db, acct) == (1_000_000 - 50, 0, 0)
        assert not node.billing.is_loaded(acct)
        assert (await node.reserve(acct)).amount == 200  # a new lease on next use
    finally:
        await node.stop()
