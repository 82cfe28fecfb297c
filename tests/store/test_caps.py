"""Spend caps in the store: UTC periods, key_spend written with the usage rows on both
engines, erasing usage never resets it, and hostile cap values."""

from __future__ import annotations

import calendar
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flintproxy.config import BillingConfig
from flintproxy.errors import BadRequest
from flintproxy.gate.billing import Billing
from flintproxy.gate.spendcaps import period_bounds
from flintproxy.store import caps, postgres
from flintproxy.store.db import Database, PgDatabase, SqliteDatabase
from flintproxy.store.ledger import Balances, UsageRow, UsageWriter, open_writer_db
from flintproxy.store.retention import prune_spend
from tests.conftest import migrated_dsn


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
           second: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) * 1000


MIDNIGHT = utc_ms(2026, 12, 31, 23, 59, 59) + 999  # the last ms of 2026


def usage(request_id: str, account_id: int, key_id: int | None, cost: int,
          started_at: int) -> UsageRow:
    return UsageRow(request_id, account_id, key_id, "gpt-4o-mini", "local", 10, 20, 0, 0, 0,
                    cost, 200, "ok", 0, started_at, 5, 1)


def test_a_request_belongs_to_the_utc_day_and_month_it_started_in() -> None:
    assert caps.periods(MIDNIGHT) == ("d2026-12-31", "m2026-12")
    assert caps.periods(MIDNIGHT + 1) == ("d2027-01-01", "m2027-01")
    assert caps.periods(utc_ms(2028, 2, 29, 12)) == ("d2028-02-29", "m2028-02")
    assert caps.period_reset_ms("d2026-12-31") == MIDNIGHT + 1
    assert caps.period_reset_ms("m2026-12") == MIDNIGHT + 1
    assert caps.period_reset_ms("m2027-02") == utc_ms(2027, 3, 1)
    assert period_bounds("m2028-02") == (utc_ms(2028, 2, 1), utc_ms(2028, 3, 1))
    assert period_bounds("d2026-12-31") == (utc_ms(2026, 12, 31), MIDNIGHT + 1)


@pytest.mark.parametrize("value", [-1, "-0.01", "NaN", "nan", "inf", 1e400, float("inf"),
                                   "1e400", "5 dollars", "", "0.0000000001", True, [5],
                                   {"usd": 5}, "1" * 41, 10**10, "1000000000.000000001",
                                   "1e999999999", "-1e999999999"])
def test_hostile_cap_values_are_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(BadRequest) as err:
        caps.parse_cap(value, "spend_cap_day_usd")
    assert err.value.param == "spend_cap_day_usd"


def test_caps_are_exact_decimal_amounts_or_none() -> None:
    assert caps.parse_cap(None, "x") is None
    assert caps.parse_cap("5", "x") == 5_000_000_000
    assert caps.parse_cap(0.1, "x") == 100_000_000  # a JSON number, read as its decimal text
    assert caps.parse_cap(" 0.000000001 ", "x") == 1
    assert caps.parse_cap(0, "x") == 0
    assert caps.parse_cap("1000000000", "x") == caps.MAX_CAP_NANO


async def _writer_run(db: Database, rows: list[UsageRow]) -> Billing:
    cfg = BillingConfig(flush_interval_s=0.02, flush_batch_rows=50)
    billing = Billing({}, cfg, Balances(db))
    writer = UsageWriter(db, billing, cfg)
    writer.start()
    for r in rows:
        writer.record(r)
    assert await writer.sync(20)
    assert await writer.drain(5) == 0
    return billing


async def _add_account(db: Database) -> int:
    return int(await db.fetchval(
        "INSERT INTO accounts (email, created_at, credited_nano, balance_nano) "
        "VALUES (?, 0, ?, ?) RETURNING id", f"{time.time_ns()}@x", 10**12, 10**12))


async def _spend(db: Database) -> dict[tuple[int, str], int]:
    return {(int(r[0]), str(r[1])): int(r[2])
            for r in await db.fetch("SELECT key_id, period, spent_nano FROM key_spend")}


async def _check_spend_follows_rows(db: Database) -> None:
    account = await _add_account(db)
    rows = [usage(f"r{i}", account, 1 + i % 3, 100 + i, MIDNIGHT - 150 + i) for i in range(300)]
    rows.append(usage("free", account, 1, 0, MIDNIGHT))  # a zero cost adds nothing
    rows.append(usage("keyless", account, None, 999, MIDNIGHT))  # no key: no key spend
    await _writer_run(db, rows)
    expected: dict[tuple[int, str], int] = {}
    for r in rows:
        if r.key_id is not None and r.cost_nano:
            for period in caps.periods(r.started_at):
                expected[(r.key_id, period)] = expected.get((r.key_id, period), 0) + r.cost_nano
    assert await _spend(db) == expected
    assert {p for _, p in expected} == {"d2026-12-31", "m2026-12", "d2027-01-01", "m2027-01"}
    # A second batch adds to the same periods (the UPSERT), never replaces.
    await _writer_run(db, [usage("again", account, 1, 5, MIDNIGHT)])
    after = await _spend(db)
    assert after[(1, "d2026-12-31")] == expected[(1, "d2026-12-31")] + 5
    # Erasing usage rows (a user's right) leaves the spend, so a cap is not reset.
    await db.execute("DELETE FROM usage WHERE account_id = ?", account)
    assert await _spend(db) == after


async def test_the_writer_adds_each_keys_charged_spend_per_utc_day_and_month_on_sqlite(
        tmp_path: Any) -> None:
    db = await open_writer_db(tmp_path / "caps.db")
    try:
        await _check_spend_follows_rows(db)
    finally:
        await db.close()


@pytest.fixture
async def pg(request: pytest.FixtureRequest) -> AsyncIterator[PgDatabase]:
    db = await postgres.open_database(await migrated_dsn(request), 4)
    yield db
    await db.close()


async def test_the_writer_adds_each_keys_charged_spend_per_utc_day_and_month_on_postgresql(
        pg: PgDatabase) -> None:
    await _check_spend_follows_rows(pg)


async def test_the_cap_books_read_the_committed_spend_and_the_queued_rows_together(
        tmp_path: Any) -> None:
    db: SqliteDatabase = await open_writer_db(tmp_path / "books.db")
    try:
        account = await _add_account(db)
        cfg = BillingConfig(flush_interval_s=60, flush_batch_rows=10_000)
        billing = Billing({}, cfg, Balances(db))
        writer = UsageWriter(db, billing, cfg)
        await db.execute("INSERT INTO key_spend (key_id, period, spent_nano) VALUES (?, ?, ?)",
                         9, caps.periods(MIDNIGHT)[0], 1000)
        # Rows of the key queued (not committed) before its books exist.
        writer.record(usage("q1", account, 9, 70, MIDNIGHT - 10))
        writer.record(usage("q2", account, 9, 30, MIDNIGHT + 10))  # the next day
        writer.start()
        await billing.caps.load(9, (5000, 9000), MIDNIGHT)
        books = billing.caps.books(9, (5000, 9000), MIDNIGHT)
        assert books is not None
        day, month = books
        assert (day.period, day.spent, day.pending, day.limit) == ("d2026-12-31", 1000, 70, 5000)
        assert (month.period, month.spent, month.pending) == ("m2026-12", 0, 70)
        assert await writer.sync(10)
        assert (day.spent, day.pending, month.spent, month.pending) == (1070, 0, 70, 0)
        assert await writer.drain(5) == 0
    finally:
        await db.close()


async def _check_old_spend_is_pruned(db: Database) -> None:
    now = MIDNIGHT + 3_600_000  # 2027-01-01 01:00 UTC
    rows = [("d2026-10-30", 0), ("d2026-10-31", 0), ("d2026-11-01", 0), ("d2027-01-01", 0),
            ("m2025-11", 0), ("m2025-12", 0), ("m2027-01", 0), ("d2026-01-01", 5)]
    for period, leased in rows:
        await db.execute("INSERT INTO key_spend (key_id, period, spent_nano, leased_nano) "
                         "VALUES (1, ?, 10, ?)", period, leased)
    # A fully spent lease leaves leased_nano at 0 but still refers to its row.
    await db.execute("INSERT INTO cap_leases (key_id, period, node_id, granted_nano, "
                     "spent_nano, created_at, expires_at) VALUES (1, 'd2026-10-30', 'n', "
                     "10, 10, 0, 0)")
    assert await prune_spend(db, now) == 1
    left = {str(r[0]) for r in await db.fetch("SELECT period FROM key_spend")}
    # 62 days back is 2026-10-31; 13 months back is 2025-12; a leased row always stays.
    assert left == {"d2026-10-30", "d2026-10-31", "d2026-11-01", "d2027-01-01", "m2025-12",
                    "m2027-01", "d2026-01-01"}


async def test_spend_of_long_past_days_and_months_is_pruned_but_never_a_leased_one(
        tmp_path: Any) -> None:
    db = await open_writer_db(tmp_path / "prune.db")
    try:
        await _check_old_spend_is_pruned(db)
    finally:
        await db.close()


async def test_spend_is_pruned_the_same_way_on_postgresql(pg: PgDatabase) -> None:
    await _check_old_spend_is_pruned(pg)
