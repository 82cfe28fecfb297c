"""Spend caps per key, end to end: exact under concurrency, the binding cap named in a
402, max_tokens lowered to fit, UTC midnight, and setting caps (console API, admin CLI)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from flintproxy.config import BillingConfig, ModelPrice
from flintproxy.errors import SpendCapReached
from flintproxy.gate.billing import Billing
from flintproxy.gate.bounds import Bound
from flintproxy.gate.gate import Ending, Outcome
from flintproxy.store import caps
from flintproxy.store.ledger import Balances, UsageRow, UsageWriter, open_writer_db
from tests.conftest import Gateway, MockServer, migrated_dsn, raw_config
from tests.support import to_toml
from tests.web.test_api import Browser

ONE = 20 * 1000  # the mock's 20 completion tokens at 1 USD/Mtok (prompts free)
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
Factory = Callable[..., Awaitable[Gateway]]


def priced(raw: dict[str, Any]) -> dict[str, Any]:
    raw["models"]["gpt-4o-mini"] = {"input_usd_per_mtok": "0", "output_usd_per_mtok": "1.00"}
    raw.setdefault("limits", {})["default_max_concurrent"] = 1000
    return raw


async def key_id_of(gw: Gateway) -> int:
    keys = await gw.components.accounts.list_keys(gw.account_id)
    return keys[0].id


async def set_caps(gw: Gateway, key_id: int, **limits: int | None) -> None:
    await gw.components.accounts.set_key_caps(key_id, None, limits)


async def spend_rows(gw: Gateway, key_id: int) -> dict[str, int]:
    rows = await gw.components.usage_db.fetch(
        "SELECT period, spent_nano FROM key_spend WHERE key_id = ?", key_id)
    return {str(r[0]): int(r[1]) for r in rows}


async def usage_total(gw: Gateway, key_id: int) -> int:
    return int(await gw.components.usage_db.fetchval(
        "SELECT COALESCE(SUM(cost_nano), 0) FROM usage WHERE key_id = ?", key_id))


async def one_call(client: openai.AsyncOpenAI, stream: bool, max_tokens: int = 20) -> str:
    """'<tokens> <finish_reason>' of one request, or '402 <code>: <message>'."""
    try:
        if stream:
            chunks = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=max_tokens,
                extra_headers={"x-mock-delay-ms": "2"})
            text, finish = "", None
            async for c in chunks:
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    finish = c.choices[0].finish_reason or finish
            return f"{len(text.split())} {finish}"
        resp = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                    max_tokens=max_tokens)
        content = resp.choices[0].message.content or ""
        return f"{len(content.split())} {resp.choices[0].finish_reason}"
    except openai.APIStatusError as exc:
        assert exc.status_code == 402, exc
        body = exc.body
        assert isinstance(body, dict)
        return f"402 {body.get('code')}: {body.get('message')}"


@pytest.mark.timeout(120)
async def test_a_day_capped_key_under_64_concurrent_requests_is_charged_exactly_to_its_cap(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Factory) -> None:
    gw = await gateway_factory(priced(raw_config(tmp_path, {"local": mock_upstream.base_url})),
                               credit_nano=10**9)
    key_id = await key_id_of(gw)
    cap = 10 * ONE + ONE - 1  # ten in full, the eleventh held to 19 tokens
    await set_caps(gw, key_id, day=cap)
    client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0)
    async with client:
        results = await asyncio.gather(*(one_call(client, i % 2 == 0) for i in range(64)))
    refused = [r for r in results if r.startswith("402")]
    assert results.count("20 stop") == 10 and results.count("19 length") == 1, results
    assert len(refused) == 53
    assert all(r.startswith("402 spend_cap_reached: This API key's daily spend cap of "
                            "$0.000219999 is reached") for r in refused), refused[0]
    assert "resets at 00:00 UTC" in refused[0]
    assert await gw.components.usage.sync(10)
    charged = 10 * ONE + 19_000
    day, month = caps.periods(caps.DAY_MS * (await _now_day(gw)))
    assert await usage_total(gw, key_id) == charged
    assert await spend_rows(gw, key_id) == {day: charged, month: charged}
    # The account was charged exactly that, and nothing more.
    row = await gw.components.usage_db.fetchrow(
        "SELECT credited_nano, charged_nano, balance_nano FROM accounts WHERE id = ?",
        gw.account_id)
    assert row is not None and tuple(row) == (10**9, charged, 10**9 - charged)
    # Another key of the same account is not capped by it.
    _, other = await gw.components.accounts.create_key(gw.account_id, "other")
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=other, max_retries=0) as c2:
        assert await one_call(c2, False) == "20 stop"
    # Raising the cap lets the key spend again, up to the new cap.
    await set_caps(gw, key_id, day=cap + ONE)
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0) as c3:
        for _ in range(50):  # the key cache hears the change event within a second
            result = await one_call(c3, False)
            if not result.startswith("402"):
                break
            await asyncio.sleep(0.02)
        assert result == "20 stop"


async def _now_day(gw: Gateway) -> int:
    started = await gw.components.usage_db.fetchval("SELECT MAX(started_at) FROM usage")
    return int(started) // caps.DAY_MS


async def test_the_tightest_cap_binds_lowers_max_tokens_and_is_named(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Factory) -> None:
    gw = await gateway_factory(priced(raw_config(tmp_path, {"local": mock_upstream.base_url})),
                               credit_nano=10**9)
    key_id = await key_id_of(gw)
    # The month cap binds (15 tokens' worth), the day cap does not.
    await set_caps(gw, key_id, day=10**9, month=15_000)
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0) as c:
        assert await one_call(c, False) == "15 length"
        assert mock_upstream.stats.last_body["max_tokens"] == 15
        refused = await one_call(c, True)
    assert refused.startswith("402 spend_cap_reached: This API key's monthly spend cap of "
                              "$0.000015 is reached: $0.000015 is spent or reserved this month")
    assert "resets on the 1st at 00:00 UTC" in refused
    # And the other way round, on a second key: the day cap binds.
    info, key2 = await gw.components.accounts.create_key(gw.account_id, "daily")
    await set_caps(gw, info.id, day=7_000, month=10**9)
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=key2, max_retries=0) as c:
        assert await one_call(c, True) == "7 length"
        assert mock_upstream.stats.last_body["max_tokens"] == 7
        assert (await one_call(c, False)).startswith(
            "402 spend_cap_reached: This API key's daily spend cap of $0.000007 is reached")
    # The Anthropic route answers in Anthropic's shape, naming the cap all the same.
    async with aiohttp.ClientSession() as http, http.post(
            gw.base_url + "/messages", headers={"x-api-key": key2},
            json={"model": "gpt-4o-mini", "max_tokens": 20, "messages": MESSAGES}) as resp:
        assert resp.status == 402
        body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "billing_error"
    assert "daily spend cap of $0.000007 is reached" in body["error"]["message"]
    # A balance tighter than every cap still says insufficient_quota.
    repo = gw.components.accounts
    poor = await repo.create_account("poor@example.com", None)
    await repo.credit(poor, 100)
    _, key3 = await repo.create_key(poor, "rich cap", caps=(10**12, None))
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=key3, max_retries=0) as c:
        assert (await one_call(c, False)).startswith("402 insufficient_quota")


MIDNIGHT = 1_798_761_599_999  # 2026-12-31T23:59:59.999Z, the last ms of a day and a month


async def test_a_new_utc_day_starts_a_new_day_book_and_the_month_book_carries_on(
        tmp_path: Path) -> None:
    assert caps.periods(MIDNIGHT) == ("d2026-12-31", "m2026-12")
    db = await open_writer_db(tmp_path / "midnight.db")
    price = ModelPrice(0, 1_000_000_000, 0)  # 1000 nano per completion token
    cfg = BillingConfig(default_max_tokens=20, flush_interval_s=0.02)
    billing = Billing({"m": price}, cfg, Balances(db))
    writer = UsageWriter(db, billing, cfg)
    writer.start()
    try:
        account = int(await db.fetchval(
            "INSERT INTO accounts (email, created_at, credited_nano, balance_nano) "
            "VALUES ('m@x', 0, 1000000000, 1000000000) RETURNING id"))
        await billing.load(account)
        bound = Bound(0, 0, 1, 20, 20, ("max_tokens",))
        limits = (ONE, None)  # a day cap of one request

        async def request(started: int) -> int:
            books = billing.caps.books(5, limits, started)
            if books is None:
                await billing.caps.load(5, limits, started)
                books = billing.caps.books(5, limits, started)
            assert books is not None
            res = billing.reserve(account, "m", bound, books)
            cost = billing.settle(res, Outcome(200, Ending.OK, completion_tokens=res.max_tokens))
            writer.record(UsageRow(f"r{started}", account, 5, "m", "up", 0, res.max_tokens, 0,
                                   0, 0, cost, 200, "ok", 0, started, 1, None))
            return res.max_tokens

        assert await request(MIDNIGHT - 5) == 20
        with pytest.raises(SpendCapReached, match=r"daily spend cap of \$0\.00002 is reached"):
            await request(MIDNIGHT)  # the same day, even an instant before midnight
        assert await request(MIDNIGHT + 1) == 20  # the first ms of the next day: a new book
        with pytest.raises(SpendCapReached):
            await request(MIDNIGHT + 2)
        assert await writer.sync(10)
        spent = {str(r[0]): int(r[1]) for r in await db.fetch(
            "SELECT period, spent_nano FROM key_spend WHERE key_id = 5")}
        assert spent == {"d2026-12-31": ONE, "m2026-12": ONE, "d2027-01-01": ONE,
                         "m2027-01": ONE}
        # A month cap counts every day of its month: December has half a request left.
        limits = (None, ONE + ONE // 2)
        assert await request(MIDNIGHT - caps.DAY_MS) == 10
        with pytest.raises(SpendCapReached, match="monthly spend cap"):
            await request(MIDNIGHT - 2 * caps.DAY_MS)
        assert await request(MIDNIGHT + 3) == 10  # January: its own book, one request in it
        assert await writer.sync(10)
        # Past periods' books are forgotten once nothing is reserved or pending in them.
        billing.caps.drop_past(MIDNIGHT + 1)
        assert {b.period for b in billing.caps.held(5)} == {"d2027-01-01", "m2027-01"}
    finally:
        await writer.drain(5)
        await db.close()


# --- setting caps -------------------------------------------------------------------------


async def test_caps_are_set_listed_and_cleared_through_the_console_api(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Factory) -> None:
    gw = await gateway_factory(priced(raw_config(tmp_path, {"local": mock_upstream.base_url})))
    b = Browser(gw)
    try:
        await b.signup("caps@example.com")
        status, created, _ = await b.call("POST", "/api/keys", {
            "name": "capped", "spend_cap_day_usd": "0.00004", "spend_cap_month_usd": 1})
        assert status == 201, created
        assert (created["spend_cap_day_usd"], created["spend_cap_month_usd"]) == ("0.00004",
                                                                                  "1.00")
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=created["key"],
                                      max_retries=0) as c:
            assert await one_call(c, False) == "20 stop"
            assert await one_call(c, False) == "20 stop"
            assert (await one_call(c, False)).startswith("402 spend_cap_reached")
        assert await gw.components.usage.sync(10)
        status, listed, _ = await b.call("GET", "/api/keys")
        mine = next(k for k in listed["data"] if k["id"] == created["id"])
        assert (mine["spent_today_usd"], mine["spent_this_month_usd"]) == ("0.00004", "0.00004")
        # Erasing the usage rows (the holder's right) does not reset the cap.
        status, erased, _ = await b.call("DELETE", "/api/usage")
        assert status == 200 and erased["deleted"] == 2
        status, listed, _ = await b.call("GET", "/api/keys")
        mine = next(k for k in listed["data"] if k["id"] == created["id"])
        assert mine["spent_today_usd"] == "0.00004"
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=created["key"],
                                      max_retries=0) as c:
            assert (await one_call(c, False)).startswith("402 spend_cap_reached")
        path = f"/api/keys/{created['id']}"
        for bad in (-1, "NaN", "1e400", "abc", "0.0000000001", True, [1], 10**12):
            status, err, _ = await b.call("PATCH", path, {"spend_cap_day_usd": bad})
            assert status == 400 and err["error"]["param"] == "spend_cap_day_usd", (bad, err)
        status, err, _ = await b.call("PATCH", path, {"spend_cap_weekly_usd": "1"})
        assert status == 400
        events = await gw.components.accounts.db.fetchval("SELECT COUNT(*) FROM events")
        status, err, _ = await b.call("PATCH", path, {})  # changes nothing: says so
        assert status == 400 and "spend_cap_day_usd" in err["error"]["message"], err
        assert await gw.components.accounts.db.fetchval("SELECT COUNT(*) FROM events") \
            == events  # and announces nothing to the nodes
        status, err, _ = await b.call("PATCH", "/api/keys/999999", {"spend_cap_day_usd": "1"})
        assert status == 404
        status, patched, _ = await b.call("PATCH", path, {"spend_cap_day_usd": None})
        assert status == 200 and patched["spend_cap_day_usd"] is None
        assert patched["spend_cap_month_usd"] == "1.00"  # left out: unchanged
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=created["key"],
                                      max_retries=0) as c:
            for _ in range(50):  # the key cache hears the change within a second
                result = await one_call(c, False)
                if result == "20 stop":
                    break
                await asyncio.sleep(0.02)
            assert result == "20 stop"
    finally:
        await b.http.close()


async def test_admin_set_key_cap_is_audited_and_reaches_the_running_server(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Factory) -> None:
    raw = priced(raw_config(tmp_path, {"local": mock_upstream.base_url}))
    config_path = tmp_path / "flintproxy.toml"
    config_path.write_text(to_toml(raw))
    gw = await gateway_factory(raw, credit_nano=10**9)
    key_id = await key_id_of(gw)
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0) as c:
        assert await one_call(c, False) == "20 stop"

        async def admin(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "flintproxy", "admin", "--config", str(config_path),
                *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        code, _, err = await admin("set-key-cap", str(key_id), "--day-usd", "-5")
        assert code != 0 and "--day-usd" in err
        code, out, _ = await admin("set-key-cap", str(key_id), "--day-usd", "0.00003",
                                   "--note", "runaway script")
        assert code == 0 and "day=0.00003 USD" in out, out
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while (await one_call(c, False)) == "20 stop":
            assert loop.time() - t0 < 1.0, "the cap did not apply within one second"
            await asyncio.sleep(0.02)
        assert (await one_call(c, False)).startswith("402 spend_cap_reached")
    email = (await gw.components.accounts.get(gw.account_id)).email
    assert email is not None
    code, out, _ = await admin("list-keys", email)
    assert code == 0 and "0.00003" in out
    audit = await gw.components.usage_db.fetch(
        "SELECT action, target_key_id, note FROM audit WHERE action = 'set_key_caps'")
    assert [tuple(r) for r in audit] == [("set_key_caps", key_id,
                                          "day=$0.00003; runaway script")]


async def test_shared_mode_keeps_each_keys_spend_and_enforces_a_cap_set_while_it_serves(
        tmp_path: Path, mock_upstream: MockServer, gateway_factory: Factory,
        request: pytest.FixtureRequest) -> None:
    raw = priced(raw_config(tmp_path, {"local": mock_upstream.base_url}))
    raw["storage"] = {"backend": "postgresql", "dsn": await migrated_dsn(request)}
    gw = await gateway_factory(raw, credit_nano=10**9)
    key_id = await key_id_of(gw)
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=gw.key, max_retries=0) as c:
        assert await one_call(c, True) == "20 stop"
        assert await gw.components.usage.sync(10)
        day, month = caps.periods(caps.DAY_MS * await _now_day(gw))
        assert await spend_rows(gw, key_id) == {day: ONE, month: ONE}  # the lease path
        await set_caps(gw, key_id, day=3 * ONE)  # two more requests' worth
        results = [await one_call(c, i % 2 == 0) for i in range(4)]
    assert results[:2] == ["20 stop", "20 stop"], results
    assert all(r.startswith("402 spend_cap_reached: This API key's daily spend cap of "
                            "$0.00006 is reached") for r in results[2:]), results
    assert await gw.components.usage.sync(10)
    assert await usage_total(gw, key_id) == (await spend_rows(gw, key_id))[day] == 3 * ONE
