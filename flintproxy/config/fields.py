"""Reading one field of a config table: the typed readers every section uses.

Why a module of its own: every section validates its keys the same way, and every error
must have the one shape that names the key and the bad value, e.g.
``config error: upstreams[0].weight = -1: must be an integer in [1, 1000000]``; an
unknown key is named without its value (a misplaced secret must not reach a log).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flintproxy import money


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def fail(key: str, value: object, why: str) -> ConfigError:
    return ConfigError(f"config error: {key} = {value!r}: {why}")


def table(raw: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise fail(f"{path}{key}", value, "must be a table")
    return value


def check_keys(raw: Mapping[str, Any], allowed: set[str], path: str) -> None:
    for k in raw:
        if k not in allowed:
            allowed_list = ", ".join(sorted(allowed))
            # No value in the message: a misplaced secret (api_key = "...") must not
            # end up in a log.
            raise ConfigError(f"config error: {path}{k}: unknown key (allowed: {allowed_list})")


def read_int(raw: Mapping[str, Any], key: str, path: str, default: int, lo: int, hi: int) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise fail(f"{path}{key}", v, f"must be an integer in [{lo}, {hi}]")
    return v


def read_float(raw: Mapping[str, Any], key: str, path: str, default: float, lo: float) -> float:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or v < lo:
        raise fail(f"{path}{key}", v, f"must be a number >= {lo}")
    return float(v)


def read_str(raw: Mapping[str, Any], key: str, path: str, default: str | None) -> str | None:
    v = raw.get(key, default)
    if v is not None and (not isinstance(v, str) or not v):
        raise fail(f"{path}{key}", v, "must be a non-empty string")
    return v


def read_bool(raw: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    v = raw.get(key, default)
    if not isinstance(v, bool):
        raise fail(f"{path}{key}", v, "must be true or false")
    return v


def read_seconds(raw: Mapping[str, Any], key: str, path: str, default: float) -> float:
    v = read_float(raw, key, path, default, 0.0)
    if not 0.0 < v <= 3600.0:
        raise fail(f"{path}{key}", v, "must be a number of seconds in (0, 3600]")
    return v


def usd_to_nano(value: object, key: str) -> int:
    """Exact conversion of a decimal USD string (e.g. "0.15") into nano-dollars."""
    if not isinstance(value, str):
        raise fail(key, value, 'must be a decimal string such as "0.15" (floats are inexact)')
    try:
        return money.usd_to_nano(value)
    except ValueError as exc:
        raise fail(key, value, str(exc)) from None
