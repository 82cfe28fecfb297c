"""The accounts repository on both engines (a real SQLite file, a real PostgreSQL):
validation, privacy, money."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flintproxy.config import build_config
from flintproxy.errors import AuthenticationError, BadRequest, Conflict, NotFound, PermissionDenied
from flintproxy.money import format_usd
from flintproxy.store import accounts as acc
from flintproxy.store.accounts import Accounts, bootstrap_demo, hash_key
from flintproxy.store.db import Database
from tests.conftest import raw_config

PASSWORD = "correct horse battery"


@pytest.fixture
async def db(store_db: Database) -> AsyncIterator[Database]:
    yield store_db


@pytest.fixture
def repo(db: Database) -> Accounts:
    return Accounts(db, bcrypt_cost=4, session_ttl_s=3600)


async def scalar(db: Database, sql: str, *args: object) -> object:
    return await db.fetchval(sql, *args)


# --- validation -------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("  Alice@Example.COM ", "alice@example.com"),
    ("a.b+tag@sub.example.org", "a.b+tag@sub.example.org"),
    ("demo@flintproxy.local", "demo@flintproxy.local"),
])
def test_normalize_email_ok(raw: str, expected: str) -> None:
    assert acc.normalize_email(raw) == expected


@pytest.mark.parametrize("raw", [
    None, 5, "", "   ", "no-at-sign", "a@b", "a@@b.com", "a@b..com", "a b@c.com",
    "x@" + "a" * 250 + ".com", "a" * 65 + "@example.com", "é@example.com",
    "a@exa\u200bmple.com", "'; DROP TABLE accounts; --@x.com", "a@b.com\x00",
    "a@-bad.com", ".a@b.com",
])
def test_normalize_email_rejects(raw: object) -> None:
    with pytest.raises(BadRequest):
        acc.normalize_email(raw)


def test_password_rules() -> None:
    assert acc.new_password("a" * 10) == b"a" * 10
    assert acc.new_password("é" * 36) == "é".encode() * 36  # 72 bytes exactly
    with pytest.raises(BadRequest, match="at least 10"):
        acc.new_password("short")
    with pytest.raises(BadRequest, match=r"73 bytes.*maximum is 72") as info:
        acc.new_password("a" * 73)
    assert info.value.code == "password_too_long"
    with pytest.raises(BadRequest, match="74 bytes"):  # 37 two-byte characters
        acc.new_password("é" * 37)
    with pytest.raises(BadRequest, match="NUL"):
        acc.new_password("abcdefghij\x00k")
    for bad in (None, 12345678901, ["x" * 12]):
        with pytest.raises(BadRequest, match="required"):
            acc.new_password(bad)
    # Composed and decomposed forms of the same password are the same password.
    assert acc.given_password("caf\u00e9") == acc.given_password("cafe\u0301")


def test_key_name_and_models() -> None:
    assert acc.key_name("  ci key ") == "ci key"
    assert acc.key_name(None) == ""
    for bad in ("x" * 65, "a\x07b", "a\u202eb", 3):
        with pytest.raises(BadRequest):
            acc.key_name(bad)
    assert acc.model_list(None, ["m"]) is None
    assert acc.model_list(["b", "a", "a"], ["a", "b"]) == ("a", "b")
    for bad_models in ([], ["zzz"], "a", [1]):
        with pytest.raises(BadRequest):
            acc.model_list(bad_models, ["a"])


def test_money_helpers() -> None:
    assert format_usd(5_000_000_000) == "5.00"
    assert format_usd(150) == "0.00000015"
    assert format_usd(0) == "0.00"
    assert acc.parse_usd("5.00") == 5_000_000_000
    assert acc.parse_usd("0.000000001") == 1
    for bad in ("0", "-1", "abc", "1e400", "0.0000000001", "nan"):
        with pytest.raises(BadRequest):
            acc.parse_usd(bad)


def test_api_key_format() -> None:
    keys = {acc.new_api_key() for _ in range(100)}
    assert len(keys) == 100
    for k in keys:
        assert acc.KEY_RE.fullmatch(k)
        assert k.startswith("sk-flint-") and len(k) == len("sk-flint-") + 40


# --- repository -------------------------------------------------------------------


async def test_signup_login_and_duplicate(repo: Accounts, db: Database) -> None:
    aid = await repo.create_account("a@example.com", acc.new_password(PASSWORD))
    assert await repo.verify_login("a@example.com", acc.given_password(PASSWORD)) == aid
    with pytest.raises(Conflict) as info:
        await repo.create_account("a@example.com", acc.new_password(PASSWORD))
    assert info.value.status == 409
    for email, pw in (("a@example.com", "wrong password!"), ("nobody@example.com", PASSWORD)):
        with pytest.raises(AuthenticationError) as err:
            await repo.verify_login(email, acc.given_password(pw))
        assert err.value.message == "Incorrect email or password."
        assert err.value.code == "invalid_credentials"
    stored = await scalar(db, "SELECT password_hash FROM accounts WHERE id = ?", aid)
    assert isinstance(stored, str) and stored.startswith("$2b$04$")


async def test_default_cost_is_12(db: Database) -> None:
    repo = Accounts(db, bcrypt_cost=12, session_ttl_s=60)
    aid = await repo.create_account("c@example.com", acc.new_password(PASSWORD))
    stored = await scalar(db, "SELECT password_hash FROM accounts WHERE id = ?", aid)
    assert isinstance(stored, str) and stored.startswith("$2b$12$")
    cfg = build_config(raw_config(Path("/tmp"), {"u": "http://127.0.0.1:1/v1"}) | {"accounts": {}},
                       {})
    assert cfg.accounts.bcrypt_cost == 12


async def test_credit_keeps_balance_invariant(repo: Accounts, db: Database) -> None:
    aid = await repo.create_account("m@example.com", None)
    assert await repo.credit(aid, 5_000_000_000) == 5_000_000_000
    assert await repo.credit(aid, 250_000_000) == 5_250_000_000
    info = await repo.get(aid)
    assert (info.credited_nano, info.charged_nano, info.balance_nano) == \
        (5_250_000_000, 0, 5_250_000_000)
    assert await scalar(db, "SELECT COUNT(*) FROM credits WHERE account_id = ?", aid) == 2
    assert await scalar(db, "SELECT COUNT(*) FROM events WHERE kind = 'credit'") == 2
    with pytest.raises(BadRequest):
        await repo.credit(aid, 0)
    with pytest.raises(NotFound):
        await repo.credit(999, 1)


async def test_events_and_notify(db: Database) -> None:
    seen: list[tuple[int, str, int | None, int | None]] = []
    repo = Accounts(db, 4, 60, notify=lambda *ev: seen.append(ev))
    aid = await repo.create_account("e@example.com", None)
    info, _ = await repo.create_key(aid)
    await repo.revoke_key(info.id)
    assert await repo.set_status(aid, "disabled")
    assert not await repo.set_status(aid, "disabled")  # no change, no event
    assert await repo.set_status(aid, "active")
    await repo.delete_account(aid)
    kinds = [(k, a, key) for _, k, a, key in seen]
    assert kinds == [("account_created", aid, None), ("key_created", aid, info.id),
                     ("key_revoked", aid, info.id), ("account_disabled", aid, None),
                     ("account_enabled", aid, None), ("account_deleted", aid, None)]
    rows = await db.fetch("SELECT id, kind FROM events ORDER BY id")
    assert [(r[0], r[1]) for r in rows] == [(ev[0], ev[1]) for ev in seen]


async def test_keys_stored_hashed(repo: Accounts, db: Database) -> None:
    aid = await repo.create_account("k@example.com", None)
    info, key = await repo.create_key(aid, "ci", allowed_models=("gpt-4o-mini",))
    assert info.prefix == key[:13] and info.last4 == key[-4:]
    row = await db.fetchrow("SELECT key_hash, prefix, last4, name, allowed_models FROM api_keys")
    assert row is not None
    assert row[0] == hash_key(key) and len(row[0]) == 32
    assert tuple(row[1:4]) == (info.prefix, info.last4, "ci")
    listed = await repo.list_keys(aid)
    assert [k.allowed_models for k in listed] == [("gpt-4o-mini",)]
    assert "key" not in listed[0].as_json()
    other = await repo.create_account("o@example.com", None)
    with pytest.raises(NotFound):
        await repo.revoke_key(info.id, other)  # not theirs
    assert await repo.revoke_key(info.id, aid)
    assert not await repo.revoke_key(info.id, aid)
    with pytest.raises(NotFound):
        await repo.revoke_key(12345)


async def test_disabled_account_cannot_create_keys(repo: Accounts) -> None:
    aid = await repo.create_account("d@example.com", None)
    await repo.set_status(aid, "disabled")
    with pytest.raises(PermissionDenied):
        await repo.create_key(aid)


async def test_delete_account_erases_personal_data(repo: Accounts,
                                                   db: Database) -> None:
    aid = await repo.create_account("gone@example.com", acc.new_password(PASSWORD))
    await repo.create_key(aid, "my personal laptop")
    await repo.create_key(aid)
    await repo.create_session(aid)
    await db.execute("INSERT INTO usage (request_id, account_id, key_id, model, prompt_tokens, "
                     "completion_tokens, cost_nano, status, outcome, stream, started_at, "
                     "duration_ms) VALUES ('r1', ?, 1, 'gpt-4o-mini', 1, 1, 1, 200, 'ok', 0, "
                     "0, 1)", aid)
    await repo.delete_account(aid)
    row = await db.fetchrow("SELECT email, password_hash, status, deleted_at FROM accounts")
    assert row is not None and tuple(row[:3]) == (None, None, "deleted") and row[3] is not None
    assert await scalar(db, "SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL") == 0
    assert await scalar(db, "SELECT COUNT(*) FROM api_keys WHERE name != ''") == 0
    assert await scalar(db, "SELECT COUNT(*) FROM sessions") == 0
    assert await scalar(db, "SELECT COUNT(*) FROM usage") == 1  # kept for retention
    with pytest.raises(NotFound):
        await repo.delete_account(aid)
    # The email is free again.
    assert await repo.create_account("gone@example.com", None) != aid


async def test_sessions(db: Database) -> None:
    now = [1_000_000]
    repo = Accounts(db, 4, 60, clock=lambda: now[0])
    aid = await repo.create_account("s@example.com", acc.new_password(PASSWORD))
    token, session = await repo.create_session(aid)
    assert len(token) >= 43  # 32 bytes urlsafe-base64: 256 bits
    assert await scalar(db, "SELECT COUNT(*) FROM sessions WHERE token_hash = ?",
                        acc.session_hash(token)) == 1
    got = await repo.get_session(token)
    assert got is not None and got.account_id == aid and got.csrf_token == session.csrf_token
    assert await repo.get_session(token + "x") is None
    assert await repo.get_session("short") is None
    other_token, other = await repo.create_session(aid)
    await repo.set_password(aid, acc.new_password("another password"), other.token_hash)
    assert await repo.get_session(token) is None  # revoked by the password change
    assert await repo.get_session(other_token) is not None  # the current one stays
    now[0] += 61_000
    assert await repo.get_session(other_token) is None  # expired, and deleted
    assert await scalar(db, "SELECT COUNT(*) FROM sessions") == 0
    await repo.create_session(aid)
    now[0] += 61_000
    assert await repo.purge_expired_sessions() == 1


async def test_check_password_of(repo: Accounts) -> None:
    aid = await repo.create_account("p@example.com", acc.new_password(PASSWORD))
    await repo.check_password_of(aid, acc.given_password(PASSWORD))
    with pytest.raises(AuthenticationError):
        await repo.check_password_of(aid, acc.given_password("not the password"))
    nopw = await repo.create_account("n@example.com", None)
    with pytest.raises(AuthenticationError):
        await repo.check_password_of(nopw, acc.given_password(PASSWORD))


async def test_change_email(repo: Accounts) -> None:
    a = await repo.create_account("one@example.com", None)
    await repo.create_account("two@example.com", None)
    await repo.change_email(a, "uno@example.com")
    assert (await repo.get(a)).email == "uno@example.com"
    with pytest.raises(Conflict):
        await repo.change_email(a, "two@example.com")


async def test_transaction_rolls_back(repo: Accounts, db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with repo.transaction() as conn:
            await conn.execute("INSERT INTO accounts (email, created_at) VALUES ('x@y.zz', 0)")
            raise RuntimeError("boom")
    assert await scalar(db, "SELECT COUNT(*) FROM accounts") == 0
    async with repo.transaction():
        pass  # and the connection is usable again


async def test_bootstrap_demo(tmp_path: Path, db: Database) -> None:
    raw = raw_config(tmp_path, {"u": "http://127.0.0.1:1/v1"})
    assert await bootstrap_demo(db, build_config(raw, {})) is None  # off by default
    raw["accounts"] = {"bcrypt_cost": 4, "bootstrap_demo": True, "demo_credit_usd": "2.50"}
    cfg = build_config(raw, {})
    key = await bootstrap_demo(db, cfg)
    assert key is not None and acc.KEY_RE.fullmatch(key)
    repo = Accounts(db, 4, 60)
    demo = await repo.by_email("demo@flintproxy.local")
    assert demo.balance_nano == 2_500_000_000
    assert [k.name for k in await repo.list_keys(demo.id)] == ["demo"]
    assert await bootstrap_demo(db, cfg) is None  # only once
    assert await scalar(db, "SELECT password_hash FROM accounts WHERE id = ?", demo.id) is None


async def test_caps_on_keys_and_sessions(repo: Accounts, db: Database) -> None:
    aid = await repo.create_account("cap@example.com", None)
    for _ in range(acc.MAX_LIVE_KEYS):
        info, _ = await repo.create_key(aid)
    with pytest.raises(Conflict, match="at most"):
        await repo.create_key(aid)
    await repo.revoke_key(info.id)
    await repo.create_key(aid)  # room again
    tokens = [(await repo.create_session(aid))[0] for _ in range(acc.MAX_SESSIONS + 3)]
    assert await scalar(db, "SELECT COUNT(*) FROM sessions") == acc.MAX_SESSIONS
    assert await repo.get_session(tokens[-1]) is not None
