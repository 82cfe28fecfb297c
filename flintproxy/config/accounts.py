"""``[accounts]``: password hashing, sessions and their cookies, the demo bootstrap.

Why a module of its own: these are the control plane's account settings, with the
one tri-state (``secure_cookies``) that is an enum rather than a bool.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flintproxy.config.fields import (
    check_keys,
    fail,
    read_bool,
    read_float,
    read_int,
    read_str,
    usd_to_nano,
)


class CookieSecurity(enum.Enum):
    """``accounts.secure_cookies``: when the session cookies carry ``Secure``."""

    AUTO = "auto"  # when the request came over TLS, or via a trusted proxy that says https
    ALWAYS = "true"
    NEVER = "false"


@dataclass(frozen=True, slots=True)
class AccountsConfig:
    bcrypt_cost: int = 12
    session_ttl_s: int = 14 * 24 * 3600
    secure_cookies: CookieSecurity = CookieSecurity.AUTO
    # Create a funded demo account and key on first start (make run's quick start).
    bootstrap_demo: bool = False
    demo_email: str = "demo@flintproxy.local"
    demo_credit_usd: str = "5.00"
    # How often the server polls the DB for changes made by other processes.
    change_poll_s: float = 0.25


def _cookie_security(v: object, key: str) -> CookieSecurity:
    if v is True:
        return CookieSecurity.ALWAYS
    if v is False:
        return CookieSecurity.NEVER
    if v == "auto":
        return CookieSecurity.AUTO
    raise fail(key, v, 'must be true, false or "auto"')


def parse_accounts(raw: Mapping[str, Any]) -> AccountsConfig:
    p = "accounts."
    check_keys(raw, {"bcrypt_cost", "session_ttl_s", "secure_cookies", "bootstrap_demo",
                     "demo_email", "demo_credit_usd", "change_poll_s"}, p)
    credit = raw.get("demo_credit_usd", "5.00")
    usd_to_nano(credit, f"{p}demo_credit_usd")
    return AccountsConfig(
        bcrypt_cost=read_int(raw, "bcrypt_cost", p, 12, 4, 31),
        session_ttl_s=read_int(raw, "session_ttl_s", p, 14 * 24 * 3600, 60, 10**9),
        secure_cookies=_cookie_security(raw.get("secure_cookies", "auto"),
                                        f"{p}secure_cookies"),
        bootstrap_demo=read_bool(raw, "bootstrap_demo", p, False),
        demo_email=read_str(raw, "demo_email", p, "demo@flintproxy.local") or "",
        demo_credit_usd=credit,
        change_poll_s=read_float(raw, "change_poll_s", p, 0.25, 0.01),
    )
