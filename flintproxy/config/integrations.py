"""``[email]``, ``[crypto]`` and ``[payments]``: the optional integrations.

Why together: each is off unless configured (an SMTP host, an at-rest key, a Stripe
secret key), and each takes its secrets from environment variables named in the
config (``*_env``), never from the file itself and never into an error message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flintproxy.config.fields import (
    ConfigError,
    check_keys,
    fail,
    read_bool,
    read_int,
    read_seconds,
    read_str,
    usd_to_nano,
)


@dataclass(frozen=True, slots=True)
class EmailConfig:
    """``[email]``: the SMTP relay of the outbox; off (no mail sent) when no host."""

    host: str | None = None
    port: int = 587
    starttls: bool = True
    username: str | None = None
    password_env: str | None = None
    password: str | None = field(default=None, repr=False)
    sender: str = "flintproxy@localhost"  # the TOML key is ``from``
    timeout_s: float = 10.0
    # At most this many messages a second leave the outbox (mail servers throttle
    # bulk senders; a policy notice to every account must not trip them).
    max_per_second: int = 10
    # The console's address as users reach it: the base of links in emails.
    public_url: str = "http://127.0.0.1:8081"

    @property
    def enabled(self) -> bool:
        return self.host is not None


@dataclass(frozen=True, slots=True)
class CryptoConfig:
    """``[crypto]``: where the key that encrypts account data at rest comes from (an
    env var holding it, or a key file); neither: account data is stored in clear."""

    key_env: str | None = None
    key_file: Path | None = None
    key_text: str | None = field(default=None, repr=False)  # key_env's value

    @property
    def enabled(self) -> bool:
        return self.key_env is not None or self.key_file is not None


@dataclass(frozen=True, slots=True)
class PaymentsConfig:
    """``[payments]``: Stripe Checkout top-ups; off unless a secret key is configured."""

    stripe_secret_key_env: str | None = None
    stripe_secret_key: str | None = field(default=None, repr=False)
    stripe_webhook_secret_env: str | None = None
    stripe_webhook_secret: str | None = field(default=None, repr=False)
    api_base: str = "https://api.stripe.com"
    currency: str = "usd"
    min_topup_usd: str = "5.00"
    max_topup_usd: str = "1000.00"
    # How old a webhook's signed timestamp may be (Stripe's default: 300 s).
    webhook_tolerance_s: int = 300
    # Where Checkout sends the customer back (the console), paid or cancelled.
    return_url: str = "http://127.0.0.1:8081/"

    @property
    def enabled(self) -> bool:
        return self.stripe_secret_key_env is not None


def _http_url(raw: Mapping[str, Any], key: str, path: str, default: str) -> str:
    v = read_str(raw, key, path, default) or default
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise fail(f"{path}{key}", v, "must be an http(s) URL such as https://host")
    return v.rstrip("/")


def _secret(raw: Mapping[str, Any], key: str, path: str, env: Mapping[str, str],
            required: bool) -> tuple[str | None, str | None]:
    """An ``*_env`` key: the variable's name and its value (never in an error)."""
    name = read_str(raw, key, path, None)
    if name is None:
        return None, None
    value = env.get(name) or None
    if required and value is None:
        raise ConfigError(f"config error: {path}{key} = {name!r}: "
                          f"the environment variable {name} is not set")
    return name, value


def parse_email(raw: Mapping[str, Any], env: Mapping[str, str]) -> EmailConfig:
    p = "email."
    check_keys(raw, {"host", "port", "starttls", "username", "password_env", "from",
                     "timeout_s", "public_url", "max_per_second"}, p)
    sender = read_str(raw, "from", p, "flintproxy@localhost") or ""
    if "@" not in sender or any(c in sender for c in "\r\n<>,"):
        raise fail(f"{p}from", sender, "must be one email address such as ops@example.com")
    password_env, password = _secret(raw, "password_env", p, env, required=False)
    username = read_str(raw, "username", p, None)
    if password_env is not None and username is None:
        raise fail(f"{p}username", None, "is required when email.password_env is set")
    return EmailConfig(
        host=read_str(raw, "host", p, None),
        port=read_int(raw, "port", p, 587, 1, 65535),
        starttls=read_bool(raw, "starttls", p, True),
        username=username,
        password_env=password_env,
        password=password,
        sender=sender,
        timeout_s=read_seconds(raw, "timeout_s", p, 10.0),
        max_per_second=read_int(raw, "max_per_second", p, 10, 1, 10_000),
        public_url=_http_url(raw, "public_url", p, "http://127.0.0.1:8081"),
    )


def parse_crypto(raw: Mapping[str, Any], env: Mapping[str, str]) -> CryptoConfig:
    p = "crypto."
    check_keys(raw, {"key_env", "key_file"}, p)
    key_env = read_str(raw, "key_env", p, None)
    key_file = read_str(raw, "key_file", p, None)
    if key_env is not None and key_file is not None:
        raise fail(f"{p}key_file", key_file, "set crypto.key_env or crypto.key_file, not both")
    return CryptoConfig(key_env=key_env, key_file=Path(key_file) if key_file else None,
                        key_text=env.get(key_env) if key_env else None)


def parse_payments(raw: Mapping[str, Any], env: Mapping[str, str]) -> PaymentsConfig:
    p = "payments."
    check_keys(raw, {"stripe_secret_key_env", "stripe_webhook_secret_env", "api_base",
                     "currency", "min_topup_usd", "max_topup_usd", "webhook_tolerance_s",
                     "return_url"}, p)
    key_env, key = _secret(raw, "stripe_secret_key_env", p, env, required=True)
    hook_env, hook = _secret(raw, "stripe_webhook_secret_env", p, env,
                             required=key_env is not None)
    if key_env is not None and hook_env is None:
        raise fail(f"{p}stripe_webhook_secret_env", None,
                   "is required with payments.stripe_secret_key_env (webhooks are verified)")
    if key_env is None and hook_env is not None:
        raise fail(f"{p}stripe_secret_key_env", None,
                   "is required when payments.stripe_webhook_secret_env is set")
    currency = read_str(raw, "currency", p, "usd") or "usd"
    if currency != "usd":
        raise fail(f"{p}currency", currency, 'must be "usd" (balances are in USD)')
    lo = raw.get("min_topup_usd", "5.00")
    hi = raw.get("max_topup_usd", "1000.00")
    if not 0 < usd_to_nano(lo, f"{p}min_topup_usd") <= usd_to_nano(hi, f"{p}max_topup_usd"):
        raise fail(f"{p}min_topup_usd", lo, f"must be > 0 and <= max_topup_usd ({hi})")
    return PaymentsConfig(
        stripe_secret_key_env=key_env, stripe_secret_key=key,
        stripe_webhook_secret_env=hook_env, stripe_webhook_secret=hook,
        api_base=_http_url(raw, "api_base", p, "https://api.stripe.com"),
        currency=currency, min_topup_usd=lo, max_topup_usd=hi,
        webhook_tolerance_s=read_int(raw, "webhook_tolerance_s", p, 300, 1, 86_400),
        return_url=_http_url(raw, "return_url", p, "http://127.0.0.1:8081") + "/",
    )
