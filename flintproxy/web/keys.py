"""What the control plane's handlers find on their aiohttp application.

The composition root builds the application with every key set (``web.app``): a
handler never finds one missing, and nothing below the web layer knows aiohttp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from flintproxy.config import Config, CookieSecurity
from flintproxy.errors import FlintError
from flintproxy.gate.ipguard import IpGuard, Network
from flintproxy.http.exchange import Exchange
from flintproxy.store.accounts import Accounts
from flintproxy.store.db import Database
from flintproxy.store.ledger import UsageWriter

__all__ = ["ACCOUNTS", "LOGIN_GUARD", "REFUSAL_OBSERVERS", "SETTINGS", "USAGE", "USAGE_DB",
           "AuthSettings"]


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
SETTINGS = web.AppKey("flint.auth_settings", AuthSettings)
# Throttles logins (per IP and per account); the data plane's gate shares it for
# failed API-key attempts.
LOGIN_GUARD = web.AppKey("flint.login_guard", IpGuard)
USAGE = web.AppKey("flint.usage", UsageWriter)
# A connection for /api/usage reads and deletes (not the writer's).
USAGE_DB = web.AppKey("flint.usage_db", Database)
# Told of every error response (metrics: rate-limited logins).
REFUSAL_OBSERVERS = web.AppKey("flint.refusal_observers",
                               tuple[Callable[[Exchange, FlintError], None], ...])
