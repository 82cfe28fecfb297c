"""Limits exact across workers and nodes: the Redis twin of ``gate.limiter``.

Same semantics as the in-memory ``Limiter`` (GCRA RPM and TPM per key, and per
account when it has overrides; concurrency per key and account; the same 429
messages, Retry-After and x-ratelimit-* headers), with every bucket in Redis so
that N processes admit together what one would admit alone.

Round trips, the budget being ≤ 1 + ε per request:
    admit    ONE EVALSHA of ``ADMIT``: on Redis ``TIME`` it checks every scope (key,
             account) on every dimension and, only if all pass, takes them all, and
             answers what the headers need. Nothing is taken when one check fails.
    release  nothing on the request's path: the finished request's slot release and
             token true-up are queued, and ``flush`` (a job of the composition root,
             every ``cluster.release_interval_s``) sends all queued ones in one
             EVALSHA of ``RELEASE``.
    renew    every slot_ttl/3 one EVALSHA extends the slots of this node's requests
             still in flight: a slot not renewed for ``slot_ttl_s`` (its node
             crashed) expires and frees its place.
``admissions`` and the link's ``round_trips`` are the gateway's own counters.

The scripts are in ``gate.limitscripts``. Times are Redis's, in microseconds (µs since
the epoch fit a double exactly to a quarter µs); stored with %.17g, never Lua's
14-digit default.

Redis down (``store.redislink`` turns every failure into SharedStateDown):
``cluster.on_redis_down = "closed"`` answers 503 ``rate_limiter_unavailable``;
``"open"`` admits by an in-memory ``Limiter`` of this process at limit / nodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import secrets
from collections.abc import Sequence
from typing import NamedTuple

from flintproxy.config import Config, LimitsConfig, RedisDown
from flintproxy.errors import LimitNeverFits, RateLimited, RateLimiterUnavailable, SharedStateDown
from flintproxy.gate.gate import Principal
from flintproxy.gate.limiter import TOL, AccountLimits, Limiter, Ticket, format_reset
from flintproxy.gate.limitscripts import ADMIT, RELEASE, RENEW
from flintproxy.store.redislink import Arg, RedisLink

__all__ = ["SharedLimiter", "SharedTicket"]

log = logging.getLogger("flintproxy.limits")

PREFIX = "flintproxy:lim:"
US = 1_000_000.0
# Releases sent per RELEASE call; more wait for the next tick (a bounded script run).
BATCH = 2000
# Releases kept while Redis is down; beyond, the oldest are dropped (their slots
# expire by themselves within slot_ttl_s; only their token true-up is lost).
MAX_PENDING = 100_000

class _Scope(NamedTuple):
    """One scope's limits as ADMIT takes them (µs per unit; 0 / -1: unlimited)."""

    riv: float
    tiv: float
    rlim: int
    tlim: int
    conc: int


def _scope(rpm: int | None, tpm: int | None, conc: int | None) -> _Scope:
    rlim = 0 if rpm is None else max(1, rpm)
    tlim = 0 if tpm is None else max(1, tpm)
    return _Scope(60 * US / rlim if rlim else 0.0, 60 * US / tlim if tlim else 0.0,
                  rlim, tlim, -1 if conc is None else max(1, conc))


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


class SharedTicket:
    """What one request admitted by Redis holds until ``release``."""

    __slots__ = ("done", "headers", "keys", "member", "tivs", "tokens")

    def __init__(self, member: str, keys: Sequence[str], tivs: Sequence[float],
                 tokens: int, headers: dict[str, str]) -> None:
        self.member = member
        self.keys = keys  # bucket, slots per scope
        self.tivs = tivs
        self.tokens = tokens
        self.headers = headers
        self.done = False


class SharedLimiter:
    """Admission against Redis; see the module docstring. Loop thread only."""

    def __init__(self, config: Config, link: RedisLink) -> None:
        self._cfg = config.limits
        cluster = config.cluster
        self.link = link
        self._ttl_us = cluster.slot_ttl_s * US
        self.renew_interval_s = cluster.slot_ttl_s / 3
        self.policy = cluster.on_redis_down
        self._fail_open = cluster.on_redis_down is RedisDown.OPEN
        self._nodes = cluster.nodes
        self._local = Limiter(_per_node(self._cfg, cluster.nodes))
        self._acct_limits: dict[int, AccountLimits] = {}
        self._keys: dict[int, tuple[object, _Scope, str, str]] = {}
        self._accts: dict[int, tuple[AccountLimits, _Scope, str, str]] = {}
        self._node = secrets.token_hex(6)
        self._ids = itertools.count()
        self._live: dict[str, SharedTicket] = {}
        self._pending: list[tuple[SharedTicket, int]] = []
        self.admissions = 0  # admitted or refused by Redis
        self.local_admissions = 0  # decided by the per-node fallback (fail-open)
        self.dropped_releases = 0

    # -- the gate's RateLimits protocol ------------------------------------------------

    def set_account_limits(self, account_id: int, rpm: int | None = None,
                           tpm: int | None = None, max_concurrent: int | None = None) -> None:
        new = AccountLimits(rpm, tpm, max_concurrent)
        if new == AccountLimits():
            self._acct_limits.pop(account_id, None)
        elif self._acct_limits.get(account_id) != new:
            self._acct_limits[account_id] = new
        n = self._nodes
        self._local.set_account_limits(account_id, *(_share(v, n) for v in new))

    async def admit(self, principal: Principal, tokens: int) -> SharedTicket | Ticket:
        """Admit one request reserving ``tokens`` or raise 429 (or 503, Redis down)."""
        if tokens < 0:
            tokens = 0
        kid = principal.key_id
        al = self._acct_limits.get(principal.account_id)
        inputs = (principal.rpm, principal.tpm, principal.max_concurrent, al)
        ks = self._keys.get(kid)
        if ks is None or ks[0] != inputs:
            ks = self._tune_key(principal, al, inputs)
        member = f"{self._node}:{next(self._ids)}"
        k = ks[1]
        if al is None:
            keys: tuple[str, ...] = (ks[2], ks[3])
            args: tuple[Arg, ...] = (tokens, member, self._ttl_us, *k)
            tivs: tuple[float, ...] = (k.tiv,)
            scopes: tuple[_Scope, ...] = (k,)
        else:
            acc = self._accts.get(principal.account_id)
            if acc is None or acc[0] is not al:
                acc = self._tune_account(principal.account_id, al)
            a = acc[1]
            keys = (ks[2], ks[3], acc[2], acc[3])
            args = (tokens, member, self._ttl_us, *k, *a)
            tivs = (k.tiv, a.tiv)
            scopes = (k, a)
        try:
            reply = await self.link.run(
                ADMIT, keys, args,
                lambda r: self._orphaned(r, member, keys, tivs, tokens))
        except SharedStateDown:
            return self._fallback(principal, tokens)
        self.admissions += 1
        r: list[bytes | int] = reply  # type: ignore[assignment]
        if r[0] != 1:
            self._deny(r, scopes, tokens)
        headers = _headers(r, scopes, after=True)
        ticket = SharedTicket(member, keys, tivs, tokens, headers)
        self._live[member] = ticket
        return ticket

    def headers(self, ticket: SharedTicket | Ticket) -> dict[str, str]:
        if isinstance(ticket, SharedTicket):
            return ticket.headers
        return self._local.headers(ticket)

    def release(self, ticket: SharedTicket | Ticket, actual_tokens: int) -> None:
        """Queue the slot release and true-up for the next ``flush``; idempotent, O(1)."""
        if not isinstance(ticket, SharedTicket):
            self._local.release(ticket, actual_tokens)
            return
        if ticket.done:
            return
        ticket.done = True
        self._live.pop(ticket.member, None)
        self._pending.append((ticket, max(0, actual_tokens) - ticket.tokens))

    def _orphaned(self, reply: object, member: str, keys: Sequence[str],
                  tivs: Sequence[float], tokens: int) -> None:
        # Admitted by Redis after the request was cancelled (its client left): give
        # the slot and the tokens back with the next flush.
        if isinstance(reply, list) and reply and reply[0] == 1:
            ticket = SharedTicket(member, keys, tivs, tokens, {})
            ticket.done = True
            self._pending.append((ticket, -tokens))

    # -- background jobs of the composition root -------------------------------------

    async def flush(self, now: bool = False) -> None:
        """Send the queued releases in one round trip (every release_interval_s);
        ``now``: without the sender task (at shutdown)."""
        pending = self._pending
        if not pending or not self.link.up:
            if len(pending) > MAX_PENDING:
                self.dropped_releases += len(pending) - MAX_PENDING
                del pending[:len(pending) - MAX_PENDING]
            return
        batch = pending[:BATCH]
        del pending[:BATCH]
        keys: list[str] = []
        args: list[Arg] = []
        for ticket, diff in batch:
            tivs = ticket.tivs
            keys.extend(ticket.keys)
            args.extend((len(tivs), diff, ticket.member))
            args.extend(tivs)
        try:
            if now:
                await self.link.run_now(RELEASE, keys, args)
            else:
                await self.link.run(RELEASE, keys, args)
        except SharedStateDown:
            pending[:0] = batch  # sent again once Redis is back

    async def renew(self) -> None:
        """Extend the slots of this node's requests in flight (every slot_ttl_s / 3)."""
        live = list(self._live.values())
        if not live or not self.link.up:
            return
        keys: list[str] = []
        args: list[Arg] = [self._ttl_us]
        for ticket in live:
            for i in range(1, len(ticket.keys), 2):
                keys.append(ticket.keys[i])
                args.append(ticket.member)
        # Down: the link reconnects; the slots' ttl covers a short gap.
        with contextlib.suppress(SharedStateDown):
            await self.link.run(RENEW, keys, args)

    async def close(self) -> None:
        """At shutdown, after the data plane drained and the root's tasks ended: the
        last releases out, each batch in a round trip of its own."""
        for _ in range(MAX_PENDING // BATCH + 1):
            if not self._pending or not self.link.up:
                break
            await self.flush(now=True)

    # -- internals -------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _tune_key(self, p: Principal, al: AccountLimits | None,
                  inputs: object) -> tuple[object, _Scope, str, str]:
        cfg, a = self._cfg, al or AccountLimits()
        scope = _scope(_first(p.rpm, a.rpm, cfg.default_rpm), _first(p.tpm, a.tpm, cfg.default_tpm),
                       _first(p.max_concurrent, a.max_concurrent, cfg.default_max_concurrent))
        if len(self._keys) >= self._cfg.max_tracked:
            self._keys.clear()  # bounded; re-derived on next use (the state is in Redis)
        base = f"{PREFIX}k{p.key_id}"
        ks = self._keys[p.key_id] = (inputs, scope, base, base + ":s")
        return ks

    def _tune_account(self, account_id: int,
                      al: AccountLimits) -> tuple[AccountLimits, _Scope, str, str]:
        if len(self._accts) >= self._cfg.max_tracked:
            self._accts.clear()
        base = f"{PREFIX}a{account_id}"
        acc = self._accts[account_id] = (al, _scope(al.rpm, al.tpm, al.max_concurrent),
                                         base, base + ":s")
        return acc

    def _fallback(self, principal: Principal, tokens: int) -> Ticket:
        if not self._fail_open:
            raise RateLimiterUnavailable(
                "The rate limiter is unavailable (its shared store cannot be reached), "
                "so no request can be admitted within your limits. Please retry shortly.",
                headers={"Retry-After": "1"})
        self.local_admissions += 1
        n = self._nodes
        if n > 1:
            principal = dataclasses.replace(
                principal, rpm=_share(principal.rpm, n), tpm=_share(principal.tpm, n),
                max_concurrent=_share(principal.max_concurrent, n))
        return self._local.acquire(principal, tokens)

    def _deny(self, r: list[bytes | int], scopes: Sequence[_Scope], tokens: int) -> None:
        i = int(r[1])
        what = r[2].decode() if isinstance(r[2], bytes) else str(r[2])
        st = scopes[i - 1]
        scope_txt = " on this account" if i == 2 else ""
        # As gate.limiter: a key's refusal shows the key's headers, an account's both.
        hdrs = _headers(r, scopes[:i], after=False)
        o = 3 + (i - 1) * 5
        if what == "r":
            nrs = float(r[o + 2])
            lim, used, asked = st.rlim, round(nrs / st.riv) - 1, 1
            wait = (nrs - lim * st.riv) / US
            unit, code = "requests per min (RPM)", "rate_limit_requests"
        elif what == "t":
            if tokens > st.tlim:
                raise LimitNeverFits(
                    f"Request too large for tokens per min (TPM){scope_txt}: Limit "
                    f"{st.tlim}, Requested {tokens}. The input or output tokens must be "
                    "reduced in order to run successfully.", code="rate_limit_tokens",
                    headers=hdrs)
            nts = float(r[o + 3])
            lim, used, asked = st.tlim, round(nts / st.tiv) - tokens, tokens
            wait = (nts - lim * st.tiv) / US
            unit, code = "tokens per min (TPM)", "rate_limit_tokens"
        else:
            raise RateLimited(
                f"Too many concurrent requests{scope_txt}: Limit {st.conc}, In flight "
                f"{int(r[o + 4])}. Please try again when one completes.",
                retry_after_s=1.0, code="rate_limit_concurrency", headers=hdrs)
        raise RateLimited(
            f"Rate limit reached for {unit}{scope_txt}: Limit {lim}, Used {used}, Requested "
            f"{asked}. Please try again in {format_reset(wait)}.",
            retry_after_s=wait, code=code, headers=hdrs)


def _headers(r: list[bytes | int], scopes: Sequence[_Scope], after: bool) -> dict[str, str]:
    """The six x-ratelimit-* headers, each trio from the tighter scope (as gate.limiter)."""
    rl = tl = 0
    rr = tr = -1
    rs = ts = 0.0
    d = 2 if after else 0
    for i, sc in enumerate(scopes):
        o = 3 + i * 5
        if sc.rlim:
            s = float(r[o + d])
            rem = int(sc.rlim - s / sc.riv + TOL) if s > 0 else sc.rlim
            if rr < 0 or rem < rr:
                rl, rr, rs = sc.rlim, rem, s
        if sc.tlim:
            s = float(r[o + 1 + d])
            rem = int(sc.tlim - s / sc.tiv + TOL) if s > 0 else sc.tlim
            if tr < 0 or rem < tr:
                tl, tr, ts = sc.tlim, rem, s
    return {
        "x-ratelimit-limit-requests": str(rl),
        "x-ratelimit-remaining-requests": str(rr) if rr > 0 else "0",
        "x-ratelimit-reset-requests": format_reset(rs / US),
        "x-ratelimit-limit-tokens": str(tl),
        "x-ratelimit-remaining-tokens": str(tr) if tr > 0 else "0",
        "x-ratelimit-reset-tokens": format_reset(ts / US),
    }


def _share(limit: int | None, nodes: int) -> int | None:
    """One node's part of a limit when each admits alone: limit / nodes, at least 1."""
    return None if limit is None else max(1, limit // nodes)


def _per_node(cfg: LimitsConfig, nodes: int) -> LimitsConfig:
    if nodes == 1:
        return cfg
    return dataclasses.replace(
        cfg, default_rpm=max(1, cfg.default_rpm // nodes),
        default_tpm=max(1, cfg.default_tpm // nodes),
        default_max_concurrent=max(1, cfg.default_max_concurrent // nodes))
