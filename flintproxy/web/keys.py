"""What the control plane's handlers find on their aiohttp application.

The composition root builds the application with every key set (``web.app``): a
handler never finds one missing, and nothing below the web layer knows aiohttp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from flintproxy.config import Config, CookieSecurity, EmailConfig
from flintproxy.errors import FlintError
from flintproxy.gate.billing import Billing
from flintproxy.gate.ipguard import IpGuard, Network
from flintproxy.http.exchange import Exchange
from flintproxy.store.accounts import Accounts
from flintproxy.store.codes import Codes
from flintproxy.store.db import Database
from flintproxy.store.email_change import EmailChanges
from flintproxy.store.ledger import UsageWriter
from flintproxy.store.operators import Operators
from flintproxy.store.resets import PasswordResets
from flintproxy.web.checkout import Payments

__all__ = [
    "ACCOUNTS",
    "CODES",
    "EMAIL",
    "EMAIL_CHANGES",
    "LOGIN_GUARD",
    "OPERATORS",
    "REFUSAL_OBSERVERS",
    "RESETS",
    "SETTINGS",
    "USAGE",
    "USAGE_DB",
    "AuthSettings",
]


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """What the /api/ handlers need from the config."""

    secure_cookies: CookieSecurity
    session_ttl_s: int
    trusted_proxies: tuple[Network, ...]
    models: frozenset[str]

    @classmethod
    def from_config(cls, cfg: Config) -> AuthSettings:
        models = frozenset(m for u in cfg.upstreams for m in u.models)
        return cls(cfg.accounts.secure_cookies, cfg.accounts.session_ttl_s,
                   cfg.limits.trusted_proxies, models)



ACCOUNTS = web.AppKey("flint.accounts", Accounts)
# The operator role and audited operator actions (/api/admin/).
OPERATORS = web.AppKey("flint.operators", Operators)
SETTINGS = web.AppKey("flint.auth_settings", AuthSettings)
CODES = web.AppKey("flint.codes", Codes)
RESETS = web.AppKey("flint.password_resets", PasswordResets)
EMAIL_CHANGES = web.AppKey("flint.email_changes", EmailChanges)
EMAIL = web.AppKey("flint.email", EmailConfig)
# Set only when [payments] is configured: read it with ``app.get(PAYMENTS)``.
PAYMENTS = web.AppKey("flint.payments", Payments)
# Throttles logins (per IP and per account); the data plane's gate shares it for
# failed API-key attempts.
LOGIN_GUARD = web.AppKey("flint.login_guard", IpGuard)
USAGE = web.AppKey("flint.usage", UsageWriter)
# The gateway's balance book: an operator's debit holds its amount there first.
BILLING = web.AppKey("flint.billing", Billing)
# A connection for /api/usage reads and deletes (not the writer's).
USAGE_DB = web.AppKey("flint.usage_db", Database)
# Told of every error response (metrics: rate-limited logins).
REFUSAL_OBSERVERS = web.AppKey("flint.refusal_observers",
                               tuple[Callable[[Exchange, FlintError], None], ...])
