"""``[server]``, ``[console]`` and ``[metrics]``: the two listeners and what they expose.

Why together: these are the sockets the process opens (the data plane, the control
plane, an optional /metrics port) with their deadlines and connection caps, and the
environment overrides (``FLINTPROXY_HOST``, ``FLINTPROXY_PORT``,
``FLINTPROXY_CONSOLE_*``) that deployments use to move them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flintproxy.config.fields import (
    check_keys,
    fail,
    read_bool,
    read_float,
    read_int,
    read_seconds,
    read_str,
)


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


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # Serve /metrics on a separate port (None: on the main port).
    port: int | None = None
    # When set, /metrics on the main port requires "Authorization: Bearer <token>".
    bearer_token: str | None = field(default=None, repr=False)
    access_log: bool = True
    log_client_ip: bool = False


def _env_port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise fail("FLINTPROXY_PORT (environment)", value, "must be an integer in [0, 65535]")
    return int(value)


def parse_server(raw: Mapping[str, Any], env: Mapping[str, str]) -> ServerConfig:
    p = "server."
    check_keys(raw, {"host", "port", "max_body_bytes", "heartbeat_interval_s",
                     "shutdown_timeout_s", "keepalive_timeout_s", "head_timeout_s",
                     "body_timeout_s", "write_timeout_s", "max_connections",
                     "max_connections_per_ip", "max_upstream_body_bytes",
                     "max_sse_event_bytes"}, p)
    return ServerConfig(
        host=env.get("FLINTPROXY_HOST") or read_str(raw, "host", p, "127.0.0.1") or "127.0.0.1",
        port=_env_port(env["FLINTPROXY_PORT"]) if env.get("FLINTPROXY_PORT")
        else read_int(raw, "port", p, 8080, 0, 65535),
        max_body_bytes=read_int(raw, "max_body_bytes", p, 4 * 1024 * 1024, 1024, 1 << 30),
        heartbeat_interval_s=read_float(raw, "heartbeat_interval_s", p, 5.0, 0.01),
        shutdown_timeout_s=read_float(raw, "shutdown_timeout_s", p, 10.0, 0.0),
        keepalive_timeout_s=read_float(raw, "keepalive_timeout_s", p, 75.0, 0.1),
        head_timeout_s=read_float(raw, "head_timeout_s", p, 10.0, 0.1),
        body_timeout_s=read_float(raw, "body_timeout_s", p, 60.0, 0.1),
        write_timeout_s=read_float(raw, "write_timeout_s", p, 30.0, 0.1),
        max_connections=read_int(raw, "max_connections", p, 10_000, 0, 1 << 24),
        max_connections_per_ip=read_int(raw, "max_connections_per_ip", p, 256, 0, 1 << 24),
        max_upstream_body_bytes=read_int(raw, "max_upstream_body_bytes", p, 32 * 1024 * 1024,
                                         1024, 1 << 32),
        max_sse_event_bytes=read_int(raw, "max_sse_event_bytes", p, 4 * 1024 * 1024,
                                     1024, 1 << 30),
    )


def parse_console(raw: Mapping[str, Any], env: Mapping[str, str]) -> ConsoleConfig:
    p = "console."
    check_keys(raw, {"host", "port", "head_timeout_s", "body_timeout_s", "max_connections",
                     "max_connections_per_ip"}, p)
    total = read_int(raw, "max_connections", p, 1024, 1, 1_000_000)
    per_ip = read_int(raw, "max_connections_per_ip", p, 32, 1, 1_000_000)
    if per_ip > total:
        raise fail(f"{p}max_connections_per_ip", per_ip,
                   f"must be at most console.max_connections ({total})")
    return ConsoleConfig(
        host=env.get("FLINTPROXY_CONSOLE_HOST") or read_str(raw, "host", p, "127.0.0.1")
        or "127.0.0.1",
        port=_env_port(env["FLINTPROXY_CONSOLE_PORT"]) if env.get("FLINTPROXY_CONSOLE_PORT")
        else read_int(raw, "port", p, 8081, 0, 65535),
        head_timeout_s=read_seconds(raw, "head_timeout_s", p, 10.0),
        body_timeout_s=read_seconds(raw, "body_timeout_s", p, 30.0),
        max_connections=total,
        max_connections_per_ip=per_ip,
    )


def parse_metrics(raw: Mapping[str, Any], env: Mapping[str, str]) -> MetricsConfig:
    p = "metrics."
    check_keys(raw, {"port", "bearer_token_env", "access_log", "log_client_ip"}, p)
    port = raw.get("port")
    if port is not None:
        port = read_int(raw, "port", p, 0, 0, 65535)
    token_env = read_str(raw, "bearer_token_env", p, None)
    return MetricsConfig(
        port=port,
        bearer_token=env.get(token_env) if token_env else None,
        access_log=read_bool(raw, "access_log", p, True),
        log_client_ip=read_bool(raw, "log_client_ip", p, False),
    )
