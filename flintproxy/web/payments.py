"""Money in, on the control plane: ``POST /api/redeem`` (redemption codes).

Guessing codes is made hopeless twice over: a code has 80 random bits, and failed
redemptions are throttled like failed logins, per account and per client address,
by the same bounded ``IpGuard`` (escalating backoff, then a block; its tables are
LRU-bounded at ``limits.max_tracked``). A success forgets the account's failures.
"""

from __future__ import annotations

from aiohttp import web

from flintproxy.errors import BadRequest, NotFound, RateLimited
from flintproxy.money import format_usd
from flintproxy.web.api import active_account, json_response, read_body, request_ip
from flintproxy.web.keys import CODES, LOGIN_GUARD

__all__ = ["redeem"]


async def redeem(request: web.Request) -> web.Response:
    """``{"code"}`` -> 200 ``{amount_usd, balance_usd}``; 404 ``invalid_code`` for an
    unknown, used or expired code (one answer for the three); 429 when throttled."""
    account_id = await active_account(request)
    guard = request.app[LOGIN_GUARD]
    ip = request_ip(request)
    throttle = f"redeem#{account_id}"
    try:
        guard.check_blocked(ip)
        guard.check_login(throttle)
    except RateLimited as exc:
        raise RateLimited("Too many failed redemption attempts. Please try again later.",
                          retry_after_s=exc.retry_after_s, code="too_many_redeem_attempts"
                          ) from None
    body = await read_body(request, frozenset({"code"}))
    try:
        done = await request.app[CODES].redeem(account_id, body.get("code"))
    except (BadRequest, NotFound):
        guard.failure(ip)
        guard.login_failure(throttle)
        raise
    guard.login_success(throttle)
    return json_response({"amount_usd": format_usd(done.amount_nano),
                          "balance_usd": format_usd(done.balance_nano)})
