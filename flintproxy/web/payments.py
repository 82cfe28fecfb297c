"""Money in, on the control plane: ``POST /api/redeem`` (redemption codes),
``POST /api/topups`` (a Stripe Checkout session) and ``POST /api/stripe/webhook``.

Card data never passes through here: a top-up is a Checkout Session created with the
official ``stripe`` package (its aiohttp client, ``[payments] api_base``), whose URL
the holder's browser opens at Stripe. The balance changes only when Stripe's
``checkout.session.completed`` (or ``async_payment_succeeded``) webhook arrives,
verified by the package's ``WebhookSignature`` (HMAC-SHA256 of ``t.payload`` under the
endpoint secret, timestamp within ``webhook_tolerance_s``); store.topups makes it
credit exactly once whatever replays, duplicates or order the deliveries come in.
Stripe's errors become ``UpstreamError`` (502) here, at this one boundary.

Guessing codes is made hopeless twice over: a code has 80 random bits, and failed
redemptions are throttled like failed logins, per account and per client address,
by the same bounded ``IpGuard`` (escalating backoff, then a block; its tables are
LRU-bounded at ``limits.max_tracked``). A success forgets the account's failures.
"""

from __future__ import annotations

import logging
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
import stripe
from aiohttp import web

from flintproxy.errors import (
    BadRequest,
    InvalidJSON,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    UpstreamError,
)
from flintproxy.money import NANO_PER_USD, format_usd, usd_to_nano
from flintproxy.store.topups import Completion
from flintproxy.web.api import active_account, json_response, read_body, request_ip
from flintproxy.web.checkout import Payments
from flintproxy.web.keys import CODES, LOGIN_GUARD, PAYMENTS

__all__ = ["create_topup", "redeem", "stripe_webhook"]

log = logging.getLogger("flintproxy.payments")

MAX_WEBHOOK_BYTES = 64 * 1024  # Stripe's events are a few KB
NANO_PER_CENT = NANO_PER_USD // 100
PAID_EVENTS = frozenset({"checkout.session.completed",
                         "checkout.session.async_payment_succeeded"})


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


def _payments(request: web.Request) -> Payments:
    payments = request.app.get(PAYMENTS)
    if payments is None:
        raise NotFound("Top-ups are not available on this server (no payment processor "
                       "is configured).", code="payments_disabled")
    return payments


def _amount(raw: object, payments: Payments) -> int:
    """``amount_usd`` (a decimal string, or an integer) as nano-USD in whole cents."""
    bad = BadRequest(f"amount_usd must be an amount in USD between {payments.cfg.min_topup_usd}"
                     f" and {payments.cfg.max_topup_usd}, in whole cents, e.g. \"10.00\".",
                     param="amount_usd")
    if isinstance(raw, bool) or not isinstance(raw, str | int) or len(str(raw)) > 32:
        raise bad
    try:
        nano = usd_to_nano(str(Decimal(str(raw))))
    except (ValueError, InvalidOperation):
        raise bad from None
    if nano % NANO_PER_CENT or not payments.min_nano <= nano <= payments.max_nano:
        raise bad
    return nano


async def create_topup(request: web.Request) -> web.Response:
    """``{"amount_usd"}`` -> 201 ``{id, url, amount_usd}``: open ``url`` to pay."""
    account_id = await active_account(request)
    payments = _payments(request)
    body = await read_body(request, frozenset({"amount_usd"}))
    nano = _amount(body.get("amount_usd"), payments)
    back = payments.cfg.return_url
    try:
        session = await payments.client.v1.checkout.sessions.create_async({
            "mode": "payment",
            "client_reference_id": str(account_id),
            "metadata": {"account_id": str(account_id), "amount_nano": str(nano)},
            "success_url": back + "#topup=done",
            "cancel_url": back + "#topup=cancelled",
            "line_items": [{"quantity": 1, "price_data": {
                "currency": payments.cfg.currency, "unit_amount": nano // NANO_PER_CENT,
                "product_data": {"name": "flintproxy balance top-up"}}}],
        })
    except stripe.StripeError as exc:
        log.warning("payment processor refused a checkout session: %s", type(exc).__name__)
        raise UpstreamError("The payment processor is unavailable; please try again later.",
                            code="payment_processor_error") from None
    if not session.id or not session.url:
        raise UpstreamError("The payment processor gave no checkout URL.",
                            code="payment_processor_error")
    await payments.topups.created(session.id, account_id, nano)
    return json_response({"id": session.id, "url": session.url,
                          "amount_usd": format_usd(nano)}, 201)


async def _webhook_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_WEBHOOK_BYTES:
        raise PayloadTooLarge(f"Webhook body exceeds {MAX_WEBHOOK_BYTES} bytes.")
    data = b""
    while chunk := await request.content.read(MAX_WEBHOOK_BYTES + 1 - len(data)):
        data += chunk
        if len(data) > MAX_WEBHOOK_BYTES:
            raise PayloadTooLarge(f"Webhook body exceeds {MAX_WEBHOOK_BYTES} bytes.")
    return data


def _session_of(event: Any) -> tuple[str, int] | None:
    """(session id, amount paid in nano-USD) of a paid session event, else None."""
    obj = event.get("data", {}).get("object") if isinstance(event.get("data"), dict) else None
    if not isinstance(obj, dict) or obj.get("payment_status") != "paid":
        return None
    sid, cents = obj.get("id"), obj.get("amount_total")
    if not isinstance(sid, str) or isinstance(cents, bool) or not isinstance(cents, int):
        return None
    return sid, cents * NANO_PER_CENT


async def stripe_webhook(request: web.Request) -> web.Response:
    """Stripe's event deliveries: 400 unless signed by the endpoint secret and recent;
    200 once handled (a replay too: Stripe stops retrying on any 2xx)."""
    payments = _payments(request)
    guard = request.app[LOGIN_GUARD]
    ip = request_ip(request)
    guard.check_blocked(ip)
    payload = await _webhook_body(request)
    try:
        stripe.WebhookSignature.verify_header(
            payload, request.headers.get("Stripe-Signature"),
            payments.cfg.stripe_webhook_secret, tolerance=payments.cfg.webhook_tolerance_s)
    except (stripe.SignatureVerificationError, UnicodeDecodeError, ValueError):
        guard.failure(ip)
        raise BadRequest("The webhook's signature does not verify.",
                         code="invalid_signature") from None
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise InvalidJSON("The webhook's body is not JSON.") from None
    event_id, kind = (event.get("id"), event.get("type")) if isinstance(event, dict) else (
        None, None)
    if not isinstance(event_id, str) or not isinstance(kind, str) or not (
            0 < len(event_id) <= 255 and 0 < len(kind) <= 255):
        raise BadRequest("The webhook's body is not a Stripe event.", code="invalid_event")
    paid = _session_of(event) if kind in PAID_EVENTS else None
    if paid is None:
        fresh = await payments.topups.seen(event_id, kind)
        return json_response({"received": True, "result": "ignored" if fresh else
                              Completion.DUPLICATE_EVENT})
    result = await payments.topups.complete(event_id, kind, *paid)
    if result in (Completion.UNKNOWN_SESSION, Completion.AMOUNT_MISMATCH):
        log.warning("payment event %s not credited: %s", event_id, result)
    return json_response({"received": True, "result": result})
