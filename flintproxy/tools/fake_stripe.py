"""A local fake of the few Stripe endpoints flintproxy uses, as a real HTTP server.

Top-ups are tested end to end, and shown by ``make run``, with no network and no
Stripe account: the official ``stripe`` package talks to this server through its
``api_base`` exactly as it would to api.stripe.com, and the fake delivers webhooks
signed with Stripe's documented scheme (``sign`` below, written from the docs, not
taken from the package, so the gateway's verification is checked against the spec):

- ``POST /v1/checkout/sessions`` (form-encoded, ``Authorization: Bearer sk_...``):
  a payment-mode session; its ``url`` is the fake's own ``/pay/{id}`` page;
- ``GET /v1/checkout/sessions/{id}``: that session;
- ``POST /pay/{id}``: "the customer paid": the session completes, and a
  ``checkout.session.completed`` event is POSTed to ``webhook_url``, signed.
  The event is returned too, for tests that replay or reorder deliveries;
- ``GET /pay/{id}``: the "hosted Checkout page" a browser is sent to: a Pay button
  (its form POST completes the session as above, then redirects to the session's
  ``success_url``, as Stripe does) and a Cancel link (the ``cancel_url``), so the
  console's whole top-up journey runs in a browser too.

Card data never exists here either: there is no card form, only the button.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

__all__ = ["FakeStripe", "sign", "signature_header"]

_ITEM = re.compile(r"line_items\[(\d+)\]\[(?:price_data\]\[)?(unit_amount|quantity)\]")


def sign(secret: str, timestamp: int, payload: bytes) -> str:
    """Stripe's v1 signature: hex HMAC-SHA256 of ``f"{t}.{payload}"`` under the secret."""
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature_header(secret: str, payload: bytes, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header of ``payload``: ``t=...,v1=...``."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={sign(secret, t, payload)}"


@dataclass
class FakeStripe:
    """The fake's state; ``start`` serves it on loopback, ``close`` stops it."""

    secret_key: str
    webhook_secret: str
    webhook_url: str | None = None
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/v1/checkout/sessions", self._create)
        app.router.add_get("/v1/checkout/sessions/{id}", self._get)
        app.router.add_post("/pay/{id}", self._pay)
        app.router.add_get("/pay/{id}", self._checkout_page)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _authorised(self, request: web.Request) -> bool:
        return hmac.compare_digest(request.headers.get("Authorization", ""),
                                   f"Bearer {self.secret_key}")

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.json_response({"error": {"type": "invalid_request_error",
                                            "message": message}}, status=status)

    async def _create(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        if not self._authorised(request):
            return self._error(401, "Invalid API Key provided")
        form = await request.post()
        items: dict[str, dict[str, int]] = {}
        for key, value in form.items():
            m = _ITEM.fullmatch(key)
            if m:
                items.setdefault(m[1], {"quantity": 1})[m[2]] = int(str(value))
        if form.get("mode") != "payment" or not items:
            return self._error(400, "mode=payment and line_items are required")
        sid = "cs_test_" + secrets.token_hex(12)
        metadata = {k[len("metadata["):-1]: str(v) for k, v in form.items()
                    if k.startswith("metadata[") and k.endswith("]")}
        session = {
            "id": sid, "object": "checkout.session", "mode": "payment", "status": "open",
            "payment_status": "unpaid", "currency": str(form.get("currency", "usd")),
            "amount_total": sum(i["unit_amount"] * i["quantity"] for i in items.values()),
            "client_reference_id": form.get("client_reference_id"),
            "metadata": metadata, "livemode": False,
            "success_url": form.get("success_url"), "cancel_url": form.get("cancel_url"),
            "url": f"{self.url}/pay/{sid}", "created": int(time.time()),
        }
        self.sessions[sid] = session
        return web.json_response(session)

    async def _get(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._error(401, "Invalid API Key provided")
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return self._error(404, "No such checkout.session")
        return web.json_response(session)

    async def _pay(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return self._error(404, "No such checkout.session")
        session.update(status="complete", payment_status="paid")
        event = self.event("checkout.session.completed", session)
        status = await self.deliver(event) if self.webhook_url else None
        if request.content_type == "application/x-www-form-urlencoded":  # the page's button
            raise web.HTTPSeeOther(str(session["success_url"]))
        return web.json_response({"event": event, "delivered_status": status})

    async def _checkout_page(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None or session["status"] != "open":
            return self._error(404, "No such open checkout.session")
        amount = f"{session['amount_total'] // 100}.{session['amount_total'] % 100:02d}"
        page = (f"<!doctype html><html lang=en><title>Fake Checkout</title>"
                f"<h1>Pay {amount} {html.escape(session['currency'].upper())}</h1>"
                f"<form method=post><button type=submit>Pay</button></form>"
                f"<p><a href=\"{html.escape(str(session['cancel_url']))}\">Cancel</a></p>")
        return web.Response(text=page, content_type="text/html")

    def event(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """A new event of ``kind`` about ``obj`` (recorded in ``events``)."""
        event = {"id": "evt_" + secrets.token_hex(12), "object": "event", "type": kind,
                 "created": int(time.time()), "livemode": False,
                 "data": {"object": dict(obj)}, "api_version": "2024-06-20"}
        self.events.append(event)
        return event

    async def deliver(self, event: dict[str, Any], *, timestamp: int | None = None) -> int:
        """POST ``event`` to ``webhook_url``, signed; returns the HTTP status."""
        assert self.webhook_url is not None
        payload = orjson.dumps(event)
        headers = {"Content-Type": "application/json",
                   "Stripe-Signature": signature_header(self.webhook_secret, payload, timestamp)}
        async with aiohttp.ClientSession() as http, \
                http.post(self.webhook_url, data=payload, headers=headers) as resp:
            await resp.read()
            return resp.status
