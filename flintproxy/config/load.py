"""The one frozen ``Config``: built from a parsed TOML document plus env, or a file.

Why a module of its own: this is where the sections meet (every upstream's models
must have a price) and where a file becomes a document (its read and TOML errors
reported in the same ``config error: ...`` shape as the values').
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flintproxy.config.accounts import AccountsConfig, parse_accounts
from flintproxy.config.admission import BillingConfig, LimitsConfig, parse_billing, parse_limits
from flintproxy.config.cluster import ClusterConfig, parse_cluster
from flintproxy.config.fields import ConfigError, check_keys, fail, table
from flintproxy.config.integrations import (
    CryptoConfig,
    EmailConfig,
    PaymentsConfig,
    parse_crypto,
    parse_email,
    parse_payments,
)
from flintproxy.config.listeners import (
    ConsoleConfig,
    MetricsConfig,
    ServerConfig,
    parse_console,
    parse_metrics,
    parse_server,
)
from flintproxy.config.prices import ModelPrice, parse_models
from flintproxy.config.storage import StorageConfig, parse_storage
from flintproxy.config.upstreams import UpstreamConfig, parse_upstreams

DEFAULT_CONFIG_PATH = Path("config/flintproxy.toml")


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
    email: EmailConfig = field(default_factory=EmailConfig)
    crypto: CryptoConfig = field(default_factory=CryptoConfig)
    payments: PaymentsConfig = field(default_factory=PaymentsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: Path | None = None

    def upstreams_for(self, model: str) -> tuple[UpstreamConfig, ...]:
        return tuple(u for u in self.upstreams if model in u.models)


def build_config(raw: Mapping[str, Any], env: Mapping[str, str] | None = None,
                 source: Path | None = None) -> Config:
    """Validate a parsed TOML document (plus env overrides) into a Config."""
    env = os.environ if env is None else env
    check_keys(raw, {"server", "console", "storage", "upstreams", "models", "limits",
                     "billing", "accounts", "metrics", "email", "crypto", "payments",
                     "cluster"}, "")
    storage = parse_storage(table(raw, "storage", ""), env)
    upstreams = parse_upstreams(raw.get("upstreams", []), env)
    models = parse_models(table(raw, "models", ""))
    for i, u in enumerate(upstreams):
        for m in u.models:
            if m not in models:
                raise fail(f"upstreams[{i}].models", m,
                           f'has no price: add [models."{m}"] (a model without a price '
                           "is not served)")
    return Config(
        server=parse_server(table(raw, "server", ""), env),
        console=parse_console(table(raw, "console", ""), env),
        storage=storage,
        upstreams=upstreams,
        models=models,
        limits=parse_limits(table(raw, "limits", "")),
        billing=parse_billing(table(raw, "billing", "")),
        accounts=parse_accounts(table(raw, "accounts", "")),
        metrics=parse_metrics(table(raw, "metrics", ""), env),
        email=parse_email(table(raw, "email", ""), env),
        crypto=parse_crypto(table(raw, "crypto", ""), env),
        payments=parse_payments(table(raw, "payments", ""), env),
        cluster=parse_cluster(table(raw, "cluster", ""), env),
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
