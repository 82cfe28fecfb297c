"""Redemption codes and the ledger of balance changes, on both engines."""

from __future__ import annotations

import asyncio

import pytest

from flintproxy.errors import BadRequest, NotFound
from flintproxy.store.accounts import Accounts
from flintproxy.store.codes import Codes, code_hash, normalize_code
from flintproxy.store.db import Database
from flintproxy.store.entries import erase_usage, reconcile

USD = 1_000_000_000


@pytest.fixture
def repo(store_db: Database) -> Accounts:
    return Accounts(store_db, 4, 3600)


async def test_only_the_sha256_of_a_code_is_stored(repo: Accounts) -> None:
    (code,) = await Codes(repo).create(1, 5 * USD, note="launch")
    rows = await repo.db.fetch("SELECT code_hash, amount_nano, note FROM redemption_codes")
    assert [(bytes(r[0]), r[1], r[2]) for r in rows] == [(code_hash(code), 5 * USD, "launch")]
    assert code.encode() not in bytes(rows[0][0])


async def test_two_concurrent_redemptions_of_one_code_credit_exactly_once(
        repo: Accounts) -> None:
    a = await repo.create_account("a@example.com", None)
    b = await repo.create_account("b@example.com", None)
    (code,) = await Codes(repo).create(1, 5 * USD)
    results = await asyncio.gather(*(Codes(repo).redeem(who, code) for who in (a, b, a, b)),
                                   return_exceptions=True)
    won = [r for r in results if not isinstance(r, BaseException)]
    assert len(won) == 1 and all(isinstance(r, NotFound) for r in results if r not in won)
    balances = [(await repo.get(x)).balance_nano for x in (a, b)]
    assert sorted(balances) == [0, 5 * USD]
    assert (await reconcile(repo.db)).ok


async def test_a_used_expired_or_unknown_code_gets_one_and_the_same_refusal(
        repo: Accounts) -> None:
    a = await repo.create_account("a@example.com", None)
    codes = Codes(repo)
    (used,) = await codes.create(1, USD)
    await codes.redeem(a, used)
    (expired,) = await codes.create(1, USD, expires_at=repo.clock() - 1)
    unknown = "FLINT-0000-0000-0000-0000"
    messages = set()
    for code in (used, expired, unknown):
        with pytest.raises(NotFound) as caught:
            await codes.redeem(a, code)
        messages.add(caught.value.message)
    assert len(messages) == 1
    assert (await repo.get(a)).balance_nano == USD


async def test_a_code_typed_loosely_still_redeems(repo: Accounts) -> None:
    a = await repo.create_account("a@example.com", None)
    (code,) = await Codes(repo).create(1, USD)
    sloppy = " " + code.lower().replace("-", " ") + " "
    assert (await Codes(repo).redeem(a, sloppy)).balance_nano == USD


@pytest.mark.parametrize("bad", [None, 5, "", "x" * 65, "FLINT-UUUU-UUUU-UUUU-UUUU",
                                 "FLINT-0000", ["FLINT"], "FLINT-0000-0000-0000-0000\x00"])
def test_malformed_codes_are_a_400_naming_the_field(bad: object) -> None:
    with pytest.raises(BadRequest) as caught:
        normalize_code(bad)
    assert caught.value.param == "code"


async def test_every_balance_change_is_an_entry_with_reason_and_actor_and_the_books_balance(
        repo: Accounts) -> None:
    a = await repo.create_account("a@example.com", None)
    await repo.credit(a, 3 * USD)
    (code,) = await Codes(repo).create(1, 2 * USD)
    await Codes(repo).redeem(a, code)
    rows = await repo.db.fetch("SELECT amount_nano, reason, actor FROM credits "
                               "WHERE account_id = ? ORDER BY id", a)
    assert [tuple(r) for r in rows] == [(3 * USD, "credit", "operator"),
                                        (2 * USD, "redemption", f"account:{a}")]
    # Usage charged, then erased on the holder's request: the charge stays on the books.
    async with repo.transaction() as q:
        await q.execute(
            "INSERT INTO usage (request_id, account_id, model, prompt_tokens, "
            "completion_tokens, cost_nano, status, outcome, stream, started_at, duration_ms) "
            "VALUES ('r1', ?, 'm', 1, 1, 700, 200, 'ok', 0, 0, 1)", a)
        await q.execute("UPDATE accounts SET charged_nano = charged_nano + 700, "
                        "balance_nano = balance_nano - 700 WHERE id = ?", a)
    assert (await reconcile(repo.db)).ok
    assert await erase_usage(repo.db, "SELECT id FROM usage WHERE account_id = ? LIMIT ?",
                             a, 10) == 1
    report = await reconcile(repo.db)
    assert report.ok and report.accounts == 1


async def test_reconcile_names_an_account_whose_balance_was_changed_without_an_entry(
        repo: Accounts) -> None:
    a = await repo.create_account("a@example.com", None)
    await repo.credit(a, USD)
    await repo.db.execute("UPDATE accounts SET credited_nano = credited_nano + 1, "
                          "balance_nano = balance_nano + 1 WHERE id = ?", a)
    report = await reconcile(repo.db)
    assert not report.ok
    assert report.mismatches == [f"account {a}: credited 1.000000001 USD != the sum of its "
                                 "credits 1.00 USD (off by 0.000000001)"]


async def test_reconcile_names_leased_money_that_no_open_lease_holds(repo: Accounts) -> None:
    a = await repo.create_account("a@example.com", None)
    await repo.credit(a, USD)
    await repo.db.execute("UPDATE accounts SET leased_nano = 5 WHERE id = ?", a)
    await repo.db.execute("INSERT INTO key_spend (key_id, period, spent_nano, leased_nano) "
                          "VALUES (7, 'd2026-12-03', 100, 40)")
    report = await reconcile(repo.db)
    assert report.mismatches == [
        f"account {a}: leased 0.000000005 USD != what its open credit leases hold 0.00 USD "
        "(off by 0.000000005)",
        "key 7 d2026-12-03: leased 0.00000004 USD != what its open cap leases hold 0.00 USD "
        "(off by 0.00000004)"]
