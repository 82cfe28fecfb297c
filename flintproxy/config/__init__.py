"""Configuration: one frozen, validated object built once from TOML plus env.

Every validation error names the offending key and value, e.g.
``config error: upstreams[0].weight = -1: must be an integer in [1, 1000000]``.

Why a package: the config is one frozen object (``load``), but its sections are
separate concerns, each a module with its dataclass, its defaults and its validation
beside each other: the listeners, the upstreams, the price table, admission (limits
and billing), accounts, storage, the shared mode's Redis (cluster) and the optional
integrations (mail, at-rest key, payments), all read through the typed readers of
``fields``. This face is what callers import; no other module may hold config.
"""

from __future__ import annotations

from flintproxy.config.accounts import AccountsConfig, CookieSecurity
from flintproxy.config.admission import BillingConfig, LimitsConfig
from flintproxy.config.cluster import REDIS_SCHEMES, ClusterConfig, RedisDown, redact_url
from flintproxy.config.fields import ConfigError, usd_to_nano
from flintproxy.config.integrations import CryptoConfig, EmailConfig, PaymentsConfig
from flintproxy.config.listeners import ConsoleConfig, MetricsConfig, ServerConfig
from flintproxy.config.load import DEFAULT_CONFIG_PATH, Config, build_config, load_config
from flintproxy.config.prices import ModelPrice
from flintproxy.config.storage import StorageBackend, StorageConfig, mask_dsn
from flintproxy.config.upstreams import UpstreamConfig, UpstreamKind

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "REDIS_SCHEMES",
    "AccountsConfig",
    "BillingConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "ConsoleConfig",
    "CookieSecurity",
    "CryptoConfig",
    "EmailConfig",
    "LimitsConfig",
    "MetricsConfig",
    "ModelPrice",
    "PaymentsConfig",
    "RedisDown",
    "ServerConfig",
    "StorageBackend",
    "StorageConfig",
    "UpstreamConfig",
    "UpstreamKind",
    "build_config",
    "load_config",
    "mask_dsn",
    "redact_url",
    "usd_to_nano",
]
