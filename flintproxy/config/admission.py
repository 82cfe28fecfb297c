"""``[limits]`` and ``[billing]``: what the gate admits, what it reserves, how it books.

Why together: both bound a request before it is relayed (rate and concurrency limits,
the IP guard, the money reserved and, in shared mode, the credit leases' sizes);
billing also paces what follows the request (the usage writer's batches and backlog,
the retention of usage rows).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flintproxy.config.fields import check_keys, fail, read_float, read_int, usd_to_nano


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


def parse_limits(raw: Mapping[str, Any]) -> LimitsConfig:
    p = "limits."
    check_keys(raw, {"default_rpm", "default_tpm", "default_max_concurrent", "ip_rpm",
                     "ip_failures_before_block", "ip_block_s", "trusted_proxies",
                     "max_tracked"}, p)
    proxies = raw.get("trusted_proxies", [])
    if not isinstance(proxies, list):
        raise fail(f"{p}trusted_proxies", proxies, "must be a list of IPs or CIDR networks")
    nets = []
    for j, item in enumerate(proxies):
        if not isinstance(item, str):
            raise fail(f"{p}trusted_proxies[{j}]", item, "must be a string: an IP or CIDR")
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except (TypeError, ValueError):
            raise fail(f"{p}trusted_proxies[{j}]", item, "is not an IP or CIDR network") from None
    return LimitsConfig(
        default_rpm=read_int(raw, "default_rpm", p, 600, 1, 10**9),
        default_tpm=read_int(raw, "default_tpm", p, 200_000, 1, 10**12),
        default_max_concurrent=read_int(raw, "default_max_concurrent", p, 64, 1, 10**6),
        ip_rpm=read_int(raw, "ip_rpm", p, 120, 1, 10**9),
        ip_failures_before_block=read_int(raw, "ip_failures_before_block", p, 20, 1, 10**6),
        ip_block_s=read_float(raw, "ip_block_s", p, 300.0, 0.0),
        trusted_proxies=tuple(nets),
        max_tracked=read_int(raw, "max_tracked", p, 200_000, 100, 10**8),
    )


def parse_billing(raw: Mapping[str, Any]) -> BillingConfig:
    p = "billing."
    check_keys(raw, {"default_max_tokens", "max_tokens_per_media_part", "flush_interval_s",
                     "flush_batch_rows", "max_backlog_rows", "retention_days",
                     "lease_ttl_s", "lease_min_usd", "lease_max_usd",
                     "lease_idle_return_s"}, p)
    lease_min = usd_to_nano(raw.get("lease_min_usd", "0.50"), f"{p}lease_min_usd")
    lease_max = usd_to_nano(raw.get("lease_max_usd", "50.00"), f"{p}lease_max_usd")
    if lease_min < 1:
        raise fail(f"{p}lease_min_usd", raw.get("lease_min_usd"), "must be above zero")
    if lease_max < lease_min:
        raise fail(f"{p}lease_max_usd", raw.get("lease_max_usd"),
                   "must be at least billing.lease_min_usd")
    ttl = read_float(raw, "lease_ttl_s", p, 30.0, 2.0)
    if ttl > 3600:
        raise fail(f"{p}lease_ttl_s", ttl, "must be a number of seconds in [2, 3600]")
    return BillingConfig(
        default_max_tokens=read_int(raw, "default_max_tokens", p, 4096, 1, 10**7),
        max_tokens_per_media_part=read_int(raw, "max_tokens_per_media_part", p, 40_000, 1,
                                           10**7),
        flush_interval_s=read_float(raw, "flush_interval_s", p, 0.2, 0.001),
        flush_batch_rows=read_int(raw, "flush_batch_rows", p, 5000, 1, 10**7),
        max_backlog_rows=read_int(raw, "max_backlog_rows", p, 200_000, 1, 10**9),
        retention_days=read_int(raw, "retention_days", p, 90, 0, 100_000),
        lease_ttl_s=ttl,
        lease_min_nano=lease_min,
        lease_max_nano=lease_max,
        lease_idle_return_s=read_float(raw, "lease_idle_return_s", p, 60.0, 0.1),
    )
