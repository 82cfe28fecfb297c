"""In-memory rate limits and abuse protection: no I/O, no awaits, O(1) per call.

Every bucket is GCRA, the one-float form of a token bucket: ``tat`` (theoretical
arrival time) minus ``now`` is how much of the burst is in use, in seconds, and
each unit costs ``iv`` seconds (60 / limit-per-minute). Refill is implicit, so
there are no timers or tasks; a bucket whose ``tat`` is past is full.

Tables are LRU-bounded OrderedDicts of at most ``cfg.max_tracked`` entries each,
so a flood of distinct keys, emails or IPs cannot grow memory without limit.
Source IPs are kept by ``gate.ipguard``, never here.
Not thread-safe: call from the event loop thread only.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from flintproxy.config import LimitsConfig
from flintproxy.errors import LimitNeverFits, RateLimited
from flintproxy.gate.gate import Principal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_K = TypeVar("_K")
_V = TypeVar("_V")

TOL = 1e-6  # in units: float noise must never turn an exact fit into a 429
_UNLIMITED = sys.maxsize

# Formatting costs ~0.7 µs and the same few thousand values recur on a busy server.
_RESETS: dict[int, str] = {}


def format_reset(seconds: float) -> str:
    """A duration as OpenAI's headers write it: "12ms", "1s", "8.64s", "6m0s", "1h2m3s"."""
    ms = int(seconds * 1000.0 + 0.999) if seconds > 0 else 0  # ceil, forgiving float noise
    text = _RESETS.get(ms)
    if text is not None:
        return text
    if len(_RESETS) >= 8192:  # bounded; refills with whatever is current
        _RESETS.clear()
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, frac = divmod(rest, 1000)
    sec = f"{s}.{frac:03d}".rstrip("0") if frac else str(s)
    if ms < 1000:
        text = f"{ms}ms" if ms else "0s"
    else:
        text = f"{h}h{m}m{sec}s" if h else f"{m}m{sec}s" if m else f"{sec}s"
    _RESETS[ms] = text
    return text


def touch(table: OrderedDict[_K, _V], k: _K, new: Callable[[], _V], cap: int,
           keep: Callable[[_V], bool]) -> _V:
    """Get-or-create ``k`` as most recently used, evicting the least recently used."""
    v = table.get(k)
    if v is not None:
        table.move_to_end(k)
        return v
    v = table[k] = new()
    if len(table) > cap:
        # A few tries spare busy/blocked entries; bounded so eviction stays O(1)
        # (the table may then exceed its cap by one).
        for _ in range(4):
            old_k, old = table.popitem(last=False)
            if not keep(old):
                break
            table[old_k] = old
    return v


class AccountLimits(NamedTuple):
    """Account-wide overrides (None: no account-wide limit on that dimension)."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None


class _State:
    """The RPM and TPM buckets and in-flight count of one key or account."""

    __slots__ = ("acct", "busy", "conc", "kconc", "krpm", "ktpm", "rburst", "riv", "rlim",
                 "rtat", "tburst", "tiv", "tlim", "ttat")

    def __init__(self) -> None:
        self.rtat = self.ttat = self.riv = self.tiv = self.rburst = self.tburst = 0.0
        self.rlim = self.tlim = self.busy = 0  # lim 0: unlimited (account without override)
        self.conc = _UNLIMITED
        # The inputs the limits were derived from, to notice changes cheaply.
        self.krpm: int | None = -1
        self.ktpm: int | None = -1
        self.kconc: int | None = -1
        self.acct: AccountLimits | None = None

    def tune(self, rpm: int | None, tpm: int | None, conc: int | None, now: float) -> None:
        self.rtat, self.riv, self.rburst, self.rlim = _retime(self.rtat, self.riv, rpm, now)
        self.ttat, self.tiv, self.tburst, self.tlim = _retime(self.ttat, self.tiv, tpm, now)
        self.conc = _UNLIMITED if conc is None else max(1, conc)


def _retime(tat: float, iv: float, limit: int | None,
            now: float) -> tuple[float, float, float, int]:
    if limit is None:
        return 0.0, 0.0, TOL, 0
    limit = max(1, limit)
    new_iv = 60.0 / limit
    # A limit change keeps the units in use, not the seconds.
    used = (tat - now) / iv if iv and tat > now else 0.0
    return now + used * new_iv if used else tat, new_iv, (limit + TOL) * new_iv, limit


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _busy(st: _State) -> bool:
    return st.busy > 0


class Ticket:
    """What one admitted request holds until ``Limiter.release``."""

    __slots__ = ("acct", "done", "key", "tokens")

    def __init__(self, key: _State, acct: _State | None, tokens: int) -> None:
        self.key = key
        self.acct = acct
        self.tokens = tokens  # the TPM reservation
        self.done = False


class Limiter:
    """Per-key (and per-account) RPM, TPM and concurrency limits.

    A key's limits: ``Principal.rpm/tpm/max_concurrent``, else its account's override
    (``set_account_limits``), else ``cfg.default_*``. An account with overrides also
    gets account-wide buckets, shared by all its keys, on the dimensions it sets.
    """

    def __init__(self, cfg: LimitsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        self._clock = clock
        self._max = cfg.max_tracked
        self._keys: OrderedDict[int, _State] = OrderedDict()
        self._accts: OrderedDict[int, _State] = OrderedDict()
        self._acct_limits: dict[int, AccountLimits] = {}

    def set_account_limits(self, account_id: int, rpm: int | None = None,
                           tpm: int | None = None, max_concurrent: int | None = None) -> None:
        """Set (all None: clear) an account's overrides; applies from its next request."""
        new = AccountLimits(rpm, tpm, max_concurrent)
        if new == AccountLimits():
            self._acct_limits.pop(account_id, None)
        elif self._acct_limits.get(account_id) != new:  # unchanged: keep it, skip retuning
            self._acct_limits[account_id] = new

    def tracked(self) -> int:
        return len(self._keys) + len(self._accts)

    def acquire(self, principal: Principal, tokens: int) -> Ticket:
        """Admit one request reserving ``tokens`` (prompt estimate + max tokens), or raise.

        Checks key RPM, TPM and concurrency, then the account's when it has
        overrides; consumes nothing unless every check passes.
        """
        now = self._clock()
        kid = principal.key_id
        al = self._acct_limits.get(principal.account_id)
        keys = self._keys
        st = keys.get(kid)  # _touch inlined: this is the hot path
        if st is None:
            st = touch(keys, kid, _State, self._max, _busy)
        else:
            keys.move_to_end(kid)
        if (st.krpm != principal.rpm or st.ktpm != principal.tpm
                or st.kconc != principal.max_concurrent or st.acct is not al):
            self._tune_key(st, principal, al, now)
        if tokens < 0:
            tokens = 0
        rt = (st.rtat if st.rtat > now else now) + st.riv
        tt = (st.ttat if st.ttat > now else now) + tokens * st.tiv
        if rt - now > st.rburst or tt - now > st.tburst or st.busy >= st.conc:
            self._deny(st, None, tokens, now, "")
        ast = None
        if al is not None:
            ast = touch(self._accts, principal.account_id, _State, self._max, _busy)
            if ast.acct is not al:
                ast.tune(al.rpm, al.tpm, al.max_concurrent, now)
                ast.acct = al
            art = (ast.rtat if ast.rtat > now else now) + ast.riv
            att = (ast.ttat if ast.ttat > now else now) + tokens * ast.tiv
            if art - now > ast.rburst or att - now > ast.tburst or ast.busy >= ast.conc:
                self._deny(ast, st, tokens, now, " on this account")
            ast.rtat, ast.ttat = art, att
            ast.busy += 1
        st.rtat, st.ttat = rt, tt
        st.busy += 1
        return Ticket(st, ast, tokens)

    async def admit(self, principal: Principal, tokens: int) -> Ticket:
        """``acquire`` as the gate's ``RateLimits`` protocol has it (the gate calls
        ``acquire`` itself when it holds this in-memory limiter: no await)."""
        return self.acquire(principal, tokens)

    def release(self, ticket: Ticket, actual_tokens: int) -> None:
        """Free the concurrency slot and true up TPM to ``actual_tokens``; idempotent."""
        if ticket.done:
            return
        ticket.done = True
        diff = max(0, actual_tokens) - ticket.tokens
        now = self._clock() if diff > 0 else 0.0
        for st in (ticket.key, ticket.acct):
            if st is None:
                continue
            st.busy -= 1
            if diff > 0:  # charged from now if the bucket refilled meanwhile
                st.ttat = (st.ttat if st.ttat > now else now) + diff * st.tiv
            elif diff:  # a refund can at most refill the bucket (tat <= now is full)
                st.ttat += diff * st.tiv

    def headers(self, ticket: Ticket) -> dict[str, str]:
        """The six x-ratelimit-* headers, each trio from the tighter of key and account."""
        return _headers(ticket.key, ticket.acct, self._clock())

    def _tune_key(self, st: _State, p: Principal, al: AccountLimits | None, now: float) -> None:
        cfg, a = self._cfg, al or AccountLimits()
        st.tune(_first(p.rpm, a.rpm, cfg.default_rpm), _first(p.tpm, a.tpm, cfg.default_tpm),
                _first(p.max_concurrent, a.max_concurrent, cfg.default_max_concurrent), now)
        st.krpm, st.ktpm, st.kconc, st.acct = p.rpm, p.tpm, p.max_concurrent, al

    def _deny(self, st: _State, key: _State | None, tokens: int, now: float, scope: str) -> None:
        hdrs = _headers(key or st, st if key else None, now)
        # Same expressions as in acquire, so float rounding cannot pick another cause.
        rt = (st.rtat if st.rtat > now else now) + st.riv
        tt = (st.ttat if st.ttat > now else now) + tokens * st.tiv
        if rt - now > st.rburst:
            what, lim, used, asked = "requests", st.rlim, round((rt - now) / st.riv) - 1, 1
            wait = rt - now - lim * st.riv
        elif tt - now > st.tburst:
            if tokens > st.tlim:  # can never fit: OpenAI's "Request too large"
                raise LimitNeverFits(
                    f"Request too large for tokens per min (TPM){scope}: Limit {st.tlim}, "
                    f"Requested {tokens}. The input or output tokens must be reduced in "
                    "order to run successfully.", code="rate_limit_tokens", headers=hdrs)
            what, lim, used, asked = "tokens", st.tlim, round((tt - now) / st.tiv) - tokens, tokens
            wait = tt - now - lim * st.tiv
        else:
            raise RateLimited(
                f"Too many concurrent requests{scope}: Limit {st.conc}, In flight {st.busy}. "
                "Please try again when one completes.",
                retry_after_s=1.0, code="rate_limit_concurrency", headers=hdrs)
        unit = "requests per min (RPM)" if what == "requests" else "tokens per min (TPM)"
        raise RateLimited(
            f"Rate limit reached for {unit}{scope}: Limit {lim}, Used {used}, Requested {asked}. "
            f"Please try again in {format_reset(wait)}.",
            retry_after_s=wait, code="rate_limit_" + what, headers=hdrs)


def _headers(key: _State, acct: _State | None, now: float) -> dict[str, str]:
    # Written out flat: this runs for every successful response.
    rl, rs = key.rlim, key.rtat - now
    rr = int(rl - rs / key.riv + TOL) if rs > 0 else rl
    tl, ts = key.tlim, key.ttat - now
    tr = int(tl - ts / key.tiv + TOL) if ts > 0 else tl
    if acct is not None:
        if acct.rlim:
            ars = acct.rtat - now
            arr = int(acct.rlim - ars / acct.riv + TOL) if ars > 0 else acct.rlim
            if arr < rr:
                rl, rr, rs = acct.rlim, arr, ars
        if acct.tlim:
            ats = acct.ttat - now
            atr = int(acct.tlim - ats / acct.tiv + TOL) if ats > 0 else acct.tlim
            if atr < tr:
                tl, tr, ts = acct.tlim, atr, ats
    return {
        "x-ratelimit-limit-requests": str(rl),
        "x-ratelimit-remaining-requests": str(rr) if rr > 0 else "0",
        "x-ratelimit-reset-requests": format_reset(rs),
        "x-ratelimit-limit-tokens": str(tl),
        "x-ratelimit-remaining-tokens": str(tr) if tr > 0 else "0",
        "x-ratelimit-reset-tokens": format_reset(ts),
    }
