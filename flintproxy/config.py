"""Configuration: one frozen, validated object built once from TOML plus env.

Every validation error names the offending key and value, e.g.
``config error: upstreams[0].weight = -1: must be an integer >= 1``.

Why one module of this size: the config is one frozen object; its sections, their
validation and their defaults are read together, and no other module may hold any.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flintproxy import money

DEFAULT_CONFIG_PATH = Path("config/flintproxy.toml")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 4 * 1024 * 1024
    heartbeat_interval_s: float = 5.0
    shutdown_timeout_s: float = 10.0
    # A client connection idle between requests this long closes.
    keepalive_timeout_s: float = 75.0
    # Deadlines of a request on the data plane: its head must arrive within
    # head_timeout_s of its first byte (a new connection's within head_timeout_s of
    # opening), its body within body_timeout_s of the head (408 otherwise); a client
    # that reads nothing of a response for write_timeout_s is cut (slowloris).
    head_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    write_timeout_s: float = 30.0
    # Open client connections, in all and from one address (0: no cap); over a cap a
    # new connection is answered 503 and closed. Peers in limits.trusted_proxies are
    # never capped per address.
    max_connections: int = 10_000
    max_connections_per_ip: int = 256
    # Bounds on what one upstream response may make us hold: a whole non-streaming
    # body, and one SSE event of a stream. A breach is a 502 (mid-stream: a final
    # error event). The upstream's head is bounded too, at http.client.MAX_HEAD.
    max_upstream_body_bytes: int = 32 * 1024 * 1024
    max_sse_event_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """The control plane's listener: /api, the console, /openapi.json, /metrics.

    Its deadlines and caps keep a slow or greedy client (slowloris) from holding
    connections, and so descriptors, the data plane needs too.
    """

    host: str = "127.0.0.1"
    port: int = 8081
    head_timeout_s: float = 10.0  # a request's line and headers must arrive within this
    body_timeout_s: float = 30.0  # and its body within this, once the head is in
    max_connections: int = 1024  # open console connections, all clients together
    max_connections_per_ip: int = 32  # per client address (IPv6: per /64)


class CookieSecurity(enum.Enum):
    """``accounts.secure_cookies``: when the session cookies carry ``Secure``."""

    AUTO = "auto"  # when the request came over TLS, or via a trusted proxy that says https
    ALWAYS = "true"
    NEVER = "false"


class StorageBackend(enum.StrEnum):
    """Where accounts, keys and the ledger live: the embedded file or a shared server."""

    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path = Path("var/flintproxy.db")
    backend: StorageBackend = StorageBackend.SQLITE
    # The PostgreSQL DSN (``dsn``, or read from the env var ``dsn_env``). It may hold a
    # password: never logged or shown; ``safe_dsn`` is what messages print.
    dsn: str | None = field(default=None, repr=False)
    dsn_env: str | None = None
    pool_size: int = 10

    @property
    def safe_dsn(self) -> str:
        """The DSN with its password masked, for messages and logs."""
        return mask_dsn(self.dsn or "")


def mask_dsn(dsn: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db`` (also ``password=``)."""
    dsn = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", dsn)


class UpstreamKind(enum.StrEnum):
    """The API an upstream speaks (``upstreams[].kind``)."""

    OPENAI = "openai"  # /chat/completions, /completions, /embeddings, /responses
    ANTHROPIC = "anthropic"  # /messages, /messages/count_tokens (x-api-key, anthropic-version)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    base_url: str
    models: tuple[str, ...]
    kind: UpstreamKind = UpstreamKind.OPENAI
    # Sent as anthropic-version to a kind = "anthropic" upstream when the client sent none.
    anthropic_version: str = "2023-06-01"
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    # Client-facing model name -> the upstream's own name for it.
    model_map: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1
    priority: int = 0
    connect_timeout_s: float = 5.0
    # Time allowed for response headers (and, for streams, between chunks).
    read_timeout_s: float = 300.0
    # Consecutive failures before the circuit opens, and how long it stays open.
    failure_threshold: int = 3
    cooldown_s: float = 10.0
    # Client request headers forwarded to this upstream besides the built-in
    # allow-list (relay.REQUEST_ALLOW): lower-case names, or prefixes ending in "*".
    forward_headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Prices in nano-dollars per million tokens (exact integers)."""

    input_nano_per_mtok: int
    output_nano_per_mtok: int
    cached_input_nano_per_mtok: int
    # The most output tokens one choice may produce: caps the client's max_tokens and
    # the default (None: billing.default_max_tokens alone).
    max_output_tokens: int | None = None
    # The body parameter added when the client sent no limit (see gate.bounds).
    limit_param: str = "max_tokens"
    # Anthropic's prompt-cache writes (cache_creation_input_tokens); cache reads are
    # billed at ``cached_input_nano_per_mtok``. Both default to the input price
    # (None here: the input price).
    cache_write_nano_per_mtok: int | None = None
    # CONTRACT promise 10: the provider is sent ``store: false`` (and stored state such
    # as previous_response_id is refused) unless the operator allows storage here.
    allow_provider_storage: bool = False


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    default_rpm: int = 600
    default_tpm: int = 200_000
    default_max_concurrent: int = 64
    # Unauthenticated / failed-auth traffic per source IP.
    ip_rpm: int = 120
    ip_failures_before_block: int = 20
    ip_block_s: float = 300.0
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_tracked: int = 200_000


@dataclass(frozen=True, slots=True)
class BillingConfig:
    # Completion-token ceiling reserved when a request sets no max_tokens.
    default_max_tokens: int = 4096
    # Upper bound on the prompt tokens of one image, audio or file part (gate.bounds):
    # gpt-4o-mini counts a high-detail image as up to ~36,835 tokens.
    max_tokens_per_media_part: int = 40_000
    flush_interval_s: float = 0.2
    flush_batch_rows: int = 5000
    # Rows that may wait in memory before /v1 refuses with 503.
    max_backlog_rows: int = 200_000
    retention_days: int = 90
    # Shared mode (storage.backend = "postgresql"): credit leases (gate.leases). A
    # node's lease lives lease_ttl_s past its last renewal (a crashed node's lease
    # returns to the account then); a slice is sized from the account's recent spend
    # rate within [lease_min_nano, lease_max_nano]; a lease unused for
    # lease_idle_return_s goes back to the account.
    lease_ttl_s: float = 30.0
    lease_min_nano: int = 500_000_000  # $0.50
    lease_max_nano: int = 50_000_000_000  # $50
    lease_idle_return_s: float = 60.0


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


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # Serve /metrics on a separate port (None: on the main port).
    port: int | None = None
    # When set, /metrics on the main port requires "Authorization: Bearer <token>".
    bearer_token: str | None = field(default=None, repr=False)
    access_log: bool = True
    log_client_ip: bool = False


class RedisDown(enum.Enum):
    """``cluster.on_redis_down``: what admission does while Redis cannot be reached."""

    CLOSED = "closed"  # 503 rate_limiter_unavailable: no request beyond the shared limits
    OPEN = "open"  # per-node in-memory limits at limit / cluster.nodes


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The shared mode's Redis (limits exact across workers and nodes); see README
    "Running more than one process". ``redis_url`` None: limits are this process's."""

    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    on_redis_down: RedisDown = RedisDown.CLOSED
    # The expected node (process) count: fail-open limits are limit / nodes per node.
    nodes: int = 1
    # A Redis round trip slower than this counts as Redis down (admissions then fail
    # fast). Redis answers in well under a millisecond; this is for a sick one.
    redis_timeout_s: float = 0.5
    # Finished requests' slot releases and token true-ups go to Redis in one batch
    # this often (never a round trip per request).
    release_interval_s: float = 0.005
    # A concurrency slot not renewed this long is free again (a crashed node's slots).
    slot_ttl_s: float = 30.0


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


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    console: ConsoleConfig
    storage: StorageConfig
    upstreams: tuple[UpstreamConfig, ...]
    models: Mapping[str, ModelPrice]
    limits: LimitsConfig
    billing: BillingConfig
    accounts: AccountsConfig
    metrics: MetricsConfig
    email: EmailConfig = EmailConfig()
    crypto: CryptoConfig = CryptoConfig()
    payments: PaymentsConfig = PaymentsConfig()
    cluster: ClusterConfig = ClusterConfig()
    source: Path | None = None

    def upstreams_for(self, model: str) -> tuple[UpstreamConfig, ...]:
        return tuple(u for u in self.upstreams if model in u.models)


# --- validation helpers -------------------------------------------------------


def _fail(key: str, value: object, why: str) -> ConfigError:
    return ConfigError(f"config error: {key} = {value!r}: {why}")


def _table(raw: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise _fail(f"{path}{key}", value, "must be a table")
    return value


def _check_keys(raw: Mapping[str, Any], allowed: set[str], path: str) -> None:
    for k in raw:
        if k not in allowed:
            allowed_list = ", ".join(sorted(allowed))
            # No value in the message: a misplaced secret (api_key = "...") must not
            # end up in a log.
            raise ConfigError(f"config error: {path}{k}: unknown key (allowed: {allowed_list})")


def _int(raw: Mapping[str, Any], key: str, path: str, default: int, lo: int, hi: int) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(f"{path}{key}", v, f"must be an integer in [{lo}, {hi}]")
    return v


def _float(raw: Mapping[str, Any], key: str, path: str, default: float, lo: float) -> float:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or v < lo:
        raise _fail(f"{path}{key}", v, f"must be a number >= {lo}")
    return float(v)


def _str(raw: Mapping[str, Any], key: str, path: str, default: str | None) -> str | None:
    v = raw.get(key, default)
    if v is not None and (not isinstance(v, str) or not v):
        raise _fail(f"{path}{key}", v, "must be a non-empty string")
    return v


def _bool(raw: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    v = raw.get(key, default)
    if not isinstance(v, bool):
        raise _fail(f"{path}{key}", v, "must be true or false")
    return v


def usd_to_nano(value: object, key: str) -> int:
    """Exact conversion of a decimal USD string (e.g. "0.15") into nano-dollars."""
    if not isinstance(value, str):
        raise _fail(key, value, 'must be a decimal string such as "0.15" (floats are inexact)')
    try:
        return money.usd_to_nano(value)
    except ValueError as exc:
        raise _fail(key, value, str(exc)) from None


# --- sections -------------------------------------------------------------------


def _env_port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise _fail("FLINTPROXY_PORT (environment)", value, "must be an integer in [0, 65535]")
    return int(value)


def _server(raw: Mapping[str, Any], env: Mapping[str, str]) -> ServerConfig:
    p = "server."
    _check_keys(raw, {"host", "port", "max_body_bytes", "heartbeat_interval_s",
                      "shutdown_timeout_s", "keepalive_timeout_s", "head_timeout_s",
                      "body_timeout_s", "write_timeout_s", "max_connections",
                      "max_connections_per_ip", "max_upstream_body_bytes",
                      "max_sse_event_bytes"}, p)
    return ServerConfig(
        host=env.get("FLINTPROXY_HOST") or _str(raw, "host", p, "127.0.0.1") or "127.0.0.1",
        port=_env_port(env["FLINTPROXY_PORT"]) if env.get("FLINTPROXY_PORT")
        else _int(raw, "port", p, 8080, 0, 65535),
        max_body_bytes=_int(raw, "max_body_bytes", p, 4 * 1024 * 1024, 1024, 1 << 30),
        heartbeat_interval_s=_float(raw, "heartbeat_interval_s", p, 5.0, 0.01),
        shutdown_timeout_s=_float(raw, "shutdown_timeout_s", p, 10.0, 0.0),
        keepalive_timeout_s=_float(raw, "keepalive_timeout_s", p, 75.0, 0.1),
        head_timeout_s=_float(raw, "head_timeout_s", p, 10.0, 0.1),
        body_timeout_s=_float(raw, "body_timeout_s", p, 60.0, 0.1),
        write_timeout_s=_float(raw, "write_timeout_s", p, 30.0, 0.1),
        max_connections=_int(raw, "max_connections", p, 10_000, 0, 1 << 24),
        max_connections_per_ip=_int(raw, "max_connections_per_ip", p, 256, 0, 1 << 24),
        max_upstream_body_bytes=_int(raw, "max_upstream_body_bytes", p, 32 * 1024 * 1024,
                                     1024, 1 << 32),
        max_sse_event_bytes=_int(raw, "max_sse_event_bytes", p, 4 * 1024 * 1024,
                                 1024, 1 << 30),
    )


def _console(raw: Mapping[str, Any], env: Mapping[str, str]) -> ConsoleConfig:
    p = "console."
    _check_keys(raw, {"host", "port", "head_timeout_s", "body_timeout_s", "max_connections",
                      "max_connections_per_ip"}, p)
    total = _int(raw, "max_connections", p, 1024, 1, 1_000_000)
    per_ip = _int(raw, "max_connections_per_ip", p, 32, 1, 1_000_000)
    if per_ip > total:
        raise _fail(f"{p}max_connections_per_ip", per_ip,
                    f"must be at most console.max_connections ({total})")
    return ConsoleConfig(
        host=env.get("FLINTPROXY_CONSOLE_HOST") or _str(raw, "host", p, "127.0.0.1")
        or "127.0.0.1",
        port=_env_port(env["FLINTPROXY_CONSOLE_PORT"]) if env.get("FLINTPROXY_CONSOLE_PORT")
        else _int(raw, "port", p, 8081, 0, 65535),
        head_timeout_s=_positive(raw, "head_timeout_s", p, 10.0),
        body_timeout_s=_positive(raw, "body_timeout_s", p, 30.0),
        max_connections=total,
        max_connections_per_ip=per_ip,
    )


def _positive(raw: Mapping[str, Any], key: str, path: str, default: float) -> float:
    v = _float(raw, key, path, default, 0.0)
    if not 0.0 < v <= 3600.0:
        raise _fail(f"{path}{key}", v, "must be a number of seconds in (0, 3600]")
    return v


def _upstream(raw: Any, i: int, env: Mapping[str, str]) -> UpstreamConfig:
    p = f"upstreams[{i}]."
    if not isinstance(raw, Mapping):
        raise _fail(f"upstreams[{i}]", raw, "must be a table")
    _check_keys(raw, {"name", "kind", "base_url", "api_key_env", "models", "model_map",
                      "weight", "priority", "connect_timeout_s", "read_timeout_s",
                      "failure_threshold", "cooldown_s", "forward_headers",
                      "anthropic_version"}, p)
    kind = raw.get("kind", "openai")
    if kind not in tuple(UpstreamKind):
        raise _fail(f"{p}kind", kind, 'must be "openai" or "anthropic"')
    version = _str(raw, "anthropic_version", p, "2023-06-01") or ""
    if not re.fullmatch(r"[!-~]+", version):  # a header value: visible ASCII only
        raise _fail(f"{p}anthropic_version", version, 'must be a version such as "2023-06-01"')
    name = _str(raw, "name", p, None)
    if name is None:
        raise _fail(f"{p}name", None, "is required")
    base_url = _str(raw, "base_url", p, None)
    parts = urlsplit(base_url or "")
    if base_url is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise _fail(f"{p}base_url", base_url, "must be an http(s) URL such as http://host:port/v1")
    models = raw.get("models")
    if (not isinstance(models, list) or not models
            or not all(isinstance(m, str) and m for m in models)):
        raise _fail(f"{p}models", models, "must be a non-empty list of model names")
    if len(set(models)) != len(models):
        raise _fail(f"{p}models", models, "lists a model twice")
    model_map = raw.get("model_map", {})
    if not isinstance(model_map, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in model_map.items()
    ):
        raise _fail(f"{p}model_map", model_map, "must be a table of model = \"upstream name\"")
    key_env = _str(raw, "api_key_env", p, None)
    return UpstreamConfig(
        forward_headers=_forward_headers(raw.get("forward_headers", []), f"{p}forward_headers"),
        name=name,
        kind=UpstreamKind(kind),
        anthropic_version=version,
        base_url=base_url.rstrip("/"),
        models=tuple(models),
        api_key_env=key_env,
        api_key=env.get(key_env) if key_env else None,
        model_map=dict(model_map),
        weight=_int(raw, "weight", p, 1, 1, 1_000_000),
        priority=_int(raw, "priority", p, 0, -1000, 1000),
        connect_timeout_s=_float(raw, "connect_timeout_s", p, 5.0, 0.001),
        read_timeout_s=_float(raw, "read_timeout_s", p, 300.0, 0.001),
        failure_threshold=_int(raw, "failure_threshold", p, 3, 1, 1000),
        cooldown_s=_float(raw, "cooldown_s", p, 10.0, 0.0),
    )


_HEADER_NAME = re.compile(r"[!#$%&'+.^_`|~0-9a-z-]+\*?")


def _forward_headers(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, str) and _HEADER_NAME.fullmatch(v.lower()) for v in value
    ):
        raise _fail(key, value, 'must be a list of header names or prefixes such as "x-mock-*"')
    return tuple(v.lower() for v in value)


def _models(raw: Mapping[str, Any]) -> dict[str, ModelPrice]:
    out = {}
    for name, spec in raw.items():
        p = f'models."{name}".'
        if not isinstance(spec, Mapping):
            raise _fail(f'models."{name}"', spec, "must be a table")
        _check_keys(spec, {"input_usd_per_mtok", "output_usd_per_mtok",
                           "cached_input_usd_per_mtok", "cache_write_usd_per_mtok",
                           "max_output_tokens", "limit_param", "allow_provider_storage"}, p)
        for req in ("input_usd_per_mtok", "output_usd_per_mtok"):
            if req not in spec:
                raise _fail(f"{p}{req}", None,
                            "is required (a model without a price is not served)")
        inp = usd_to_nano(spec["input_usd_per_mtok"], f"{p}input_usd_per_mtok")
        out[name] = ModelPrice(
            input_nano_per_mtok=inp,
            output_nano_per_mtok=usd_to_nano(spec["output_usd_per_mtok"],
                                             f"{p}output_usd_per_mtok"),
            cached_input_nano_per_mtok=usd_to_nano(spec["cached_input_usd_per_mtok"],
                                                   f"{p}cached_input_usd_per_mtok")
            if "cached_input_usd_per_mtok" in spec else inp,
            max_output_tokens=_int(spec, "max_output_tokens", p, 0, 1, 10**7)
            if "max_output_tokens" in spec else None,
            limit_param=_limit_param(spec, p),
            cache_write_nano_per_mtok=usd_to_nano(spec["cache_write_usd_per_mtok"],
                                                  f"{p}cache_write_usd_per_mtok")
            if "cache_write_usd_per_mtok" in spec else None,
            allow_provider_storage=_bool(spec, "allow_provider_storage", p, False),
        )
    return out


def _limit_param(spec: Mapping[str, Any], p: str) -> str:
    value = spec.get("limit_param", "max_tokens")
    if value not in ("max_tokens", "max_completion_tokens"):
        raise _fail(f"{p}limit_param", value,
                    'must be "max_tokens" or "max_completion_tokens"')
    return str(value)


def _limits(raw: Mapping[str, Any]) -> LimitsConfig:
    p = "limits."
    _check_keys(raw, {"default_rpm", "default_tpm", "default_max_concurrent", "ip_rpm",
                      "ip_failures_before_block", "ip_block_s", "trusted_proxies",
                      "max_tracked"}, p)
    proxies = raw.get("trusted_proxies", [])
    if not isinstance(proxies, list):
        raise _fail(f"{p}trusted_proxies", proxies, "must be a list of IPs or CIDR networks")
    nets = []
    for j, item in enumerate(proxies):
        if not isinstance(item, str):
            raise _fail(f"{p}trusted_proxies[{j}]", item, "must be a string: an IP or CIDR")
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except (TypeError, ValueError):
            raise _fail(f"{p}trusted_proxies[{j}]", item, "is not an IP or CIDR network") from None
    return LimitsConfig(
        default_rpm=_int(raw, "default_rpm", p, 600, 1, 10**9),
        default_tpm=_int(raw, "default_tpm", p, 200_000, 1, 10**12),
        default_max_concurrent=_int(raw, "default_max_concurrent", p, 64, 1, 10**6),
        ip_rpm=_int(raw, "ip_rpm", p, 120, 1, 10**9),
        ip_failures_before_block=_int(raw, "ip_failures_before_block", p, 20, 1, 10**6),
        ip_block_s=_float(raw, "ip_block_s", p, 300.0, 0.0),
        trusted_proxies=tuple(nets),
        max_tracked=_int(raw, "max_tracked", p, 200_000, 100, 10**8),
    )


def _billing(raw: Mapping[str, Any]) -> BillingConfig:
    p = "billing."
    _check_keys(raw, {"default_max_tokens", "max_tokens_per_media_part", "flush_interval_s",
                      "flush_batch_rows", "max_backlog_rows", "retention_days",
                      "lease_ttl_s", "lease_min_usd", "lease_max_usd",
                      "lease_idle_return_s"}, p)
    lease_min = usd_to_nano(raw.get("lease_min_usd", "0.50"), f"{p}lease_min_usd")
    lease_max = usd_to_nano(raw.get("lease_max_usd", "50.00"), f"{p}lease_max_usd")
    if lease_min < 1:
        raise _fail(f"{p}lease_min_usd", raw.get("lease_min_usd"), "must be above zero")
    if lease_max < lease_min:
        raise _fail(f"{p}lease_max_usd", raw.get("lease_max_usd"),
                    "must be at least billing.lease_min_usd")
    ttl = _float(raw, "lease_ttl_s", p, 30.0, 2.0)
    if ttl > 3600:
        raise _fail(f"{p}lease_ttl_s", ttl, "must be a number of seconds in [2, 3600]")
    return BillingConfig(
        default_max_tokens=_int(raw, "default_max_tokens", p, 4096, 1, 10**7),
        max_tokens_per_media_part=_int(raw, "max_tokens_per_media_part", p, 40_000, 1,
                                       10**7),
        flush_interval_s=_float(raw, "flush_interval_s", p, 0.2, 0.001),
        flush_batch_rows=_int(raw, "flush_batch_rows", p, 5000, 1, 10**7),
        max_backlog_rows=_int(raw, "max_backlog_rows", p, 200_000, 1, 10**9),
        retention_days=_int(raw, "retention_days", p, 90, 0, 100_000),
        lease_ttl_s=ttl,
        lease_min_nano=lease_min,
        lease_max_nano=lease_max,
        lease_idle_return_s=_float(raw, "lease_idle_return_s", p, 60.0, 0.1),
    )


def _cookie_security(v: object, key: str) -> CookieSecurity:
    if v is True:
        return CookieSecurity.ALWAYS
    if v is False:
        return CookieSecurity.NEVER
    if v == "auto":
        return CookieSecurity.AUTO
    raise _fail(key, v, 'must be true, false or "auto"')


def _accounts(raw: Mapping[str, Any]) -> AccountsConfig:
    p = "accounts."
    _check_keys(raw, {"bcrypt_cost", "session_ttl_s", "secure_cookies", "bootstrap_demo",
                      "demo_email", "demo_credit_usd", "change_poll_s"}, p)
    credit = raw.get("demo_credit_usd", "5.00")
    usd_to_nano(credit, f"{p}demo_credit_usd")
    return AccountsConfig(
        bcrypt_cost=_int(raw, "bcrypt_cost", p, 12, 4, 31),
        session_ttl_s=_int(raw, "session_ttl_s", p, 14 * 24 * 3600, 60, 10**9),
        secure_cookies=_cookie_security(raw.get("secure_cookies", "auto"),
                                        f"{p}secure_cookies"),
        bootstrap_demo=_bool(raw, "bootstrap_demo", p, False),
        demo_email=_str(raw, "demo_email", p, "demo@flintproxy.local") or "",
        demo_credit_usd=credit,
        change_poll_s=_float(raw, "change_poll_s", p, 0.25, 0.01),
    )


def _metrics(raw: Mapping[str, Any], env: Mapping[str, str]) -> MetricsConfig:
    p = "metrics."
    _check_keys(raw, {"port", "bearer_token_env", "access_log", "log_client_ip"}, p)
    port = raw.get("port")
    if port is not None:
        port = _int(raw, "port", p, 0, 0, 65535)
    token_env = _str(raw, "bearer_token_env", p, None)
    return MetricsConfig(
        port=port,
        bearer_token=env.get(token_env) if token_env else None,
        access_log=_bool(raw, "access_log", p, True),
        log_client_ip=_bool(raw, "log_client_ip", p, False),
    )


def _http_url(raw: Mapping[str, Any], key: str, path: str, default: str) -> str:
    v = _str(raw, key, path, default) or default
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _fail(f"{path}{key}", v, "must be an http(s) URL such as https://host")
    return v.rstrip("/")


def _secret(raw: Mapping[str, Any], key: str, path: str, env: Mapping[str, str],
            required: bool) -> tuple[str | None, str | None]:
    """An ``*_env`` key: the variable's name and its value (never in an error)."""
    name = _str(raw, key, path, None)
    if name is None:
        return None, None
    value = env.get(name) or None
    if required and value is None:
        raise ConfigError(f"config error: {path}{key} = {name!r}: "
                          f"the environment variable {name} is not set")
    return name, value


def _email(raw: Mapping[str, Any], env: Mapping[str, str]) -> EmailConfig:
    p = "email."
    _check_keys(raw, {"host", "port", "starttls", "username", "password_env", "from",
                      "timeout_s", "public_url", "max_per_second"}, p)
    sender = _str(raw, "from", p, "flintproxy@localhost") or ""
    if "@" not in sender or any(c in sender for c in "\r\n<>,"):
        raise _fail(f"{p}from", sender, "must be one email address such as ops@example.com")
    password_env, password = _secret(raw, "password_env", p, env, required=False)
    username = _str(raw, "username", p, None)
    if password_env is not None and username is None:
        raise _fail(f"{p}username", None, "is required when email.password_env is set")
    return EmailConfig(
        host=_str(raw, "host", p, None),
        port=_int(raw, "port", p, 587, 1, 65535),
        starttls=_bool(raw, "starttls", p, True),
        username=username,
        password_env=password_env,
        password=password,
        sender=sender,
        timeout_s=_positive(raw, "timeout_s", p, 10.0),
        max_per_second=_int(raw, "max_per_second", p, 10, 1, 10_000),
        public_url=_http_url(raw, "public_url", p, "http://127.0.0.1:8081"),
    )


def _crypto(raw: Mapping[str, Any], env: Mapping[str, str]) -> CryptoConfig:
    p = "crypto."
    _check_keys(raw, {"key_env", "key_file"}, p)
    key_env = _str(raw, "key_env", p, None)
    key_file = _str(raw, "key_file", p, None)
    if key_env is not None and key_file is not None:
        raise _fail(f"{p}key_file", key_file, "set crypto.key_env or crypto.key_file, not both")
    return CryptoConfig(key_env=key_env, key_file=Path(key_file) if key_file else None,
                        key_text=env.get(key_env) if key_env else None)


def _payments(raw: Mapping[str, Any], env: Mapping[str, str]) -> PaymentsConfig:
    p = "payments."
    _check_keys(raw, {"stripe_secret_key_env", "stripe_webhook_secret_env", "api_base",
                      "currency", "min_topup_usd", "max_topup_usd", "webhook_tolerance_s",
                      "return_url"}, p)
    key_env, key = _secret(raw, "stripe_secret_key_env", p, env, required=True)
    hook_env, hook = _secret(raw, "stripe_webhook_secret_env", p, env,
                             required=key_env is not None)
    if key_env is not None and hook_env is None:
        raise _fail(f"{p}stripe_webhook_secret_env", None,
                    "is required with payments.stripe_secret_key_env (webhooks are verified)")
    if key_env is None and hook_env is not None:
        raise _fail(f"{p}stripe_secret_key_env", None,
                    "is required when payments.stripe_webhook_secret_env is set")
    currency = _str(raw, "currency", p, "usd") or "usd"
    if currency != "usd":
        raise _fail(f"{p}currency", currency, 'must be "usd" (balances are in USD)')
    lo = raw.get("min_topup_usd", "5.00")
    hi = raw.get("max_topup_usd", "1000.00")
    if not 0 < usd_to_nano(lo, f"{p}min_topup_usd") <= usd_to_nano(hi, f"{p}max_topup_usd"):
        raise _fail(f"{p}min_topup_usd", lo, f"must be > 0 and <= max_topup_usd ({hi})")
    return PaymentsConfig(
        stripe_secret_key_env=key_env, stripe_secret_key=key,
        stripe_webhook_secret_env=hook_env, stripe_webhook_secret=hook,
        api_base=_http_url(raw, "api_base", p, "https://api.stripe.com"),
        currency=currency, min_topup_usd=lo, max_topup_usd=hi,
        webhook_tolerance_s=_int(raw, "webhook_tolerance_s", p, 300, 1, 86_400),
        return_url=_http_url(raw, "return_url", p, "http://127.0.0.1:8081") + "/",
    )


def _storage(raw: Mapping[str, Any], env: Mapping[str, str]) -> StorageConfig:
    p = "storage."
    _check_keys(raw, {"path", "backend", "dsn", "dsn_env", "pool_size"}, p)
    path = env.get("FLINTPROXY_DB") or _str(raw, "path", p, "var/flintproxy.db")
    backend_raw = raw.get("backend", "sqlite")
    try:
        backend = StorageBackend(backend_raw)
    except ValueError:
        raise _fail(f"{p}backend", backend_raw, 'must be "sqlite" or "postgresql"') from None
    dsn_inline = raw.get("dsn")
    if dsn_inline is not None and (not isinstance(dsn_inline, str) or not dsn_inline):
        # Never echo the value: it may hold a password.
        raise _fail(f"{p}dsn", "<hidden>", "must be a non-empty string")
    dsn_env = _str(raw, "dsn_env", p, None)
    if dsn_inline is not None and dsn_env is not None:
        raise _fail(f"{p}dsn_env", dsn_env, "give either storage.dsn or storage.dsn_env")
    dsn = env.get("FLINTPROXY_DSN") or (env.get(dsn_env) if dsn_env else dsn_inline)
    if backend is StorageBackend.POSTGRESQL:
        if not dsn:
            where = (f"the environment variable {dsn_env} is not set" if dsn_env
                     else "set storage.dsn_env (preferred: a DSN may hold a password) "
                          "or storage.dsn")
            raise _fail(f"{p}dsn", None, f'backend = "postgresql" needs a DSN: {where}')
        if not re.match(r"postgres(ql)?://", dsn):
            raise _fail(f"{p}dsn", mask_dsn(dsn), "must be a postgresql:// URL")
    return StorageConfig(path=Path(path or "var/flintproxy.db"), backend=backend, dsn=dsn,
                         dsn_env=dsn_env, pool_size=_int(raw, "pool_size", p, 10, 1, 1000))


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{netloc[2]}").geturl()


REDIS_SCHEMES = ("redis", "rediss", "unix")


def _cluster(raw: Mapping[str, Any], env: Mapping[str, str]) -> ClusterConfig:
    p = "cluster."
    _check_keys(raw, {"redis_url", "redis_url_env", "on_redis_down", "nodes",
                      "redis_timeout_s", "release_interval_s", "slot_ttl_s"}, p)
    url = _str(raw, "redis_url", p, None) if "redis_url" in raw else None
    key = f"{p}redis_url"
    url_env = _str(raw, "redis_url_env", p, None)
    if url_env is not None:
        if url is not None:
            raise ConfigError(f"config error: {p}redis_url_env and {p}redis_url: set one, "
                              "not both")
        key = f"{url_env} (environment, from {p}redis_url_env)"
        url = env.get(url_env) or None
        if url is None:
            raise ConfigError(f"config error: {key}: is not set or empty")
    if url is not None:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ConfigError(f"config error: {key} = {redact_url(url)!r}: bad port") from None
        if parts.scheme not in REDIS_SCHEMES or (parts.scheme != "unix" and not parts.hostname):
            # Never the value itself: a URL may carry a password.
            raise ConfigError(f"config error: {key} = {redact_url(url)!r}: must be a URL "
                              "such as redis://[:password@]host:6379/0 (or rediss://, "
                              "unix://)")
    policy = raw.get("on_redis_down", "closed")
    try:
        down = RedisDown(policy)
    except ValueError:
        raise _fail(f"{p}on_redis_down", policy, 'must be "closed" or "open"') from None
    return ClusterConfig(
        redis_url=url, on_redis_down=down,
        nodes=_int(raw, "nodes", p, 1, 1, 10_000),
        redis_timeout_s=_positive(raw, "redis_timeout_s", p, 0.5),
        release_interval_s=_positive(raw, "release_interval_s", p, 0.005),
        slot_ttl_s=_positive(raw, "slot_ttl_s", p, 30.0),
    )


def build_config(raw: Mapping[str, Any], env: Mapping[str, str] | None = None,
                 source: Path | None = None) -> Config:
    """Validate a parsed TOML document (plus env overrides) into a Config."""
    env = os.environ if env is None else env
    _check_keys(raw, {"server", "console", "storage", "upstreams", "models", "limits",
                      "billing", "accounts", "metrics", "email", "crypto", "payments",
                      "cluster"}, "")
    storage = _storage(_table(raw, "storage", ""), env)
    ups_raw = raw.get("upstreams", [])
    if not isinstance(ups_raw, list) or not ups_raw:
        raise _fail("upstreams", ups_raw, "at least one [[upstreams]] table is required")
    upstreams = tuple(_upstream(u, i, env) for i, u in enumerate(ups_raw))
    names = [u.name for u in upstreams]
    for n in names:
        if names.count(n) > 1:
            raise _fail("upstreams[].name", n, "upstream names must be unique")
    models = _models(_table(raw, "models", ""))
    for i, u in enumerate(upstreams):
        for m in u.models:
            if m not in models:
                raise _fail(f"upstreams[{i}].models", m,
                            f'has no price: add [models."{m}"] (a model without a price '
                            "is not served)")
    return Config(
        server=_server(_table(raw, "server", ""), env),
        console=_console(_table(raw, "console", ""), env),
        storage=storage,
        upstreams=upstreams,
        models=models,
        limits=_limits(_table(raw, "limits", "")),
        billing=_billing(_table(raw, "billing", "")),
        accounts=_accounts(_table(raw, "accounts", "")),
        metrics=_metrics(_table(raw, "metrics", ""), env),
        email=_email(_table(raw, "email", ""), env),
        crypto=_crypto(_table(raw, "crypto", ""), env),
        payments=_payments(_table(raw, "payments", ""), env),
        cluster=_cluster(_table(raw, "cluster", ""), env),
        source=source,
    )


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the TOML file at ``path`` (default config/flintproxy.toml)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config error: file {str(path)!r} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config error: {path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config error: {path}: cannot read: {exc.strerror or exc}") from None
    return build_config(raw, env, source=path)
