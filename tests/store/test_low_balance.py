"""The opt-in low-balance notice: once below the threshold, re-armed above it."""

from __future__ import annotations

import pytest

from flintproxy.errors import BadRequest
from flintproxy.store.accounts import Accounts
from flintproxy.store.db import Database
from flintproxy.store.low_balance import LowBalance

USD = 10**9


async def spend(db: Database, account_id: int, nano: int) -> None:
    await db.execute("UPDATE accounts SET charged_nano = charged_nano + ?, "
                     "balance_nano = balance_nano - ? WHERE id = ?", nano, nano, account_id)


async def test_one_notice_below_the_threshold_and_another_only_after_recovering(
        store_db: Database) -> None:
    repo = Accounts(store_db, 4, 3600)
    low = LowBalance(repo)
    a = await repo.create_account("low@example.com", None)
    quiet = await repo.create_account("quiet@example.com", None)  # never opted in
    for who in (a, quiet):
        await repo.credit(who, 5 * USD)
    await low.set_threshold(a, 2 * USD)
    assert await low.run_once() == 0
    await spend(store_db, a, 4 * USD)
    await spend(store_db, quiet, 4 * USD)
    assert await low.run_once() == 1
    assert await low.run_once() == 0  # told once
    rows = await store_db.fetch("SELECT recipient, body FROM email_outbox")
    assert [r[0] for r in rows] == ["low@example.com"] and "1.00 USD" in rows[0][1]
    await repo.credit(a, 10 * USD)
    assert await low.run_once() == 0  # re-armed, nothing to say
    await spend(store_db, a, 10 * USD)
    assert await low.run_once() == 1
    await low.set_threshold(a, None)
    await spend(store_db, a, USD // 2)
    assert await low.run_once() == 0


@pytest.mark.parametrize("bad", [0, -1, 10**18])
async def test_a_threshold_out_of_range_is_refused(store_db: Database, bad: int) -> None:
    repo = Accounts(store_db, 4, 3600)
    a = await repo.create_account("x@example.com", None)
    with pytest.raises(BadRequest):
        await LowBalance(repo).set_threshold(a, bad)
