"""End-to-end: /api/ with a cookie-jar client, /v1 with the openai SDK, on the real server."""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from flintproxy.app.runner import Server as GatewayServer
from flintproxy.config import build_config
from tests.conftest import Gateway, MockServer, raw_config

PASSWORD = "correct horse battery"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
StartGateway = Callable[..., Awaitable[Gateway]]


class Browser:
    """A user agent: cookie jar plus the CSRF token a page script would echo."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf: str | None = None

    async def call(self, method: str, path: str, body: object = None, *,
                   csrf: bool = True, headers: Mapping[str, str] | None = None
                   ) -> tuple[int, Any, aiohttp.ClientResponse]:
        hdrs = dict(headers or {})
        if csrf and self.csrf:
            hdrs["X-CSRF-Token"] = self.csrf
        data = None if body is None else orjson.dumps(body)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.gw.console_url + path, data=data,
                                     headers=hdrs) as resp:
            raw = await resp.read()
            payload = orjson.loads(raw) if raw else None
            if isinstance(payload, dict) and "csrf_token" in payload:
                self.csrf = payload["csrf_token"]
            return resp.status, payload, resp

    async def signup(self, email: str, password: str = PASSWORD) -> Any:
        status, body, _ = await self.call("POST", "/api/signup",
                                          {"email": email, "password": password})
        assert status == 201, body
        # Funds, as an operator's `flintproxy admin credit` would add: /v1 bills.
        await self.gw.components.accounts.credit(body["account"]["id"], 10**9)
        return body

    async def login(self, email: str, password: str = PASSWORD) -> int:
        status, _, _ = await self.call("POST", "/api/login",
                                       {"email": email, "password": password})
        return status

    async def new_key(self, **fields: object) -> tuple[int, str]:
        status, body, _ = await self.call("POST", "/api/keys", fields)
        assert status == 201, body
        return body["id"], body["key"]

    def cookie(self, name: str) -> str | None:
        for c in self.http.cookie_jar:
            if c.key == name:
                return c.value
        return None


def sdk(gw: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


async def chat(gw: Gateway, key: str, model: str = "gpt-4o-mini") -> str | None:
    async with sdk(gw, key) as client:
        resp = await client.chat.completions.create(model=model, messages=MESSAGES)
    return resp.choices[0].message.content


@pytest.fixture
async def start(tmp_path: Path, mock_upstream: MockServer, storage: dict[str, Any]
                ) -> AsyncIterator[StartGateway]:
    """Gateways on each store engine (``storage``: SQLite, then PostgreSQL)."""
    started: list[Gateway] = []

    async def factory(accounts: Mapping[str, Any] | None = None,
                      limits: Mapping[str, Any] | None = None) -> Gateway:
        raw = raw_config(tmp_path, {"local": mock_upstream.base_url})
        raw["accounts"] = {"bcrypt_cost": 4, "change_poll_s": 0.05, **(accounts or {})}
        raw["storage"] = storage
        if limits:
            raw["limits"] = dict(limits)
        config = build_config(raw, {})
        gw = Gateway(server=GatewayServer(config), config=config, key="")
        await gw.server.startup("127.0.0.1", 0, console_port=0)
        started.append(gw)
        return gw

    yield factory
    for gw in reversed(started):
        await gw.server.shutdown()


@pytest.fixture
async def gw(start: StartGateway) -> Gateway:
    return await start()


@pytest.fixture
async def browser(gw: Gateway) -> AsyncIterator[Browser]:
    b = Browser(gw)
    yield b
    await b.http.close()


async def test_signup_sets_session_cookies_with_flags(browser: Browser) -> None:
    status, body, resp = await browser.call(
        "POST", "/api/signup", {"email": " New@Example.com", "password": PASSWORD})
    assert status == 201
    assert body["account"]["email"] == "new@example.com"
    assert body["account"]["balance_usd"] == "0.00"
    cookies = {c.split("=", 1)[0]: c for c in resp.headers.getall("Set-Cookie")}
    session = cookies["flint_session"]
    assert "HttpOnly" in session and "SameSite=Lax" in session and "Path=/" in session
    assert "Secure" not in session
    value = session.split("=", 1)[1].split(";", 1)[0]
    assert len(value) >= 43  # 256 bits, base64url
    csrf = cookies["flint_csrf"]
    assert "HttpOnly" not in csrf and "SameSite=Lax" in csrf
    assert csrf.split("=", 1)[1].split(";", 1)[0] == body["csrf_token"]
    assert resp.headers["Cache-Control"] == "no-store"


async def test_secure_cookies_when_configured(start: StartGateway) -> None:
    gw = await start({"secure_cookies": True})
    b = Browser(gw)
    try:
        _, _, resp = await b.call("POST", "/api/signup",
                                  {"email": "s@example.com", "password": PASSWORD})
        for cookie in resp.headers.getall("Set-Cookie"):
            assert "Secure" in cookie
    finally:
        await b.http.close()


async def test_key_lifecycle_with_the_openai_sdk(gw: Gateway, browser: Browser) -> None:
    await browser.signup("dev@example.com")
    status, account, _ = await browser.call("GET", "/api/account")
    assert status == 200 and account["email"] == "dev@example.com"
    assert isinstance(account["created_at"], int)
    key_id, key = await browser.new_key(name="laptop")
    assert key.startswith("sk-flint-") and len(key) >= 41
    assert await chat(gw, key)
    status, listed, _ = await browser.call("GET", "/api/keys")
    assert status == 200
    [entry] = listed["data"]
    assert entry["id"] == key_id and entry["name"] == "laptop"
    assert entry["display"] == f"{key[:13]}...{key[-4:]}"
    assert key not in orjson.dumps(listed).decode()  # never shown again
    status, _, _ = await browser.call("DELETE", f"/api/keys/{key_id}")
    assert status == 204
    with pytest.raises(openai.AuthenticationError):
        await chat(gw, key)  # at once
    status, listed, _ = await browser.call("GET", "/api/keys")
    assert listed["data"][0]["revoked_at"] is not None


async def test_model_allow_list(gw: Gateway, browser: Browser) -> None:
    await browser.signup("m@example.com")
    _, key = await browser.new_key(allowed_models=["gpt-4o-mini"])
    async with sdk(gw, key) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["gpt-4o-mini"]
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert await chat(gw, key, "gpt-4o-mini")
    status, body, _ = await browser.call("POST", "/api/keys", {"allowed_models": ["nope"]})
    assert status == 400 and "unknown model" in body["error"]["message"]


async def test_key_expiry_field(gw: Gateway, browser: Browser) -> None:
    await browser.signup("x@example.com")
    status, body, _ = await browser.call("POST", "/api/keys", {"expires_in_days": 1})
    assert status == 201 and body["expires_at"] - time.time() == pytest.approx(86400, abs=60)
    for bad in ({"expires_in_days": 0}, {"expires_at": 1}, {"expires_in_days": "1"},
                {"expires_at": int(time.time()) + 99, "expires_in_days": 1}):
        status, _, _ = await browser.call("POST", "/api/keys", bad)
        assert status == 400, bad


async def test_csrf_is_enforced(gw: Gateway, browser: Browser) -> None:
    await browser.signup("victim@example.com")
    # No token, a wrong token, a foreign Origin: all refused, nothing created.
    for kwargs in ({"csrf": False}, {"csrf": False, "headers": {"X-CSRF-Token": "guess"}},
                   {"headers": {"Origin": "https://evil.example"}},
                   {"headers": {"Sec-Fetch-Site": "cross-site"}}):
        status, body, _ = await browser.call("POST", "/api/keys", {"name": "x"}, **kwargs)
        assert status == 403, kwargs
        assert body["error"]["code"] == "csrf_failed"
    status, _, _ = await browser.call("DELETE", "/api/account", {"password": PASSWORD},
                                      csrf=False)
    assert status == 403
    # A forged cross-site form post: the attacker has the victim's cookie riding along
    # but cannot read the CSRF token.
    cookie = browser.cookie("flint_session")
    async with aiohttp.ClientSession() as attacker, attacker.post(
            gw.console_url + "/api/keys", data=b'{"name":"pwned"}',
            headers={"Cookie": f"flint_session={cookie}", "Origin": "https://evil.example",
                     "Content-Type": "application/json"}) as resp:
        assert resp.status == 403
    async with aiohttp.ClientSession() as attacker, attacker.post(
            gw.console_url + "/api/keys", data=b'{"name":"pwned"}',
            headers={"Cookie": f"flint_session={cookie}",
                     "Content-Type": "application/json"}) as resp:
        assert resp.status == 403
    status, listed, _ = await browser.call("GET", "/api/keys")  # reads need no token
    assert status == 200 and listed["data"] == []
    # The same-origin page with the token succeeds.
    status, _, _ = await browser.call("POST", "/api/keys", {"name": "ok"},
                                      headers={"Origin": gw.console_url})
    assert status == 201
    # Login is protected from cross-site posts too.
    status, _, _ = await browser.call("POST", "/api/login",
                                      {"email": "victim@example.com", "password": PASSWORD},
                                      headers={"Origin": "https://evil.example"})
    assert status == 403


async def test_logout_revokes_server_side(gw: Gateway, browser: Browser) -> None:
    await browser.signup("l@example.com")
    stolen = browser.cookie("flint_session")
    status, _, resp = await browser.call("POST", "/api/logout")
    assert status == 204
    assert any("flint_session=" in c and "Max-Age=0" in c
               for c in resp.headers.getall("Set-Cookie"))
    async with aiohttp.ClientSession() as other, other.get(
            gw.console_url + "/api/account", headers={"Cookie": f"flint_session={stolen}"}) as r:
        assert r.status == 401
    status, _, _ = await browser.call("GET", "/api/account")
    assert status == 401
    status, _, _ = await browser.call("POST", "/api/logout")  # idempotent
    assert status == 204


async def test_session_expires(start: StartGateway) -> None:
    gw = await start({"session_ttl_s": 60})
    b = Browser(gw)
    try:
        await b.signup("t@example.com")
        repo = gw.components.accounts
        real = repo.clock
        repo.clock = lambda: real() + 61_000
        status, body, _ = await b.call("GET", "/api/account")
        assert status == 401 and body["error"]["code"] == "invalid_session"
    finally:
        await b.http.close()


async def test_password_change_revokes_other_sessions(gw: Gateway) -> None:
    a, b = Browser(gw), Browser(gw)
    try:
        await a.signup("pw@example.com")
        assert await b.login("pw@example.com") == 200
        status, _, _ = await a.call("POST", "/api/account/password",
                                    {"current_password": "wrong password", "new_password":
                                     "new password 123"})
        assert status == 401
        status, _, _ = await a.call("POST", "/api/account/password",
                                    {"current_password": PASSWORD,
                                     "new_password": "new password 123"})
        assert status == 204
        assert (await a.call("GET", "/api/account"))[0] == 200  # this session stays
        assert (await b.call("GET", "/api/account"))[0] == 401  # the other one ended
        assert await b.login("pw@example.com") == 401
        assert await b.login("pw@example.com", "new password 123") == 200
    finally:
        await a.http.close()
        await b.http.close()


async def test_change_email(gw: Gateway, browser: Browser) -> None:
    await browser.signup("old@example.com")
    other = Browser(gw)
    try:
        await other.signup("taken@example.com")
    finally:
        await other.http.close()
    status, _, _ = await browser.call("POST", "/api/account/email",
                                      {"new_email": "new@example.com", "password": "nope nope"})
    assert status == 401
    status, _, _ = await browser.call("POST", "/api/account/email",
                                      {"new_email": "taken@example.com", "password": PASSWORD})
    assert status == 409
    status, body, _ = await browser.call("POST", "/api/account/email",
                                         {"new_email": "New@Example.com", "password": PASSWORD})
    assert status == 200 and body["email"] == "new@example.com"
    assert await browser.login("new@example.com") == 200


async def test_delete_account(gw: Gateway, browser: Browser) -> None:
    await browser.signup("bye@example.com")
    _, key = await browser.new_key()
    assert await chat(gw, key)
    status, _, _ = await browser.call("DELETE", "/api/account", {"password": "wrong wrong"})
    assert status == 401
    status, _, _ = await browser.call("DELETE", "/api/account", {"password": PASSWORD})
    assert status == 204
    with pytest.raises(openai.AuthenticationError):
        await chat(gw, key)
    assert (await browser.call("GET", "/api/account"))[0] == 401
    assert await browser.login("bye@example.com") == 401
    repo = gw.components.accounts
    rows = await repo.db.fetch("SELECT email, password_hash, status FROM accounts")
    assert [tuple(r) for r in rows] == [(None, None, "deleted")]


async def test_disabled_account_keys_stop(gw: Gateway, browser: Browser) -> None:
    await browser.signup("dis@example.com")
    _, key = await browser.new_key()
    assert await chat(gw, key)
    repo = gw.components.accounts
    account = await repo.by_email("dis@example.com")
    await repo.set_status(account.id, "disabled")
    with pytest.raises(openai.PermissionDeniedError) as info:
        await chat(gw, key)
    assert info.value.code == "account_disabled"
    status, _, _ = await browser.call("POST", "/api/keys", {})
    assert status == 403
    await repo.set_status(account.id, "active")
    assert await chat(gw, key)


@pytest.mark.parametrize("body, fragment", [
    ({"email": "not-an-email", "password": PASSWORD}, "not a valid email"),
    ({"email": "'; DROP TABLE accounts;--@x.com", "password": PASSWORD}, "not a valid email"),
    ({"email": "a@example.com\u202e", "password": PASSWORD}, "not a valid email"),
    ({"email": "a" * 300 + "@example.com", "password": PASSWORD}, "longer than 254"),
    ({"email": "a@example.com", "password": "short"}, "at least 10"),
    ({"email": "a@example.com", "password": "ü" * 40}, "maximum is 72 bytes"),
    ({"email": "a@example.com", "password": "a" * 10 + "\u0000"}, "NUL"),
    ({"email": "a@example.com"}, "'password' is required"),
    ({"password": PASSWORD}, "'email' is required"),
    ({"email": ["a@example.com"], "password": PASSWORD}, "must be a string"),
    ({"email": "a@example.com", "password": PASSWORD, "admin": True}, "Unknown field"),
    ([], "must be a JSON object"),
])
async def test_bad_signup_input(browser: Browser, body: object, fragment: str) -> None:
    status, payload, _ = await browser.call("POST", "/api/signup", body)
    assert status == 400
    assert fragment in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"


async def test_bad_transport(gw: Gateway, browser: Browser) -> None:
    async with browser.http.post(gw.console_url + "/api/signup", data=b"{nope",
                                 headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
    async with browser.http.post(gw.console_url + "/api/signup", data=b"email=a") as r:
        assert r.status == 415
    async with browser.http.post(gw.console_url + "/api/signup", data=b" " * 20000,
                                 headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
    await browser.signup("dup@example.com")
    status, body, _ = await browser.call("POST", "/api/signup",
                                         {"email": "DUP@example.com", "password": PASSWORD})
    assert status == 409 and body["error"]["code"] == "email_taken"
    status, body, _ = await browser.call("POST", "/api/keys", {"name": "bad\u0007name"})
    assert status == 400
    status, _, _ = await browser.call("DELETE", "/api/keys/abc")
    assert status == 404
    status, _, _ = await browser.call("DELETE", "/api/keys/99999")
    assert status == 404


async def test_wrong_password_and_unknown_email_look_the_same(
        start: StartGateway) -> None:
    # Rotate client addresses (via a trusted proxy) so throttling stays out of the way.
    gw = await start({"bcrypt_cost": 10}, {"trusted_proxies": ["127.0.0.1/32"]})
    b = Browser(gw)
    try:
        await b.signup("known@example.com")
        timings: dict[str, list[float]] = {"known": [], "unknown": []}
        bodies: dict[str, Any] = {}
        for i in range(10):
            kind = ("known", "unknown")[i % 2]
            email = "known@example.com" if kind == "known" else f"ghost{i}@example.com"
            t0 = time.perf_counter()
            status, body, _ = await b.call(
                "POST", "/api/login", {"email": email, "password": "not the password"},
                headers={"X-Forwarded-For": f"10.0.0.{i}"})
            timings[kind].append(time.perf_counter() - t0)
            assert status == 401
            bodies[kind] = body
        assert bodies["known"] == bodies["unknown"]
        known, unknown = (statistics.median(timings[k]) for k in ("known", "unknown"))
        # One bcrypt verification (~60 ms at cost 10) either way; without the dummy
        # hash an unknown email would answer in about a millisecond (a ratio near
        # 0.02). The bounds leave room for a loaded machine (1.68 was seen there).
        assert 0.3 < unknown / known < 3.0, timings
    finally:
        await b.http.close()


async def test_login_throttling(start: StartGateway) -> None:
    gw = await start(limits={"trusted_proxies": ["127.0.0.1/32"]})
    b = Browser(gw)
    try:
        await b.signup("target@example.com")
        # Per account: distinct addresses, the same victim.
        statuses = [await b.call("POST", "/api/login",
                                 {"email": "target@example.com", "password": f"guess {i:04}"},
                                 headers={"X-Forwarded-For": f"10.1.0.{i}"})
                    for i in range(8)]
        assert [s for s, _, _ in statuses][:5] == [401] * 5
        assert statuses[-1][0] == 429
        assert statuses[-1][2].headers["Retry-After"]
        # Per IP: one address, many accounts.
        codes = [(await b.call("POST", "/api/login",
                               {"email": f"user{i}@example.com", "password": "guess guess"},
                               headers={"X-Forwarded-For": "10.2.0.1"}))[0]
                 for i in range(6)]
        assert codes[:4] == [401] * 4 and codes[-1] == 429
    finally:
        await b.http.close()


async def test_db_files_hold_no_secrets(gw: Gateway, browser: Browser) -> None:
    password = "Unique-Password-7731"
    await browser.signup("secret@example.com", password)
    _, key = await browser.new_key(name="k")
    assert await chat(gw, key)
    assert await browser.login("secret@example.com", password) == 200
    session = browser.cookie("flint_session")
    assert session
    await gw.components.keys.flush_last_used()
    if gw.config.storage.backend != "sqlite":
        pytest.skip("the files of a PostgreSQL server are not this process's to read")
    path = gw.config.storage.path
    files = [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
    assert Path(f"{path}-wal") in files
    blob = b"".join(p.read_bytes() for p in files)
    for secret in (password, key, key[9:], session):
        assert secret.encode() not in blob
    row = await gw.components.accounts.db.fetchrow("SELECT password_hash FROM accounts")
    assert row is not None and row[0].startswith("$2b$04$") and len(row[0]) == 60


async def test_demo_key_at_first_start(start: StartGateway) -> None:
    gw = await start({"bootstrap_demo": True, "demo_credit_usd": "1.25"})
    key = gw.components.demo_key
    assert await chat(gw, key)
    account = await gw.components.accounts.by_email("demo@flintproxy.local")
    assert account.balance_nano == 1_250_000_000
    await gw.server.shutdown()
    again = await start({"bootstrap_demo": True})  # same database: not created twice
    assert again.components.demo_key is None
