"""Billing: exact integer costs, atomic reservations, the balance book on both store
engines (a real SQLite file, a real PostgreSQL)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from flintproxy.config import BillingConfig, ModelPrice, usd_to_nano
from flintproxy.errors import InsufficientQuota, ModelNotFound
from flintproxy.gate.billing import Billing, cost_nano, max_cost_nano
from flintproxy.gate.bounds import Bound
from flintproxy.gate.gate import Outcome
from flintproxy.money import NANO_PER_USD, format_usd
from flintproxy.store import postgres, sqlite
from flintproxy.store.db import Database, PgDatabase, SqliteDatabase
from flintproxy.store.ledger import Balances, UsageRow, UsageWriter
from tests.conftest import Gateway, MockServer, raw_config

MINI = ModelPrice(input_nano_per_mtok=usd_to_nano("0.15", "in"),
                  output_nano_per_mtok=usd_to_nano("0.60", "out"),
                  cached_input_nano_per_mtok=usd_to_nano("0.075", "cached"))
EMBED = ModelPrice(usd_to_nano("0.02", "x"), 0, usd_to_nano("0.02", "x"))
PRICES = {"gpt-4o-mini": MINI, "text-embedding-3-small": EMBED}
CFG = BillingConfig(default_max_tokens=1000, flush_interval_s=0.02, flush_batch_rows=100)


def exact_cost(price_usd: tuple[str, ...], prompt: int, completion: int,
               cached: int) -> Decimal:
    """Reference cost in nano-dollars with Decimal arithmetic (no floats anywhere)."""
    pin, pout, pcached = (Decimal(p) for p in price_usd)
    usd = ((prompt - cached) * pin + cached * pcached + completion * pout) / Decimal(1_000_000)
    return usd * NANO_PER_USD


# --- costs -----------------------------------------------------------------------------


def test_cost_known_values() -> None:
    # 800 uncached x 0.15 + 200 cached x 0.075 + 500 x 0.60, per million tokens.
    assert cost_nano(MINI, 1000, 500, 200) == 435_000
    assert cost_nano(MINI, 0, 0, 0) == 0
    # A single token at 0.15 USD/Mtok is 150 nano-dollars exactly.
    assert cost_nano(MINI, 1, 0, 0) == 150
    # 1 nano-dollar per million tokens: one token costs 1e-6 nano, rounded up to 1.
    tiny = ModelPrice(1, 1, 1)
    assert cost_nano(tiny, 1, 0, 0) == 1
    assert cost_nano(tiny, 1_000_000, 0, 0) == 1
    assert cost_nano(tiny, 1_000_001, 0, 0) == 2
    assert format_usd(cost_nano(MINI, 1000, 500, 200)) == "0.000435"
    assert format_usd(5 * NANO_PER_USD) == "5.00"
    assert format_usd(-150) == "-0.00000015"


def test_cost_matches_decimal_reference_and_rounds_up_once() -> None:
    rng = random.Random(4)
    for _ in range(3000):
        price_usd = tuple(f"{rng.randint(0, 80)}.{rng.randint(0, 999_999):06d}"
                          for _ in range(3))
        price = ModelPrice(usd_to_nano(price_usd[0], "a"), usd_to_nano(price_usd[1], "b"),
                           usd_to_nano(price_usd[2], "c"))
        prompt = rng.choice([0, 1, 7, rng.randint(0, 200_000), 10**12])
        cached = rng.randint(0, prompt)
        completion = rng.choice([0, 1, rng.randint(0, 100_000), 10**11])
        got = cost_nano(price, prompt, completion, cached)
        want = exact_cost(price_usd, prompt, completion, cached)
        assert isinstance(got, int)
        assert got == int(want.to_integral_value(rounding=ROUND_CEILING))
        assert 0 <= got - want < 1
        # The reservation's maximum bounds every outcome within the reserved counts.
        assert max_cost_nano(price, prompt, completion) >= got


def test_cost_clamps_nonsense_counts() -> None:
    assert cost_nano(MINI, 100, 0, 500) == cost_nano(MINI, 100, 0, 100)  # cached <= prompt
    assert cost_nano(MINI, -5, -5, -5) == 0
    # Cached above the input price (odd, but configurable): the maximum still covers it.
    odd = ModelPrice(10, 10, 1000)
    assert max_cost_nano(odd, 10**6, 0) >= cost_nano(odd, 10**6, 0, 10**6)


# --- reservations ----------------------------------------------------------------------


@pytest.fixture
async def db(store_db: Database) -> AsyncIterator[Database]:
    yield store_db


async def add_account(db: Database, credit_nano: int) -> int:
    return int(await db.fetchval(
        "INSERT INTO accounts (email, created_at, credited_nano, balance_nano) VALUES (?, 0, ?, ?) "
        "RETURNING id", f"u{random.random()}@x", credit_nano, credit_nano))


async def credit(db: Database, tmp_path: Path, account_id: int, amount: int) -> None:
    """What `flintproxy admin credit` does, from another connection (another process)."""
    other: Database
    if isinstance(db, PgDatabase):
        other = await postgres.open_database(db.dsn, 1)
    else:
        other = SqliteDatabase(await sqlite.connect(tmp_path / "flint.db"))
    try:
        async with other.transaction() as tx:
            await tx.execute("UPDATE accounts SET credited_nano = credited_nano + ?, "
                             "balance_nano = balance_nano + ? WHERE id = ?",
                             amount, amount, account_id)
            await tx.execute("INSERT INTO credits (account_id, amount_nano, created_at) "
                             "VALUES (?, ?, 0)", account_id, amount)
    finally:
        await other.close()


async def db_totals(db: Database, account_id: int) -> tuple[int, int, int]:
    row = await db.fetchrow("SELECT credited_nano, charged_nano, balance_nano FROM accounts "
                            "WHERE id = ?", account_id)
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def outcome(prompt: int, completion: int, cached: int = 0) -> Outcome:
    return Outcome(status=200, outcome="ok", prompt_tokens=prompt, completion_tokens=completion,
                   cached_tokens=cached)


def bound(prompt: int, max_tokens: int | None = None, choices: int = 1) -> Bound:
    """A measured request: ``prompt`` tokens at most, ``max_tokens`` per choice sent."""
    sent = ("max_tokens",) if max_tokens is not None else ()
    return Bound(prompt, 0, choices, max_tokens, max_tokens, sent)


def row_for(request_id: str, account_id: int, cost: int) -> UsageRow:
    return UsageRow(request_id, account_id, 1, "gpt-4o-mini", "local", 10, 20, 0, 0, 0, cost,
                    200, "ok", 1, sqlite.now_ms(), 5, 1)


async def test_200_concurrent_reservations_for_10(db: Database) -> None:
    billing = Billing(PRICES, CFG, Balances(db))
    one = max_cost_nano(MINI, 100, 1000)
    account = await add_account(db, 10 * one + one - 1)  # affords 10 in full, not 11

    async def attempt() -> int:
        if not billing.is_loaded(account):
            await billing.load(account)
        await asyncio.sleep(0)
        try:
            return billing.reserve(account, "gpt-4o-mini", bound(100, 1000)).max_tokens
        except InsufficientQuota as exc:
            assert exc.status == 402 and exc.code == "insufficient_quota"
            assert exc.payload()["error"]["type"] == "insufficient_quota"
            return 0

    results = await asyncio.gather(*(attempt() for _ in range(200)))
    # Ten get their 1000 tokens, one gets what is left (less), the rest 402.
    assert results.count(1000) == 10
    lowered = [r for r in results if 0 < r < 1000]
    assert len(lowered) == 1 and results.count(0) == 189
    balance, pending, reserved = billing.snapshot(account)
    assert (balance, pending) == (11 * one - 1, 0)
    assert reserved == 10 * one + max_cost_nano(MINI, 100, lowered[0]) <= balance
    assert 0 <= billing.available(account) < max_cost_nano(MINI, 100, 1)


async def test_settle_releases_and_charges_actual(db: Database) -> None:
    billing = Billing(PRICES, CFG, Balances(db))
    writer = UsageWriter(db, billing, CFG)
    account = await add_account(db, NANO_PER_USD)
    await billing.load(account)
    res = billing.reserve(account, "gpt-4o-mini", bound(100, 50))
    assert res.amount == max_cost_nano(MINI, 100, 50)
    assert (res.max_tokens, res.limit) == (50, None)  # the body already says 50
    cost = billing.settle(res, outcome(80, 40, cached=30))
    assert cost == cost_nano(MINI, 80, 40, 30)
    assert billing.settle(res, outcome(1, 1)) == cost  # idempotent
    writer.record(row_for("r1", account, cost))
    assert billing.snapshot(account) == (NANO_PER_USD, cost, 0)
    assert billing.available(account) == NANO_PER_USD - cost
    writer.start()
    assert await writer.sync(5)
    assert billing.snapshot(account) == (NANO_PER_USD - cost, 0, 0)
    assert await db_totals(db, account) == (NANO_PER_USD, cost, NANO_PER_USD - cost)
    await writer.drain(5)


async def test_release_and_default_ceiling(db: Database) -> None:
    billing = Billing(PRICES, CFG, Balances(db))
    account = await add_account(db, NANO_PER_USD)
    await billing.load(account)
    res = billing.reserve(account, "gpt-4o-mini", bound(10))
    assert res.amount == max_cost_nano(MINI, 10, CFG.default_max_tokens)
    assert res.limit == CFG.default_max_tokens  # absent: the body gets the default
    billing.release(res)
    billing.release(res)
    assert billing.available(account) == NANO_PER_USD
    emb = billing.reserve(account, "text-embedding-3-small", bound(1000, choices=0))
    assert emb.amount == 20_000  # 1000 tokens x 0.02 USD/Mtok, no completion ceiling
    assert (emb.max_tokens, emb.limit) == (0, None)


async def test_unpriced_model_is_refused_not_free(db: Database) -> None:
    billing = Billing(PRICES, CFG, Balances(db))
    account = await add_account(db, NANO_PER_USD)
    await billing.load(account)
    with pytest.raises(ModelNotFound) as info:
        billing.reserve(account, "gpt-unpriced", bound(1, 1))
    assert info.value.status == 404 and info.value.code == "model_not_found"
    with pytest.raises(RuntimeError):
        billing.reserve(account + 1, "gpt-4o-mini", bound(1, 1))  # never loaded


async def test_usage_above_the_reservation_is_charged_the_reservation_only(
        db: Database, caplog: pytest.LogCaptureFixture) -> None:
    billing = Billing(PRICES, CFG, Balances(db))
    writer = UsageWriter(db, billing, CFG)
    writer.start()
    account = await add_account(db, 1000)
    await billing.load(account)
    res = billing.reserve(account, "gpt-4o-mini", bound(1, 1))  # reserves 750
    assert res.amount == 750
    # An upstream that ignored the limit reports more: the reservation is the promise.
    cost = billing.settle(res, outcome(5, 10))
    assert cost == 750 < cost_nano(MINI, 5, 10, 0)
    assert billing.overruns == 1
    assert "usage above reservation for model gpt-4o-mini" in caplog.text
    writer.record(row_for("over", account, cost))
    assert billing.available(account) == 250
    assert await writer.sync(5)
    assert await db_totals(db, account) == (1000, 750, 250)  # never below zero
    await writer.drain(5)


async def test_a_limit_larger_than_the_balance_affords_is_lowered(
        db: Database) -> None:
    price = ModelPrice(0, usd_to_nano("1.00", "out"), 0)  # 1,000 nano a completion token
    billing = Billing({"m": price}, CFG, Balances(db))
    account = await add_account(db, 123_456)
    await billing.load(account)
    res = billing.reserve(account, "m", bound(10, 1000))
    assert (res.max_tokens, res.limit, res.amount) == (123, 123, 123_000)
    with pytest.raises(InsufficientQuota):
        billing.reserve(account, "m", bound(10, 1000))  # 456 nano: not one token
    billing.release(res)
    # Three choices share what the balance affords.
    res = billing.reserve(account, "m", bound(10, 1000, choices=3))
    assert (res.max_tokens, res.amount) == (41, 123_000)


async def test_the_models_max_output_tokens_caps_the_limit(db: Database) -> None:
    price = ModelPrice(0, usd_to_nano("1.00", "out"), 0, max_output_tokens=16)
    billing = Billing({"m": price}, CFG, Balances(db))
    account = await add_account(db, NANO_PER_USD)
    await billing.load(account)
    assert billing.reserve(account, "m", bound(10)).limit == 16  # default 1000 capped
    assert billing.reserve(account, "m", bound(10, 100)).limit == 16
    assert billing.reserve(account, "m", bound(10, 8)).limit is None  # already lower


async def test_concurrent_loads_share_one_read(db: Database) -> None:
    billing = Billing(PRICES, CFG, Balances(db))
    account = await add_account(db, 12345)
    reads = 0
    real = db.fetch

    def counting(*args: object, **kw: object) -> object:
        nonlocal reads
        reads += 1
        return real(*args, **kw)  # type: ignore[arg-type]

    db.fetch = counting  # type: ignore[method-assign,assignment]
    try:
        await asyncio.gather(*(billing.load(account) for _ in range(50)))
    finally:
        db.fetch = real  # type: ignore[method-assign]
    assert reads == 1
    assert billing.available(account) == 12345
    await billing.load(99999)  # no such account: nothing to spend
    assert billing.available(99999) == 0


async def test_credit_from_another_process_reloads_without_double_count(
        db: Database, tmp_path: Path) -> None:
    billing = Billing(PRICES, CFG, Balances(db))
    writer = UsageWriter(db, billing, CFG)
    writer.start()
    account = await add_account(db, 10_000_000)
    await billing.load(account)
    # Charges queued and being flushed while credits arrive and are reloaded.
    for round_ in range(20):
        for i in range(30):
            writer.record(row_for(f"c{round_}-{i}", account, 1000 + i))
        if round_ % 3 == 0:
            await credit(db, tmp_path, account, 1_000_000)
            billing.on_change("credit", account, None)
        await asyncio.sleep(0.005)
    assert await writer.sync(10)
    for _ in range(100):  # the last reload runs on the writer's task
        if not billing.has_stale():
            break
        await asyncio.sleep(0.01)
    credited, charged, balance = await db_totals(db, account)
    assert credited == 10_000_000 + 7 * 1_000_000
    assert charged == 20 * sum(1000 + i for i in range(30))
    assert balance == credited - charged
    assert billing.snapshot(account) == (balance, 0, 0)
    assert billing.available(account) == balance
    await writer.drain(5)


async def test_change_for_unknown_or_all_accounts(db: Database,
                                                  tmp_path: Path) -> None:
    billing = Billing(PRICES, CFG, Balances(db))
    a = await add_account(db, 100)
    b = await add_account(db, 200)
    await billing.load(a)
    await billing.load(b)
    billing.on_change("credit", 424242, None)  # not loaded here: nothing to do
    assert not billing.has_stale()
    await credit(db, tmp_path, a, 5)
    await credit(db, tmp_path, b, 7)
    billing.on_change("resync", None, None)
    assert billing.has_stale()
    await billing.reload_stale()
    assert (billing.available(a), billing.available(b)) == (105, 207)


# --- end to end: the real server, the openai SDK -----------------------------------------


async def test_200_concurrent_streams_for_an_account_that_affords_10_in_full(
        tmp_path: Path, mock_upstream: MockServer, storage: dict[str, Any],
        gateway_factory: Callable[..., Awaitable[Gateway]]) -> None:
    raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
    raw["storage"] = storage  # each engine
    # On PostgreSQL the requests short of the node's lease wait (bounded) for one
    # top-up, holding their concurrency slots meanwhile: with the default 64 some
    # would be 429s. Money, not concurrency, is what this test counts.
    raw.setdefault("limits", {})["default_max_concurrent"] = 1000
    # Prompt tokens free, completions 1 USD/Mtok (1000 nano a token): a stream of the
    # mock's 20 tokens with max_tokens=20 costs exactly what it reserves, 20,000 nano.
    raw["models"]["gpt-4o-mini"] = {"input_usd_per_mtok": "0", "output_usd_per_mtok": "1.00"}
    one = 20 * 1000
    gw = await gateway_factory(raw, credit_nano=10 * one + one - 1)
    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0)

    async def stream() -> str:
        try:
            chunks = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                stream=True, max_tokens=20, extra_headers={"x-mock-delay-ms": "5"})
            finish = []
            text = ""
            async for c in chunks:
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    finish.append(c.choices[0].finish_reason)
            assert text.startswith("tok0 ")
            return f"{len(text.split())} {finish[-1]}"
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
            body = exc.body
            assert isinstance(body, dict) and body.get("code") == "insufficient_quota"
            return "402"

    async with client:
        results = await asyncio.gather(*(stream() for _ in range(200)))
    # Ten in full; the eleventh is held to the 19 tokens the rest of the balance buys.
    assert results.count("20 stop") == 10 and results.count("402") == 189
    assert results.count("19 length") == 1
    assert await gw.components.usage.sync(10)
    db = gw.components.usage_db
    credited, charged, balance = await db_totals(db, gw.account_id)
    assert (credited, charged, balance) == (10 * one + one - 1, 10 * one + 19_000, 999)
    rows = [tuple(r) for r in await db.fetch(
        "SELECT cost_nano, stream, outcome, completion_tokens FROM usage WHERE account_id = ?",
        gw.account_id)]
    # Streams are billed, never zero.
    assert sorted(rows) == [(19_000, 1, "ok", 19)] + [(one, 1, "ok", 20)] * 10
    assert gw.components.billing.available(gw.account_id) == 999


async def test_a_held_debit_stays_out_of_reach_until_a_re_read_after_its_commit_applies_it(
        db: Database) -> None:
    billing = Billing(PRICES, CFG, Balances(db))
    account = await add_account(db, 10 * NANO_PER_USD)
    assert await billing.hold(account, 4 * NANO_PER_USD)
    assert not await billing.hold(account, 7 * NANO_PER_USD)  # 6 left
    assert billing.snapshot(account) == (10 * NANO_PER_USD, 0, 4 * NANO_PER_USD)
    # A re-read that ran before the debit committed sees the old balance: the hold stays.
    billing.on_change("credit", account, None)
    await billing.reload_stale()
    assert billing.available(account) == 6 * NANO_PER_USD
    await db.execute("UPDATE accounts SET credited_nano = credited_nano - ?, "
                     "balance_nano = balance_nano - ? WHERE id = ?",
                     4 * NANO_PER_USD, 4 * NANO_PER_USD, account)
    billing.debited(account, 4 * NANO_PER_USD)
    assert billing.available(account) == 6 * NANO_PER_USD  # not 10 while not re-read
    assert billing.has_stale()
    await billing.reload_stale()
    assert billing.snapshot(account) == (6 * NANO_PER_USD, 0, 0)
    # A debit that failed gives its hold back at once.
    assert await billing.hold(account, 6 * NANO_PER_USD)
    billing.unhold(account, 6 * NANO_PER_USD)
    assert billing.available(account) == 6 * NANO_PER_USD
