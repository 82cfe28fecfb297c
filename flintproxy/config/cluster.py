"""``[cluster]``: the shared mode's Redis, which keeps limits exact across nodes.

Why a module of its own: the Redis URL may carry a password (read from the env,
shown only through ``redact_url``), and what admission does while Redis is down is a
policy (``RedisDown``), not a detail.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flintproxy.config.fields import ConfigError, check_keys, fail, read_int, read_seconds, read_str


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


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{netloc[2]}").geturl()


REDIS_SCHEMES = ("redis", "rediss", "unix")


def parse_cluster(raw: Mapping[str, Any], env: Mapping[str, str]) -> ClusterConfig:
    p = "cluster."
    check_keys(raw, {"redis_url", "redis_url_env", "on_redis_down", "nodes",
                     "redis_timeout_s", "release_interval_s", "slot_ttl_s"}, p)
    url = read_str(raw, "redis_url", p, None) if "redis_url" in raw else None
    key = f"{p}redis_url"
    url_env = read_str(raw, "redis_url_env", p, None)
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
        raise fail(f"{p}on_redis_down", policy, 'must be "closed" or "open"') from None
    return ClusterConfig(
        redis_url=url, on_redis_down=down,
        nodes=read_int(raw, "nodes", p, 1, 1, 10_000),
        redis_timeout_s=read_seconds(raw, "redis_timeout_s", p, 0.5),
        release_interval_s=read_seconds(raw, "release_interval_s", p, 0.005),
        slot_ttl_s=read_seconds(raw, "slot_ttl_s", p, 30.0),
    )
