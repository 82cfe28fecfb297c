"""``[[upstreams]]``: where requests go, in which API, with which credentials.

Why a module of its own: an upstream's table is the largest and the most hostile to
get wrong (URLs, model maps, header allow-lists, an API key read from the env and
never shown); it is what the relay's routing chooses among.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flintproxy.config.fields import check_keys, fail, read_float, read_int, read_str


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


def parse_upstreams(value: Any, env: Mapping[str, str]) -> tuple[UpstreamConfig, ...]:
    """The ``[[upstreams]]`` array: at least one, each valid, no two of one name."""
    if not isinstance(value, list) or not value:
        raise fail("upstreams", value, "at least one [[upstreams]] table is required")
    upstreams = tuple(_upstream(u, i, env) for i, u in enumerate(value))
    names = [u.name for u in upstreams]
    for n in names:
        if names.count(n) > 1:
            raise fail("upstreams[].name", n, "upstream names must be unique")
    return upstreams


def _upstream(raw: Any, i: int, env: Mapping[str, str]) -> UpstreamConfig:
    p = f"upstreams[{i}]."
    if not isinstance(raw, Mapping):
        raise fail(f"upstreams[{i}]", raw, "must be a table")
    check_keys(raw, {"name", "kind", "base_url", "api_key_env", "models", "model_map",
                     "weight", "priority", "connect_timeout_s", "read_timeout_s",
                     "failure_threshold", "cooldown_s", "forward_headers",
                     "anthropic_version"}, p)
    kind = raw.get("kind", "openai")
    if kind not in tuple(UpstreamKind):
        raise fail(f"{p}kind", kind, 'must be "openai" or "anthropic"')
    version = read_str(raw, "anthropic_version", p, "2023-06-01") or ""
    if not re.fullmatch(r"[!-~]+", version):  # a header value: visible ASCII only
        raise fail(f"{p}anthropic_version", version, 'must be a version such as "2023-06-01"')
    name = read_str(raw, "name", p, None)
    if name is None:
        raise fail(f"{p}name", None, "is required")
    base_url = read_str(raw, "base_url", p, None)
    parts = urlsplit(base_url or "")
    if base_url is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise fail(f"{p}base_url", base_url, "must be an http(s) URL such as http://host:port/v1")
    models = raw.get("models")
    if (not isinstance(models, list) or not models
            or not all(isinstance(m, str) and m for m in models)):
        raise fail(f"{p}models", models, "must be a non-empty list of model names")
    if len(set(models)) != len(models):
        raise fail(f"{p}models", models, "lists a model twice")
    model_map = raw.get("model_map", {})
    if not isinstance(model_map, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in model_map.items()
    ):
        raise fail(f"{p}model_map", model_map, "must be a table of model = \"upstream name\"")
    key_env = read_str(raw, "api_key_env", p, None)
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
        weight=read_int(raw, "weight", p, 1, 1, 1_000_000),
        priority=read_int(raw, "priority", p, 0, -1000, 1000),
        connect_timeout_s=read_float(raw, "connect_timeout_s", p, 5.0, 0.001),
        read_timeout_s=read_float(raw, "read_timeout_s", p, 300.0, 0.001),
        failure_threshold=read_int(raw, "failure_threshold", p, 3, 1, 1000),
        cooldown_s=read_float(raw, "cooldown_s", p, 10.0, 0.0),
    )


_HEADER_NAME = re.compile(r"[!#$%&'+.^_`|~0-9a-z-]+\*?")


def _forward_headers(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, str) and _HEADER_NAME.fullmatch(v.lower()) for v in value
    ):
        raise fail(key, value, 'must be a list of header names or prefixes such as "x-mock-*"')
    return tuple(v.lower() for v in value)
