"""The control plane: one aiohttp application on the console port.

``/api/*`` (account self-service; ``/api/admin/*`` for operators), ``/openapi.json``
(the API's description), ``/metrics`` (unless it has a port of its own) and the web
console (``/`` and its hashed ``/static/`` files, ``web.console``). The
data plane (/v1, health) is never served here: it has its own port and its own lean
server. The session cookie therefore lives on this origin only.

Every error is rendered OpenAI-shaped (``errors_middleware``), every refusal told to
the observers (metrics), and the application is built complete: every key a handler
reads is set here, before it serves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from flintproxy.config import Config
from flintproxy.errors import FlintError, MethodNotAllowed, NotFound, PayloadTooLarge
from flintproxy.gate.billing import Billing
from flintproxy.gate.ipguard import IpGuard
from flintproxy.http.exchange import Exchange
from flintproxy.store.accounts import Accounts
from flintproxy.store.codes import Codes
from flintproxy.store.db import Database
from flintproxy.store.email_change import EmailChanges
from flintproxy.store.ledger import UsageWriter
from flintproxy.store.operators import Operators
from flintproxy.store.resets import PasswordResets
from flintproxy.store.topups import Topups
from flintproxy.web import admin_api, api, export, payments, recovery, usage_api
from flintproxy.web.checkout import Payments
from flintproxy.web.console import ConsoleAssets, security_headers
from flintproxy.web.keys import (
    ACCOUNTS,
    BILLING,
    CODES,
    EMAIL,
    EMAIL_CHANGES,
    LOGIN_GUARD,
    OPERATORS,
    PAYMENTS,
    REFUSAL_OBSERVERS,
    RESETS,
    SETTINGS,
    USAGE,
    USAGE_DB,
    AuthSettings,
)
from flintproxy.web.openapi import openapi

__all__ = ["ROUTES", "create_console_app", "errors_middleware"]

log = logging.getLogger("flintproxy.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RefusalObserver = Callable[[Exchange, FlintError], None]

# The control plane's route table (the data plane's is ``relay.routes``).
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("POST", "/api/signup", api.signup),
    ("POST", "/api/login", api.login),
    ("POST", "/api/logout", api.logout),
    ("GET", "/api/account", api.get_account),
    ("DELETE", "/api/account", api.delete_account),
    ("POST", "/api/account/delete", api.delete_account),
    ("POST", "/api/account/email", recovery.change_email),
    ("POST", "/api/account/email/confirm", recovery.confirm_email_change),
    ("POST", "/api/account/low-balance", recovery.set_low_balance),
    ("POST", "/api/account/password", api.change_password),
    ("GET", "/api/keys", api.list_keys),
    ("POST", "/api/keys", api.create_key),
    ("PATCH", "/api/keys/{key_id}", api.update_key),
    ("DELETE", "/api/keys/{key_id}", api.revoke_key),
    ("POST", "/api/keys/{key_id}/revoke", api.revoke_key),
    ("GET", "/api/usage", usage_api.list_usage),
    ("GET", "/api/usage/export", usage_api.export_usage),
    ("GET", "/api/usage/daily", usage_api.daily_usage),
    ("DELETE", "/api/usage", usage_api.delete_usage),
    ("POST", "/api/usage/delete", usage_api.delete_usage),
    ("GET", "/api/admin/accounts", admin_api.find_accounts),
    ("GET", "/api/admin/accounts/{account_id}", admin_api.get_account),
    ("POST", "/api/admin/accounts/{account_id}/credit", admin_api.credit),
    ("POST", "/api/admin/accounts/{account_id}/debit", admin_api.debit),
    ("POST", "/api/admin/accounts/{account_id}/disable", admin_api.disable),
    ("POST", "/api/admin/accounts/{account_id}/enable", admin_api.enable),
    ("POST", "/api/admin/accounts/{account_id}/limits", admin_api.set_limits),
    ("POST", "/api/admin/keys/{key_id}/revoke", admin_api.revoke_key),
    ("POST", "/api/admin/keys/{key_id}/caps", admin_api.set_key_caps),
    ("GET", "/api/admin/audit", admin_api.audit_log),
    ("GET", "/api/account/export", export.export_account),
    ("GET", "/api/account/ledger", export.account_ledger),
    ("POST", "/api/redeem", payments.redeem),
    ("POST", "/api/topups", payments.create_topup),
    ("POST", "/api/stripe/webhook", payments.stripe_webhook),
    ("POST", "/api/password-reset", recovery.request_reset),
    ("POST", "/api/password-reset/confirm", recovery.confirm_reset),
    ("GET", "/openapi.json", openapi),
)


def error_response(exc: FlintError) -> web.Response:
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json",
                        headers=exc.headers)


def exchange_of(request: web.Request) -> Exchange:
    """An aiohttp request as an Exchange (what refusal observers are told)."""
    info = request.match_info.route.resource
    route = info.canonical if info is not None else None
    return Exchange(request.method, request.path, route, list(request.raw_headers),
                    request.remote, b"", False)


def _refused(request: web.Request, err: FlintError) -> web.Response:
    observers = request.app[REFUSAL_OBSERVERS]
    if observers:
        exchange = exchange_of(request)
        for observe in observers:
            observe(exchange, err)
    return error_response(err)


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> FlintError:
    if exc.status == 404:
        return NotFound(f"Unknown request URL: {request.method} {request.path}.")
    if exc.status == 405:
        return MethodNotAllowed(f"Method {request.method} is not allowed for {request.path}.")
    if exc.status == 413:
        return PayloadTooLarge("Request body is too large.")
    err = FlintError(exc.reason or "error", code=None)
    err.status = exc.status
    err.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return err


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error OpenAI-shaped: ``{"error": {message, type, param, code}}``."""
    try:
        return await handler(request)
    except FlintError as exc:
        return _refused(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _refused(request, _from_http_exception(exc, request))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        # Never the request itself in the log: only where it failed.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _refused(request, FlintError("The server had an error processing your request."))


def create_console_app(config: Config, accounts: Accounts, guard: IpGuard,
                       usage: UsageWriter, usage_db: Database, billing: Billing,
                       refusal_observers: Iterable[RefusalObserver] = (),
                       extra_routes: Iterable[tuple[str, str, Handler]] = ()
                       ) -> web.Application:
    """The control plane's application, complete; nothing runs until it is started."""
    app = web.Application(middlewares=[errors_middleware],
                          client_max_size=config.server.max_body_bytes)
    app[ACCOUNTS] = accounts
    app[CODES] = Codes(accounts)
    app[RESETS] = PasswordResets(accounts)
    app[EMAIL_CHANGES] = EmailChanges(accounts)
    app[EMAIL] = config.email
    if config.payments.enabled:
        checkout = Payments(config.payments, Topups(accounts))
        app[PAYMENTS] = checkout
        app.on_cleanup.append(checkout.close)
    app[SETTINGS] = AuthSettings.from_config(config)
    app[LOGIN_GUARD] = guard
    app[USAGE] = usage
    app[BILLING] = billing
    app[USAGE_DB] = usage_db
    app[REFUSAL_OBSERVERS] = tuple(refusal_observers)
    app[OPERATORS] = Operators(accounts)
    app.on_response_prepare.append(security_headers)
    assets = ConsoleAssets()
    console: tuple[tuple[str, str, Handler], ...] = (
        ("GET", "/", assets.index), ("GET", "/static/{name:.+}", assets.asset))
    for method, path, handler in (*ROUTES, *console, *extra_routes):
        app.router.add_route(method, path, handler)
    return app
