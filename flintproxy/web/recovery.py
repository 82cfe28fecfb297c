"""Password reset on the control plane (the account's email as the second channel).

    POST /api/password-reset          {email}            -> 202, whoever asks
    POST /api/password-reset/confirm  {token, password}  -> 204, all sessions ended
    POST /api/account/email           {new_email, password} -> 202, link to the new address
    POST /api/account/email/confirm   {token}            -> 200 account, email changed

With ``[email]`` an email change waits for the new address's confirmation
(store.email_change); without it the change applies at once, as before.

The first answers the same for any well-formed address, account or not, so it cannot
be used to learn who has an account; it is throttled per client address (the IP
guard's unauthenticated budget) and per email (escalating backoff after five asks),
so it cannot be used to flood someone's mailbox either. The link carries a token of
256 random bits; only its SHA-256 is stored (store.resets). A wrong token counts as a
failed login of the client address (backoff, then a block).
"""

from __future__ import annotations

from aiohttp import web

from flintproxy.errors import BadRequest, NotFound, RateLimited
from flintproxy.money import format_usd, usd_to_nano
from flintproxy.store import accounts as acc
from flintproxy.store.low_balance import LowBalance
from flintproxy.web import api
from flintproxy.web.api import (
    active_account,
    check_origin,
    confirm_password,
    json_response,
    read_body,
    request_ip,
)
from flintproxy.web.keys import ACCOUNTS, EMAIL, EMAIL_CHANGES, LOGIN_GUARD, RESETS

__all__ = ["change_email", "confirm_email_change", "confirm_reset", "request_reset",
           "set_low_balance"]


async def request_reset(request: web.Request) -> web.Response:
    check_origin(request)
    email_cfg = request.app[EMAIL]
    if not email_cfg.enabled:
        raise NotFound("Password reset by email is not available: this server sends no "
                       "email.", code="email_disabled")
    guard = request.app[LOGIN_GUARD]
    guard.check(request_ip(request))
    body = await read_body(request, frozenset({"email"}))
    email = acc.normalize_email(body.get("email"))
    throttle = f"reset#{email}"
    try:
        guard.check_login(throttle)
    except RateLimited as exc:
        raise RateLimited("Too many reset requests for this address. Please try again later.",
                          retry_after_s=exc.retry_after_s, code="too_many_reset_requests"
                          ) from None
    guard.login_failure(throttle)  # every ask counts: the sixth within minutes waits

    def compose(token: str) -> tuple[str, str]:
        link = f"{email_cfg.public_url}/#reset={token}"
        return ("Reset your flintproxy password",
                "Someone (hopefully you) asked to reset the password of your flintproxy "
                f"account.\n\nTo choose a new password, open this link within 30 minutes:\n"
                f"{link}\n\nIt works once. If you did not ask, ignore this message: your "
                "password stays as it is.\n")

    await request.app[RESETS].request(email, compose)
    return json_response({"status": "If an account uses this address, we sent it a link "
                                    "to reset the password."}, 202)


async def confirm_reset(request: web.Request) -> web.Response:
    check_origin(request)
    guard = request.app[LOGIN_GUARD]
    ip = request_ip(request)
    guard.check_blocked(ip)
    body = await read_body(request, frozenset({"token", "password"}))
    password = acc.new_password(body.get("password"))
    try:
        await request.app[RESETS].confirm(body.get("token"), password)
    except BadRequest:
        guard.failure(ip)
        raise
    return web.Response(status=204, headers={"Cache-Control": "no-store"})


async def change_email(request: web.Request) -> web.Response:
    email_cfg = request.app[EMAIL]
    if not email_cfg.enabled:
        return await api.change_email(request)
    account_id = await active_account(request)
    body = await read_body(request, frozenset({"new_email", "password"}))
    new_email = acc.normalize_email(body.get("new_email"), "new_email")
    await confirm_password(request, account_id, body.get("password"), "password")

    def compose(token: str) -> tuple[str, str]:
        link = f"{email_cfg.public_url}/#confirm-email={token}"
        return ("Confirm your new flintproxy email address",
                "Someone (hopefully you) asked to use this address for a flintproxy account."
                f"\n\nTo confirm, open this link within 24 hours:\n{link}\n\nIf you did not "
                "ask, ignore this message: nothing changes.\n")

    await request.app[EMAIL_CHANGES].request(account_id, new_email, compose)
    return json_response({"status": "We sent a confirmation link to the new address; the "
                                    "email changes once it is opened.",
                          "pending_email": new_email}, 202)


async def confirm_email_change(request: web.Request) -> web.Response:
    check_origin(request)
    guard = request.app[LOGIN_GUARD]
    ip = request_ip(request)
    guard.check_blocked(ip)
    body = await read_body(request, frozenset({"token"}))
    try:
        account_id = await request.app[EMAIL_CHANGES].confirm(body.get("token"))
    except BadRequest:
        guard.failure(ip)
        raise
    return json_response((await request.app[ACCOUNTS].get(account_id)).as_json())


async def set_low_balance(request: web.Request) -> web.Response:
    """``{"threshold_usd": "2.00" | null}``: opt in to (or out of) the low-balance email."""
    account_id = await active_account(request)
    body = await read_body(request, frozenset({"threshold_usd"}))
    raw = body.get("threshold_usd")
    threshold = None
    if raw is not None:
        if not isinstance(raw, str) or len(raw) > 32:
            raise BadRequest('threshold_usd must be a decimal string such as "2.00", or null.',
                             param="threshold_usd")
        try:
            threshold = usd_to_nano(raw)
        except ValueError:
            raise BadRequest('threshold_usd must be a decimal string such as "2.00", or '
                             "null.", param="threshold_usd") from None
    await LowBalance(request.app[ACCOUNTS]).set_threshold(account_id, threshold)
    return json_response({"threshold_usd": None if threshold is None
                          else format_usd(threshold)})
