"""Account self-service under /api/: JSON in, JSON out, cookie sessions.

Login sets two cookies: ``flint_session`` (opaque, 256 random bits, HttpOnly,
SameSite=Lax, Secure as ``accounts.secure_cookies`` says: by default ("auto") when
the request came over TLS or through a trusted proxy that says it did with
``X-Forwarded-Proto: https``; only its SHA-256 is stored)
and ``flint_csrf`` (readable by the page's script). Every state-changing call made
with the session cookie must echo the CSRF token in ``X-CSRF-Token`` (double
submit, compared with the token stored for the session), and is refused when an
``Origin`` header names another host. ``session_account`` enforces both for unsafe
methods, so a route cannot forget the check.

A disabled account cannot log in (403 ``account_disabled`` for the right password);
a session opened before may read, export and delete its data and log out, but every
other change is refused (``active_account``).

Routes:
    POST   /api/signup            {email, password}            -> 201, logged in
    POST   /api/login             {email, password}            -> 200 {account, csrf_token}
    POST   /api/logout                                         -> 204
    GET    /api/account                                        -> 200 account + operator
    POST   /api/account/email     {new_email, password}        -> 200 account
    POST   /api/account/password  {current_password, new_password} -> 204
    DELETE /api/account           {password}  (also POST /api/account/delete) -> 204
    GET    /api/keys                                           -> 200 {data: [key...]}
    POST   /api/keys              {name?, expires_at? | expires_in_days?, allowed_models?,
                                   spend_cap_day_usd?, spend_cap_month_usd?}
                                                               -> 201 key + "key" (once)
    PATCH  /api/keys/{id}         {spend_cap_day_usd?, spend_cap_month_usd?} (null: no cap;
                                   absent: unchanged)          -> 200 key
    DELETE /api/keys/{id}         (also POST /api/keys/{id}/revoke) -> 204

A key's listing shows its spend caps and what it spent today and this month (UTC),
from ``key_spend`` (``store.caps``).
"""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from flintproxy.config import CookieSecurity
from flintproxy.errors import (
    AuthenticationError,
    BadRequest,
    InvalidJSON,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    UnsupportedMediaType,
)
from flintproxy.gate.ipguard import client_ip, is_trusted_proxy
from flintproxy.money import format_usd
from flintproxy.store import accounts as acc
from flintproxy.store import caps
from flintproxy.store.accounts import Session
from flintproxy.store.low_balance import LowBalance
from flintproxy.web.keys import ACCOUNTS, LOGIN_GUARD, OPERATORS, PAYMENTS, SETTINGS

SESSION_COOKIE = "flint_session"
CSRF_COOKIE = "flint_csrf"
CSRF_HEADER = "X-CSRF-Token"
MAX_BODY = 16 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_KEY_DAYS = 3650

_SESSION = web.RequestKey("flint.session", Session)


# --- the session and CSRF seam (also used by the usage routes) ---------------------


async def session_account(request: web.Request) -> int:
    """The account id of the request's valid login session, else 401.

    For unsafe methods it also runs ``require_csrf``.
    """
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise AuthenticationError("You are not logged in.", code="not_logged_in")
    session = await request.app[ACCOUNTS].get_session(token)
    if session is None:
        raise AuthenticationError("Your session has expired or ended; please log in again.",
                                  code="invalid_session")
    request[_SESSION] = session
    if request.method not in SAFE_METHODS:
        require_csrf(request)
    return session.account_id


async def active_account(request: web.Request) -> int:
    """``session_account`` for a change: a disabled account may read its data, export
    and delete it (its data rights), and log out, but change nothing (403)."""
    account_id = await session_account(request)
    if request[_SESSION].disabled:
        raise PermissionDenied("This account is disabled; you may still read, export and "
                               "delete its data.", code="account_disabled")
    return account_id


def require_csrf(request: web.Request) -> None:
    """Refuse a cross-site request: foreign Origin, or X-CSRF-Token not the session's."""
    check_origin(request)
    session = request.get(_SESSION)
    if session is None:
        raise AuthenticationError("You are not logged in.", code="not_logged_in")
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent or not hmac.compare_digest(sent.encode("utf-8", "surrogateescape"),
                                           session.csrf_token.encode()):
        raise PermissionDenied(
            f"Missing or invalid CSRF token: send the {CSRF_HEADER} header with the token "
            f"returned at login (also in the {CSRF_COOKIE} cookie).", code="csrf_failed")


def check_origin(request: web.Request) -> None:
    """Refuse requests a browser marks as coming from another site."""
    origin = request.headers.get("Origin")
    if origin is not None and (
            origin == "null" or urlsplit(origin).netloc.lower() != request.host.lower()):
        raise PermissionDenied("Cross-origin request refused.", code="csrf_failed")
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise PermissionDenied("Cross-site request refused.", code="csrf_failed")


# --- helpers -----------------------------------------------------------------------


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _no_content() -> web.Response:
    return web.Response(status=204, headers={"Cache-Control": "no-store"})


async def _body(request: web.Request, fields: frozenset[str]) -> dict[str, Any]:
    """The request's JSON object, refusing oversized bodies and unknown fields."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"Request body exceeds {MAX_BODY} bytes.")
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Content-Type must be application/json.")
    data = b""
    while chunk := await request.content.read(MAX_BODY + 1 - len(data)):
        data += chunk
        if len(data) > MAX_BODY:
            raise PayloadTooLarge(f"Request body exceeds {MAX_BODY} bytes.")
    try:
        obj = orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        raise InvalidJSON("The request body is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise BadRequest("The request body must be a JSON object.")
    unknown = sorted(set(obj) - fields)
    if unknown:
        raise BadRequest(f"Unknown field {unknown[0][:64]!r}; expected: "
                         + ", ".join(sorted(fields)) + ".", param=unknown[0][:64])
    return obj


def _ip(request: web.Request) -> str:
    return client_ip(request.remote, request.headers.get("X-Forwarded-For"),
                     request.app[SETTINGS].trusted_proxies)


def _secure(request: web.Request) -> bool:
    """Whether the session cookies carry ``Secure`` (``accounts.secure_cookies``)."""
    s = request.app[SETTINGS]
    if s.secure_cookies is not CookieSecurity.AUTO:
        return s.secure_cookies is CookieSecurity.ALWAYS
    if request.transport is not None and request.transport.get_extra_info("sslcontext"):
        return True
    proto = request.headers.get("X-Forwarded-Proto", "")
    # Only a trusted proxy's word counts: the peer itself must be one.
    return (proto.split(",")[-1].strip().lower() == "https" and request.remote is not None
            and is_trusted_proxy(request.remote, s.trusted_proxies))


def _set_session_cookies(request: web.Request, resp: web.Response, token: str,
                         session: Session) -> None:
    s = request.app[SETTINGS]
    secure = _secure(request) or None
    resp.set_cookie(SESSION_COOKIE, token, max_age=s.session_ttl_s, path="/", httponly=True,
                    samesite="Lax", secure=secure)
    resp.set_cookie(CSRF_COOKIE, session.csrf_token, max_age=s.session_ttl_s, path="/",
                    samesite="Lax", secure=secure)


def _clear_session_cookies(resp: web.Response) -> None:
    resp.del_cookie(SESSION_COOKIE, path="/")
    resp.del_cookie(CSRF_COOKIE, path="/")


async def _logged_in(request: web.Request, account_id: int, status: int) -> web.Response:
    repo = request.app[ACCOUNTS]
    token, session = await repo.create_session(account_id)
    account = await repo.get(account_id)
    resp = _json({"account": account.as_json(), "csrf_token": session.csrf_token}, status)
    _set_session_cookies(request, resp, token, session)
    return resp


async def _confirm_password(request: web.Request, account_id: int, raw: object,
                            field: str) -> None:
    """Check the account's password for a sensitive change, throttled like logins."""
    guard = request.app[LOGIN_GUARD]
    ip = _ip(request)
    guard.check_blocked(ip)
    throttle_key = f"#{account_id}"
    guard.check_login(throttle_key)
    password = acc.given_password(raw, field)
    try:
        await request.app[ACCOUNTS].check_password_of(account_id, password)
    except AuthenticationError:
        guard.failure(ip)
        guard.login_failure(throttle_key)
        raise
    guard.login_success(throttle_key)


# The seam for the other /api/ modules (web.admin_api): one body reader, one JSON writer.
json_body = _body
json_response = _json
no_content = _no_content


# --- handlers ------------------------------------------------------------------------


async def signup(request: web.Request) -> web.Response:
    check_origin(request)
    request.app[LOGIN_GUARD].check(_ip(request))
    body = await _body(request, frozenset({"email", "password"}))
    email = acc.normalize_email(body.get("email"))
    password = acc.new_password(body.get("password"))
    account_id = await request.app[ACCOUNTS].create_account(email, password)
    return await _logged_in(request, account_id, 201)


async def login(request: web.Request) -> web.Response:
    check_origin(request)  # no login CSRF either
    guard = request.app[LOGIN_GUARD]
    ip = _ip(request)
    guard.check(ip)
    body = await _body(request, frozenset({"email", "password"}))
    email = acc.normalize_email(body.get("email"))
    password = acc.given_password(body.get("password"))
    guard.check_login(email)
    try:
        account_id = await request.app[ACCOUNTS].verify_login(email, password)
    except AuthenticationError:
        guard.failure(ip)
        guard.login_failure(email)
        raise
    guard.success(ip)
    guard.login_success(email)
    return await _logged_in(request, account_id, 200)


async def logout(request: web.Request) -> web.Response:
    if request.cookies.get(SESSION_COOKIE):
        try:
            await session_account(request)
        except AuthenticationError:
            pass  # already ended: just clear the cookies
        else:
            await request.app[ACCOUNTS].delete_session(request[_SESSION].token_hash)
    resp = _no_content()
    _clear_session_cookies(resp)
    return resp


async def get_account(request: web.Request) -> web.Response:
    """The account, and what the console needs to draw its pages: whether the holder is
    an operator, the low-balance threshold, and whether (and between what amounts)
    top-ups are offered (``topups`` is null when ``[payments]`` is off)."""
    account_id = await session_account(request)
    repo = request.app[ACCOUNTS]
    account = (await repo.get(account_id)).as_json()
    threshold = await LowBalance(repo).threshold(account_id)
    payments = request.app.get(PAYMENTS)
    return _json({
        **account,
        # The console shows its operator pages to operators only (/api/admin/ checks again).
        "operator": await request.app[OPERATORS].is_operator(account_id),
        "low_balance_usd": None if threshold is None else format_usd(threshold),
        "topups": None if payments is None else {"min_usd": payments.cfg.min_topup_usd,
                                                 "max_usd": payments.cfg.max_topup_usd},
    })


async def change_email(request: web.Request) -> web.Response:
    account_id = await active_account(request)
    body = await _body(request, frozenset({"new_email", "password"}))
    new_email = acc.normalize_email(body.get("new_email"), "new_email")
    await _confirm_password(request, account_id, body.get("password"), "password")
    repo = request.app[ACCOUNTS]
    await repo.change_email(account_id, new_email)
    return _json((await repo.get(account_id)).as_json())


async def change_password(request: web.Request) -> web.Response:
    account_id = await active_account(request)
    body = await _body(request, frozenset({"current_password", "new_password"}))
    new = acc.new_password(body.get("new_password"), "new_password")
    await _confirm_password(request, account_id, body.get("current_password"),
                            "current_password")
    await request.app[ACCOUNTS].set_password(account_id, new, request[_SESSION].token_hash)
    return _no_content()


async def delete_account(request: web.Request) -> web.Response:
    account_id = await session_account(request)
    body = await _body(request, frozenset({"password"}))
    await _confirm_password(request, account_id, body.get("password"), "password")
    await request.app[ACCOUNTS].delete_account(account_id)
    resp = _no_content()
    _clear_session_cookies(resp)
    return resp


CAP_FIELDS = {"spend_cap_day_usd": "day", "spend_cap_month_usd": "month"}


async def keys_json(repo: acc.Accounts, account_id: int) -> list[dict[str, Any]]:
    """The account's keys as JSON, each with its spend caps and spend (also /api/admin)."""
    keys = await repo.list_keys(account_id)
    spend = await caps.key_caps(repo.db, account_id, repo.clock())
    none = caps.KeyCaps(None, None, 0, 0)
    return [{**k.as_json(), **spend.get(k.id, none).as_json()} for k in keys]


def cap_fields(body: dict[str, Any]) -> dict[str, int | None]:
    """The spend caps a body sets ("day"/"month" -> nano-USD or None); absent ones are
    left out (unchanged); a hostile value is a 400 naming its field."""
    return {kind: caps.parse_cap(body[name], name) for name, kind in CAP_FIELDS.items()
            if name in body}


def cap_changes(body: dict[str, Any]) -> dict[str, int | None]:
    """``cap_fields`` of a body that must change at least one cap: an empty change
    would still announce one to every node (and, for an operator, be audited)."""
    changes = cap_fields(body)
    if not changes:
        raise BadRequest("Give 'spend_cap_day_usd' and/or 'spend_cap_month_usd' (a USD "
                         "amount, or null to clear the cap).")
    return changes


async def list_keys(request: web.Request) -> web.Response:
    account_id = await session_account(request)
    return _json({"object": "list",
                  "data": await keys_json(request.app[ACCOUNTS], account_id)})


async def create_key(request: web.Request) -> web.Response:
    account_id = await active_account(request)
    body = await _body(request, frozenset({"name", "expires_at", "expires_in_days",
                                           "allowed_models", *CAP_FIELDS}))
    repo = request.app[ACCOUNTS]
    name = acc.key_name(body.get("name"))
    models = acc.model_list(body.get("allowed_models"), request.app[SETTINGS].models)
    expires_at = _expiry(body, repo.clock())
    limits = cap_fields(body)
    info, key = await repo.create_key(account_id, name, expires_at=expires_at,
                                      allowed_models=models,
                                      caps=(limits.get("day"), limits.get("month")))
    shown = caps.KeyCaps(limits.get("day"), limits.get("month"), 0, 0)
    return _json({**info.as_json(), **shown.as_json(), "key": key}, 201)


async def update_key(request: web.Request) -> web.Response:
    """PATCH a key's spend caps (null clears one; a field left out keeps its value)."""
    account_id = await active_account(request)
    key_id = _key_id(request)
    body = await _body(request, frozenset(CAP_FIELDS))
    repo = request.app[ACCOUNTS]
    await repo.set_key_caps(key_id, account_id, cap_changes(body))
    for key in await keys_json(repo, account_id):
        if key["id"] == key_id:
            return _json(key)
    raise NotFound(f"No API key with id {key_id}.")


def _key_id(request: web.Request) -> int:
    raw = request.match_info["key_id"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"No API key with id {raw[:32]!r}.")
    return int(raw)


def _expiry(body: dict[str, Any], now_ms: int) -> int | None:
    at, days = body.get("expires_at"), body.get("expires_in_days")
    if at is not None and days is not None:
        raise BadRequest("Give either 'expires_at' or 'expires_in_days', not both.")
    if days is not None:
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_KEY_DAYS:
            raise BadRequest(f"'expires_in_days' must be an integer from 1 to {MAX_KEY_DAYS}.",
                             param="expires_in_days")
        return now_ms + days * 86_400_000
    if at is not None:
        limit = now_ms // 1000 + MAX_KEY_DAYS * 86_400
        if isinstance(at, bool) or not isinstance(at, int) or not now_ms // 1000 < at <= limit:
            raise BadRequest("'expires_at' must be a future unix time in seconds, at most "
                             f"{MAX_KEY_DAYS} days ahead.", param="expires_at")
        return at * 1000
    return None


async def revoke_key(request: web.Request) -> web.Response:
    account_id = await active_account(request)
    await request.app[ACCOUNTS].revoke_key(_key_id(request), account_id)
    return _no_content()


# The helpers other /api/ modules (web.payments) share, under public names.
read_body = _body
json_response = _json
request_ip = _ip
confirm_password = _confirm_password
