"""Source IPs and logins: the abuse guard, and which address a request came from.

``IpGuard`` throttles unauthenticated and failed traffic per source IP (backoff, then a
block) and logins per account; ``client_ip`` picks the client's address from the peer
and ``X-Forwarded-For`` (trusted proxies only). O(1) per call, no I/O, LRU-bounded
tables (``limiter.touch``). Source IPs live only here, in memory: never logged, never
persisted (contract promise 4). Not thread-safe: call from the event loop thread only.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

from flintproxy.config import LimitsConfig
from flintproxy.errors import RateLimited
from flintproxy.gate.limiter import TOL, format_reset, touch

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# IpGuard: failures allowed before any backoff, then 1 s, 2 s, 4 s... per failure.
_IP_FREE_FAILURES = 3
# Per-account login backoff has no hard block and a low cap: a stranger could
# otherwise lock a user out of their own account.
_LOGIN_FREE_FAILURES = 5
_LOGIN_BACKOFF_CAP_S = 60.0


class _Guarded:
    """One IP (or login account): its request bucket and its failure record."""

    __slots__ = ("fails", "tat", "until")

    def __init__(self) -> None:
        self.tat = 0.0
        self.fails = 0
        self.until = 0.0  # refused until then (backoff or block); forgotten block_s later


class IpGuard:
    """Unauthenticated / failed-auth traffic per source IP, and login throttling per account.

    IPv6 clients are tracked per /64 (one subscriber's usual allocation), so one
    host cannot dodge its bucket or its block by rotating addresses.
    """

    def __init__(self, cfg: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._max = cfg.max_tracked
        self._iv = 60.0 / cfg.ip_rpm
        self._burst = (cfg.ip_rpm + TOL) * self._iv
        self._threshold = cfg.ip_failures_before_block
        self._block_s = cfg.ip_block_s
        self._ips: OrderedDict[str, _Guarded] = OrderedDict()
        self._logins: OrderedDict[str, _Guarded] = OrderedDict()

    def tracked(self) -> int:
        return len(self._ips) + len(self._logins)

    def check(self, ip: str) -> None:
        """Count one unauthenticated request from ``ip``; raise if blocked or over ip_rpm."""
        now = self._clock()
        g = self._get(self._ips, ip_bucket(ip), now)
        if g.until > now:
            _refuse_ip(g.until - now)
        t = (g.tat if g.tat > now else now) + self._iv
        if t - now > self._burst:
            wait = t - now - self._burst
            raise RateLimited(
                "Too many unauthenticated requests from your address. Please try again in "
                f"{format_reset(wait)}.", retry_after_s=wait, code="rate_limit_ip")
        g.tat = t

    def check_blocked(self, ip: str) -> None:
        """Raise if ``ip`` is in backoff or blocked; consumes nothing, creates nothing."""
        g = self._ips.get(ip_bucket(ip))
        if g is not None and g.until:
            now = self._clock()
            if g.until > now:
                _refuse_ip(g.until - now)

    def failure(self, ip: str) -> None:
        """A failed auth or login from ``ip``: escalating backoff, then a block."""
        now = self._clock()
        g = self._get(self._ips, ip_bucket(ip), now)
        n = _record_failure(g, now, self._block_s)
        if n >= self._threshold:
            g.until = now + self._block_s
        elif n > _IP_FREE_FAILURES:
            g.until = now + min(2.0 ** (n - _IP_FREE_FAILURES - 1), self._block_s)

    def success(self, ip: str) -> None:
        """Forget ``ip``'s failures (call after a successful login, not per request)."""
        g = self._ips.get(ip_bucket(ip))
        if g is not None:
            g.fails, g.until = 0, 0.0

    def check_login(self, account: str) -> None:
        """Raise if logins to ``account`` (its normalised email) are in backoff."""
        g = self._logins.get(account)
        if g is not None and g.until:
            wait = g.until - self._clock()
            if wait > 0:
                raise RateLimited(
                    "Too many failed login attempts for this account. Please try again in "
                    f"{format_reset(wait)}.", retry_after_s=wait, code="too_many_login_attempts")

    def login_failure(self, account: str) -> None:
        now = self._clock()
        g = self._get(self._logins, account, now)
        n = _record_failure(g, now, self._block_s)
        if n > _LOGIN_FREE_FAILURES:
            g.until = now + min(2.0 ** (n - _LOGIN_FREE_FAILURES - 1), _LOGIN_BACKOFF_CAP_S)

    def login_success(self, account: str) -> None:
        self._logins.pop(account, None)

    def _get(self, table: OrderedDict[str, _Guarded], k: str, now: float) -> _Guarded:
        g = table.get(k)
        if g is None:
            return touch(table, k, _Guarded, self._max, lambda g: g.until > now)
        table.move_to_end(k)
        return g


def _record_failure(g: _Guarded, now: float, forget_s: float) -> int:
    if g.fails and now >= g.until + forget_s:
        g.fails = 0  # quiet long enough since the last failure or block: start over
    g.fails += 1
    g.until = now
    return g.fails


def _refuse_ip(wait: float) -> None:
    raise RateLimited(
        "Too many failed authentication attempts from your address. Please try again in "
        f"{format_reset(wait)}.", retry_after_s=wait, code="too_many_failed_attempts")


def ip_bucket(ip: str) -> str:
    """What one client's address counts as: itself, or its /64 for IPv6."""
    if ":" not in ip:
        return ip
    try:
        a = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if a.ipv4_mapped is not None:
        return str(a.ipv4_mapped)
    return f"{int(a) >> 64:x}::/64"


# --- client address --------------------------------------------------------------


def _addr(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("["):  # "[v6]:port"
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # "v4:port"
        text = text.partition(":")[0]
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    return (a.ipv4_mapped or a) if isinstance(a, ipaddress.IPv6Address) else a


# id(trusted) -> (trusted, {text: (canonical address or None if garbled, trusted?)}).
# Peers and proxy hops are mostly the same few addresses and parsing costs ~2 µs;
# keyed by identity because hashing network objects is slow too. Memory only.
_SEEN: dict[int, tuple[tuple[Network, ...], dict[str, tuple[str | None, bool]]]] = {}


def _classify(text: str, trusted: tuple[Network, ...]) -> tuple[str | None, bool]:
    entry = _SEEN.get(id(trusted))
    if entry is None or entry[0] is not trusted:
        if len(_SEEN) >= 8:
            _SEEN.clear()
        entry = _SEEN[id(trusted)] = (trusted, {})
    known = entry[1]
    hit = known.get(text)
    if hit is None:
        if len(known) >= 4096:
            known.clear()
        a = _addr(text)
        hit = known[text] = (None, False) if a is None else (
            str(a), any(a.version == n.version and a in n for n in trusted))
    return hit


def is_trusted_proxy(peer: str, trusted: tuple[Network, ...]) -> bool:
    """Whether the socket peer is one of ``limits.trusted_proxies``."""
    return bool(trusted) and _classify(peer, trusted)[1]


def client_ip(peer: str | None, forwarded_for: str | None,
              trusted: tuple[Network, ...]) -> str:
    """The client address: the socket peer or, when the peer is a trusted proxy, the
    right-most X-Forwarded-For entry that is not itself a trusted proxy.

    Join repeated X-Forwarded-For headers with "," first. Entries left of the first
    untrusted one are client-supplied and ignored, so they cannot spoof anything.
    """
    if peer is None:  # e.g. a unix socket
        return "unknown"
    if not trusted or not forwarded_for or not _classify(peer, trusted)[1]:
        return peer
    hop = peer
    for entry in reversed(forwarded_for.split(",")):
        addr, is_proxy = _classify(entry, trusted)
        if addr is None:  # garbled: stop at the last hop we can vouch for
            return hop
        hop = addr
        if not is_proxy:
            return hop
    return hop  # every hop is a trusted proxy: the left-most is the origin
