"""Micro-benchmark of the in-memory limiter's hot path.

    .venv/bin/python bench/micro_limiter.py [iterations]

Prints µs per call for: Limiter.acquire+release with every bucket active (key RPM,
TPM, concurrency and the account-wide trio), the same plus headers(), IpGuard.check,
IpGuard.check_blocked and client_ip behind a trusted proxy. Best of 5 runs.
"""

from __future__ import annotations

import ipaddress
import sys

from microbench import bench

from flintproxy.config import LimitsConfig
from flintproxy.gate.gate import Principal
from flintproxy.gate.ipguard import IpGuard, client_ip
from flintproxy.gate.limiter import Limiter


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
    cfg = LimitsConfig(default_rpm=10**9, default_tpm=10**12, ip_rpm=10**9,
                       trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    lim = Limiter(cfg)
    # Key overrides on the principal, account overrides: all six buckets + 2 counters live.
    p = Principal(key_id=1, account_id=7, rpm=10**9, tpm=10**12, max_concurrent=1000)
    lim.set_account_limits(7, rpm=10**9, tpm=10**12, max_concurrent=1000)
    for k in range(2, 1000):  # a realistically populated table
        lim.release(lim.acquire(Principal(key_id=k, account_id=k), 10), 5)
    acquire, release, headers = lim.acquire, lim.release, lim.headers

    def acq_rel(n: int) -> None:
        for _ in range(n):
            release(acquire(p, 1500), 900)

    def acq_hdr_rel(n: int) -> None:
        for _ in range(n):
            t = acquire(p, 1500)
            headers(t)
            release(t, 900)

    guard = IpGuard(cfg)
    ips = [f"203.0.{i // 256}.{i % 256}" for i in range(1000)]
    for ip in ips:
        guard.check(ip)
    guard.failure(ips[0])
    check, blocked = guard.check, guard.check_blocked

    def ip_check(n: int) -> None:
        for i in range(n):
            check(ips[i % 1000])

    def ip_blocked(n: int) -> None:
        for i in range(n):
            blocked(ips[i % 1000])

    trusted = cfg.trusted_proxies

    def cip(n: int) -> None:
        for _ in range(n):
            client_ip("10.1.2.3", "198.51.100.7, 10.0.0.2", trusted)

    def cip_direct(n: int) -> None:
        for _ in range(n):
            client_ip("198.51.100.7", "1.2.3.4", trusted)

    def loop(n: int) -> None:
        for _ in range(n):
            pass

    print(f"{n} iterations, best of 5, Python {sys.version.split()[0]}")
    base = bench("empty loop (overhead, not subtracted)", loop, n)
    bench("Limiter.acquire+release (all buckets)", acq_rel, n)
    bench("Limiter.acquire+headers+release", acq_hdr_rel, n)
    bench("IpGuard.check", ip_check, n)
    bench("IpGuard.check_blocked", ip_blocked, n)
    bench("client_ip (trusted proxy + XFF)", cip, n // 4)
    bench("client_ip (untrusted peer)", cip_direct, n)
    del base


if __name__ == "__main__":
    main()
