"""The in-memory limiter: exact accounting against a controllable clock."""

from __future__ import annotations

import ipaddress
import time
import tracemalloc

import pytest

from flintproxy.config import LimitsConfig
from flintproxy.errors import RateLimited
from flintproxy.gate.gate import Principal
from flintproxy.gate.ipguard import IpGuard, client_ip
from flintproxy.gate.limiter import Limiter, Ticket, format_reset

HEADER_NAMES = {
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
}


class Clock:
    def __init__(self, t: float = 1_000_000.125) -> None:  # a monotonic-like, inexact base
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def key(rpm: int | None = None, tpm: int | None = None, conc: int | None = None,
        key_id: int = 1, account_id: int = 1) -> Principal:
    return Principal(key_id=key_id, account_id=account_id, rpm=rpm, tpm=tpm, max_concurrent=conc)


def make(**cfg: object) -> tuple[Limiter, Clock]:
    clock = Clock()
    return Limiter(LimitsConfig(**cfg), clock=clock), clock  # type: ignore[arg-type]


def run(lim: Limiter, p: Principal, n: int, tokens: int = 1) -> int:
    """Admit up to n requests (each released at once); return how many got in."""
    for i in range(n):
        try:
            t = lim.acquire(p, tokens)
        except RateLimited:
            return i
        lim.release(t, tokens)
    return n


def denied(lim: Limiter, p: Principal, tokens: int = 1) -> RateLimited:
    with pytest.raises(RateLimited) as exc:
        lim.acquire(p, tokens)
    return exc.value


# --- format_reset ---------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (-1, "0s"), (0.0001, "1ms"), (0.012, "12ms"), (0.02, "20ms"), (0.999, "999ms"),
    (1, "1s"), (1.5, "1.5s"), (8.64, "8.64s"), (59.999, "59.999s"), (60, "1m0s"),
    (360, "6m0s"), (61.25, "1m1.25s"), (3600, "1h0m0s"), (3723, "1h2m3s"),
])
def test_format_reset_is_openai_style(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


# --- requests per minute ----------------------------------------------------------


def test_60_rpm_gives_exactly_60_then_429_and_refills_one_per_second() -> None:
    lim, clock = make(default_tpm=10**9)
    p = key(rpm=60)
    assert run(lim, p, 100) == 60
    err = denied(lim, p)
    assert err.status == 429 and err.code == "rate_limit_requests"
    assert err.retry_after_s == pytest.approx(1.0)
    assert err.headers["Retry-After"] == "1"
    assert err.message == ("Rate limit reached for requests per min (RPM): Limit 60, Used 60, "
                           "Requested 1. Please try again in 1s.")
    clock.advance(0.5)
    assert denied(lim, p).headers["Retry-After"] == "1"  # 0.5 s rounds up to whole seconds
    clock.advance(0.5)
    assert run(lim, p, 10) == 1
    clock.advance(30)
    assert run(lim, p, 100) == 30
    clock.advance(3600)  # a long idle period refills to the burst, never beyond
    assert run(lim, p, 100) == 60


def test_default_rpm_comes_from_config_and_is_exact_at_600() -> None:
    lim, clock = make(default_rpm=600, default_tpm=10**9)
    p = key()
    assert run(lim, p, 1000) == 600
    for _ in range(50):  # 0.1 s per request, inexact in binary: no drift either way
        clock.advance(0.1)
        assert run(lim, p, 5) == 1


def test_limit_change_keeps_what_was_used() -> None:
    lim, _ = make(default_tpm=10**9)
    assert run(lim, key(rpm=60), 40) == 40
    assert run(lim, key(rpm=100), 100) == 60  # 40 of 100 already used


# --- tokens per minute --------------------------------------------------------------


def test_tpm_reserves_then_trues_up_with_actual_usage() -> None:
    lim, clock = make(default_rpm=10**6)
    p = key(tpm=1000)
    t = lim.acquire(p, 600)  # prompt estimate + max_tokens
    assert lim.headers(t)["x-ratelimit-remaining-tokens"] == "400"
    lim.release(t, 100)  # refund 500
    t = lim.acquire(p, 0)
    assert lim.headers(t)["x-ratelimit-remaining-tokens"] == "900"
    lim.release(t, 0)
    t = lim.acquire(p, 100)
    lim.release(t, 400)  # used more than reserved: charged the difference
    t = lim.acquire(p, 0)
    assert lim.headers(t)["x-ratelimit-remaining-tokens"] == "500"
    lim.release(t, 0)
    t = lim.acquire(p, 500)
    err = denied(lim, p, 1)
    assert err.code == "rate_limit_tokens"
    assert err.message == ("Rate limit reached for tokens per min (TPM): Limit 1000, Used 1000, "
                           "Requested 1. Please try again in 60ms.")
    assert err.headers["x-ratelimit-remaining-tokens"] == "0"
    assert err.headers["Retry-After"] == "1"
    lim.release(t, 500)
    clock.advance(0.06)
    lim.release(lim.acquire(p, 1), 1)


def test_tpm_true_up_never_exceeds_capacity_and_charges_after_refill() -> None:
    lim, clock = make(default_rpm=10**6)
    p = key(tpm=1000)
    t = lim.acquire(p, 500)
    clock.advance(60)  # bucket full again while the request ran
    lim.release(t, 0)  # refund: still capped at 1000
    t2 = lim.acquire(p, 0)
    assert lim.headers(t2)["x-ratelimit-remaining-tokens"] == "1000"
    lim.release(t2, 0)
    t = lim.acquire(p, 100)
    clock.advance(120)
    lim.release(t, 700)  # 600 more than reserved, charged from now
    t2 = lim.acquire(p, 0)
    assert lim.headers(t2)["x-ratelimit-remaining-tokens"] == "400"
    lim.release(t2, 0)


def test_usage_beyond_the_limit_is_debt_that_must_refill() -> None:
    lim, clock = make(default_rpm=10**6)
    p = key(tpm=600)  # 10 tokens/s
    lim.release(lim.acquire(p, 100), 1200)  # 600 over the whole burst
    err = denied(lim, p, 10)
    assert err.retry_after_s == pytest.approx(61.0)
    clock.advance(61)
    lim.release(lim.acquire(p, 10), 10)


def test_request_larger_than_tpm_is_refused_as_openai_does() -> None:
    lim, _ = make(default_rpm=10**6)
    err = denied(lim, key(tpm=1000), 1001)
    assert err.code == "rate_limit_tokens"
    assert err.message.startswith("Request too large for tokens per min (TPM): Limit 1000, "
                                  "Requested 1001.")
    # Waiting cannot help: no Retry-After, and the SDKs are told not to retry.
    assert "Retry-After" not in err.headers
    assert err.headers["x-should-retry"] == "false"


# --- concurrency ------------------------------------------------------------------


def test_concurrency_cap_counts_in_flight_and_release_is_idempotent() -> None:
    lim, _ = make(default_rpm=60, default_tpm=10**9)
    p = key(conc=2)
    a, b = lim.acquire(p, 1), lim.acquire(p, 1)
    err = denied(lim, p)
    assert err.code == "rate_limit_concurrency"
    assert err.message.startswith("Too many concurrent requests: Limit 2, In flight 2.")
    assert err.headers["Retry-After"] == "1"
    assert err.headers["x-ratelimit-remaining-requests"] == "58"  # the refusal cost nothing
    lim.release(a, 1)
    lim.release(a, 1)  # twice: frees one slot only
    c = lim.acquire(p, 1)
    assert denied(lim, p).code == "rate_limit_concurrency"
    for t in (b, c):
        lim.release(t, 1)


def test_default_concurrency_from_config() -> None:
    lim, _ = make(default_max_concurrent=3)
    held = [lim.acquire(key(), 1) for _ in range(3)]
    assert denied(lim, key()).code == "rate_limit_concurrency"
    lim.release(held[0], 1)
    held[0] = lim.acquire(key(), 1)


# --- headers ----------------------------------------------------------------------


def test_headers_on_success() -> None:
    lim, _ = make()
    t = lim.acquire(key(rpm=60, tpm=60_000), 1000)
    assert lim.headers(t) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "60000",
        "x-ratelimit-remaining-tokens": "59000",
        "x-ratelimit-reset-tokens": "1s",
    }
    lim.release(t, 1000)


def test_headers_on_429_and_reset_is_time_to_full() -> None:
    lim, clock = make(default_tpm=600_000)
    p = key(rpm=60)
    assert run(lim, p, 60, tokens=1000) == 60
    err = denied(lim, p)
    assert set(err.headers) >= HEADER_NAMES
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert err.headers["x-ratelimit-remaining-tokens"] == "540000"
    assert err.headers["x-ratelimit-reset-tokens"] == "6s"
    clock.advance(0.988)
    assert denied(lim, p).headers["x-ratelimit-reset-requests"] == "59.012s"


# --- account-level overrides --------------------------------------------------------


def test_account_limits_are_shared_by_its_keys_and_also_its_keys_default() -> None:
    lim, clock = make(default_rpm=5, default_tpm=10**9)
    lim.set_account_limits(7, rpm=8)
    k1, k2 = key(key_id=1, account_id=7), key(key_id=2, account_id=7)
    other = key(key_id=3, account_id=8)
    assert run(lim, k1, 6) == 6  # the account's 8 is also k1's default, not cfg's 5
    assert run(lim, k2, 6) == 2  # 8 shared across the account
    err = denied(lim, k2)
    assert err.code == "rate_limit_requests"
    assert "(RPM) on this account: Limit 8, Used 8" in err.message
    assert run(lim, other, 10) == 5  # another account: cfg defaults, untouched
    clock.advance(7.5)  # one request per 7.5 s on the account bucket
    assert run(lim, k1, 5) == 1


def test_key_override_and_account_bucket_both_bind_and_headers_show_the_tighter() -> None:
    lim, _ = make(default_tpm=10**9)
    lim.set_account_limits(7, rpm=100, tpm=1000)
    p = key(rpm=10, tpm=5000, key_id=1, account_id=7)
    t = lim.acquire(p, 900)
    h = lim.headers(t)
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("10", "9")
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == ("1000", "100")
    lim.release(t, 900)
    assert denied(lim, p, 200).message.startswith(
        "Rate limit reached for tokens per min (TPM) on this account: Limit 1000, Used 900")
    assert run(lim, p, 20) == 9  # the account refusal consumed nothing from the key


def test_account_concurrency_and_clearing_overrides() -> None:
    lim, _ = make(default_max_concurrent=10)
    lim.set_account_limits(7, max_concurrent=2)
    k1, k2 = key(key_id=1, account_id=7), key(key_id=2, account_id=7)
    held = [lim.acquire(k1, 1), lim.acquire(k2, 1)]
    err = denied(lim, k1)
    assert err.code == "rate_limit_concurrency" and "on this account" in err.message
    lim.set_account_limits(7)  # all None: cleared
    held.append(lim.acquire(k1, 1))
    for t in held:
        lim.release(t, 1)
    lim.set_account_limits(7, max_concurrent=1)
    held = [lim.acquire(k1, 1)]
    assert denied(lim, k2).code == "rate_limit_concurrency"
    lim.release(held[0], 1)


def test_account_override_on_one_dimension_leaves_the_others_per_key() -> None:
    lim, _ = make(default_rpm=3, default_tpm=10**6)
    lim.set_account_limits(9, tpm=1000)
    k1, k2 = key(key_id=1, account_id=9), key(key_id=2, account_id=9)
    assert run(lim, k1, 10) == 3 and run(lim, k2, 10) == 3  # RPM stays per key
    t = lim.acquire(key(key_id=3, account_id=9), 400)
    h = lim.headers(t)
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-limit-tokens"]) == ("3", "1000")
    assert h["x-ratelimit-remaining-tokens"] == "594"  # 6 + 400 used account-wide
    lim.release(t, 400)


# --- bounded memory (keys) ------------------------------------------------------------


def test_key_table_is_bounded_but_never_drops_a_key_with_requests_in_flight() -> None:
    lim, _ = make(max_tracked=100)
    busy = key(conc=1, key_id=0)
    held = lim.acquire(busy, 1)
    for k in range(1, 20_000):
        lim.release(lim.acquire(key(key_id=k), 1), 1)
        assert lim.tracked() <= 101
    assert denied(lim, busy).code == "rate_limit_concurrency"  # its count survived
    lim.release(held, 1)
    lim.release(lim.acquire(busy, 1), 1)


# --- IpGuard --------------------------------------------------------------------------


def guard(**cfg: object) -> tuple[IpGuard, Clock]:
    clock = Clock()
    return IpGuard(LimitsConfig(**cfg), clock=clock), clock  # type: ignore[arg-type]


def ip_refused(g: IpGuard, ip: str) -> RateLimited:
    with pytest.raises(RateLimited) as exc:
        g.check(ip)
    return exc.value


def test_ip_bucket_for_unauthenticated_traffic() -> None:
    g, clock = guard(ip_rpm=5)
    for _ in range(5):
        g.check("198.51.100.1")
    err = ip_refused(g, "198.51.100.1")
    assert err.code == "rate_limit_ip" and err.headers["Retry-After"] == "12"
    g.check("198.51.100.2")  # per IP
    clock.advance(12)
    g.check("198.51.100.1")
    ip_refused(g, "198.51.100.1")


def test_failures_back_off_then_block_then_unblock() -> None:
    g, clock = guard(ip_failures_before_block=6, ip_block_s=300)
    ip = "203.0.113.7"
    for _ in range(3):  # a few typos are free
        g.failure(ip)
        g.check(ip)
    g.failure(ip)  # 4th: 1 s backoff
    err = ip_refused(g, ip)
    assert err.code == "too_many_failed_attempts" and err.headers["Retry-After"] == "1"
    clock.advance(1)
    g.check(ip)
    g.failure(ip)  # 5th: 2 s
    assert ip_refused(g, ip).retry_after_s == pytest.approx(2)
    g.check("203.0.113.8")  # other IPs unaffected
    g.failure(ip)  # 6th: blocked for ip_block_s
    assert ip_refused(g, ip).retry_after_s == pytest.approx(300)
    with pytest.raises(RateLimited):
        g.check_blocked(ip)
    clock.advance(299.9)
    ip_refused(g, ip)
    clock.advance(0.1)
    g.check(ip)
    g.check_blocked(ip)
    g.failure(ip)  # straight after the block the record is still warm: blocked again
    assert ip_refused(g, ip).retry_after_s == pytest.approx(300)
    clock.advance(600)  # a block and a quiet period later it is forgotten
    for _ in range(3):
        g.failure(ip)
    g.check(ip)


def test_success_forgets_failures_and_check_blocked_creates_nothing() -> None:
    g, _ = guard(ip_failures_before_block=5)
    for _ in range(4):
        g.failure("192.0.2.1")
    ip_refused(g, "192.0.2.1")
    g.success("192.0.2.1")
    g.check("192.0.2.1")
    n = g.tracked()
    for i in range(100):
        g.check_blocked(f"192.0.2.{i}")
    assert g.tracked() == n


def test_ipv6_is_tracked_per_64_and_mapped_ipv4_as_ipv4() -> None:
    g, _ = guard(ip_failures_before_block=2)
    g.failure("2001:db8:1:2::1")
    g.failure("2001:db8:1:2:ffff::9")  # same /64: blocked
    ip_refused(g, "2001:db8:1:2::abcd")
    g.check("2001:db8:1:3::1")  # the next /64 is someone else
    g.failure("::ffff:192.0.2.9")
    g.failure("192.0.2.9")
    ip_refused(g, "192.0.2.9")


def test_login_throttling_per_account() -> None:
    g, clock = guard()
    for _ in range(5):
        g.login_failure("a@example.com")
        g.check_login("a@example.com")
    waits = []
    for _ in range(9):
        g.login_failure("a@example.com")
        with pytest.raises(RateLimited) as exc:
            g.check_login("a@example.com")
        assert exc.value.code == "too_many_login_attempts"
        waits.append(exc.value.retry_after_s)
    assert waits == pytest.approx([1, 2, 4, 8, 16, 32, 60, 60, 60])  # capped: no lockout
    g.check_login("b@example.com")
    clock.advance(60)
    g.check_login("a@example.com")
    g.login_failure("a@example.com")
    g.login_success("a@example.com")
    g.check_login("a@example.com")


def test_blocked_ips_survive_eviction_pressure() -> None:
    g, _ = guard(max_tracked=100, ip_failures_before_block=1)
    g.failure("192.0.2.1")
    for i in range(1000):
        g.check(f"10.0.{i // 256}.{i % 256}")
    assert g.tracked() <= 101
    ip_refused(g, "192.0.2.1")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_million_distinct_ips_stay_within_the_memory_bound() -> None:
    # Bound: max_tracked entries, <= 400 bytes each (measured ~320 with CPython 3.11):
    # 80 MB at the default 200,000 however many addresses pass through.
    cfg = LimitsConfig()
    clock = Clock()
    g = IpGuard(cfg, clock=clock)
    started = time.perf_counter()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(1_000_000):
            ip = f"{10 + (i >> 24)}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
            g.failure(ip)
            g.check(ip)
            clock.advance(0.0001)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert g.tracked() <= cfg.max_tracked
    assert used <= 400 * cfg.max_tracked, f"{used / g.tracked():.0f} bytes per entry"
    print(f"\n1M IPs: {g.tracked()} tracked, {used / 1e6:.1f} MB, "
          f"{used / g.tracked():.0f} B/entry, {time.perf_counter() - started:.1f} s")


# --- client_ip ------------------------------------------------------------------------

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ffff::/48"))


@pytest.mark.parametrize(("peer", "xff", "trusted", "expected"), [
    ("198.51.100.7", "1.2.3.4", (), "198.51.100.7"),  # no trusted proxies: the peer
    ("198.51.100.7", "1.2.3.4", PROXIES, "198.51.100.7"),  # spoofed by an untrusted peer
    ("10.0.0.1", None, PROXIES, "10.0.0.1"),
    ("10.0.0.1", "203.0.113.9", PROXIES, "203.0.113.9"),
    # The client's own (spoofed) entries sit left of the first untrusted one.
    ("10.0.0.1", "1.1.1.1, 203.0.113.9, 10.0.0.5", PROXIES, "203.0.113.9"),
    ("10.0.0.1", "10.9.9.9,10.0.0.5", PROXIES, "10.9.9.9"),  # all trusted: the left-most
    ("10.0.0.1", "203.0.113.9, garbage", PROXIES, "10.0.0.1"),  # stop at the last sure hop
    ("10.0.0.1", "203.0.113.9:4711", PROXIES, "203.0.113.9"),
    ("10.0.0.1", "[2001:db8::1]:443", PROXIES, "2001:db8::1"),
    ("::ffff:10.0.0.1", "203.0.113.9", PROXIES, "203.0.113.9"),  # dual-stack socket
    ("2001:db8:ffff::2", "2001:0db8:0000::0001", PROXIES, "2001:db8::1"),  # canonical
    (None, "1.2.3.4", PROXIES, "unknown"),
])
def test_client_ip(peer: str | None, xff: str | None,
                   trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
                   expected: str) -> None:
    assert client_ip(peer, xff, trusted) == expected
    assert client_ip(peer, xff, trusted) == expected  # and again, from the cache


def test_ticket_is_opaque_but_typed() -> None:
    lim, _ = make()
    t = lim.acquire(key(), 5)
    assert isinstance(t, Ticket) and t.tokens == 5
    lim.release(t, 5)
