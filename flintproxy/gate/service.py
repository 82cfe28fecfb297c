"""The shipped Gate: API keys, IP guard, rate limits, balance reservation and usage.

Per /v1 request, in memory only (see ``gate`` for the seam):

    authenticate   key cache (a miss goes to the DB once); a failure only -> IP guard
    admit          usage backlog bound (503) -> first use of an account loads its
                   balance (once; shared mode: takes a credit lease) -> limiter
                   acquire (429) -> balance reserve (402; shared mode: a lease too short
                   waits for one top-up first, see gate.leases)
    finish         limiter true-up/release -> settle the reservation -> enqueue the
                   usage row for the background writer

Nothing is held when ``admit`` raises: whatever was acquired is released first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from flintproxy.config import Config
from flintproxy.errors import (
    AuthenticationError,
    FlintError,
    LeaseShortfall,
    ServiceUnavailable,
)
from flintproxy.gate.billing import Billing, Reservation
from flintproxy.gate.bounds import UNBILLED, Bound, default_limit_param
from flintproxy.gate.gate import Admission, Call, Outcome, Principal, bearer_token
from flintproxy.gate.ipguard import IpGuard, client_ip
from flintproxy.gate.keys import KeyAuthenticator
from flintproxy.gate.limiter import Limiter
from flintproxy.gate.spendcaps import CapBook
from flintproxy.http.exchange import Exchange
from flintproxy.store.ledger import UsageRow

# Counts come from the upstream's usage: absurd values must not make a row unstorable.
MAX_ROW_INT = 2**53


def _bounded(n: int) -> int:
    # Counts come from the upstream's usage: absurd values must not make a row
    # unstorable (SQLite integers are 64-bit), which would stall the ledger.
    return min(max(n, 0), MAX_ROW_INT)


def usage_row(admission: Admission, outcome: Outcome, cost_nano: int) -> UsageRow:
    """The usage row of a finished request (no content, no IP); ``cost_nano`` from settle."""
    call = admission.call
    return UsageRow(
        call.request_id, admission.principal.account_id, admission.principal.key_id,
        call.model, outcome.upstream, _bounded(outcome.prompt_tokens),
        _bounded(outcome.completion_tokens), _bounded(outcome.cached_tokens),
        _bounded(outcome.reasoning_tokens), int(outcome.estimated), _bounded(cost_nano),
        outcome.status, str(outcome.outcome), int(call.stream), admission.started_ms,
        round(outcome.duration_s * 1000),
        None if outcome.ttfb_s is None else round(outcome.ttfb_s * 1000), call.endpoint)


FinishObserver = Callable[[Admission, Outcome, int], None]


class UsageSink(Protocol):
    """Where finished requests' rows go (``store.ledger.UsageWriter`` embedded)."""

    def refuse_if_overloaded(self) -> None:
        """Raise 503 while the backlog of unwritten rows is over its bound."""

    def record(self, row: UsageRow) -> None:
        """Queue one row: O(1), never awaits, never raises."""


class RateLimits(Protocol):
    """The key and account limits: ``gate.limiter.Limiter`` in memory (embedded; the
    gate calls its ``acquire`` without awaiting), ``gate.sharedlimits.SharedLimiter``
    on Redis (``[cluster] redis_url``; one round trip per admission)."""

    def set_account_limits(self, account_id: int, rpm: int | None = None,
                           tpm: int | None = None, max_concurrent: int | None = None) -> None:
        """Set (all None: clear) an account's overrides."""

    async def admit(self, principal: Principal, tokens: int) -> Any:
        """A ticket for one request reserving ``tokens``, or a 429 (503)."""

    def headers(self, ticket: Any) -> dict[str, str]:
        """The x-ratelimit-* headers of an admitted request."""

    def release(self, ticket: Any, actual_tokens: int) -> None:
        """Free the ticket's slot and true up its tokens; idempotent, never awaits."""


class ServiceGate:
    """Composes the components opened before it; see the module docstring.

    ``finish_observers`` are called with (admission, outcome, cost_nano) as each
    request finishes (metrics, access log); each must be cheap and must not raise.
    """

    def __init__(self, config: Config, keys: KeyAuthenticator, guard: IpGuard,
                 billing: Billing, usage: UsageSink,
                 finish_observers: Sequence[FinishObserver] = (),
                 limiter: RateLimits | None = None) -> None:
        self._trusted = config.limits.trusted_proxies
        self._default_max_tokens = config.billing.default_max_tokens
        self.limiter: RateLimits = limiter or Limiter(config.limits)
        # The in-memory limiter is called without an await (the embedded hot path).
        self._local = self.limiter if isinstance(self.limiter, Limiter) else None
        self.keys = keys
        self.guard = guard
        self.billing = billing
        self.usage = usage
        self.finish_observers = tuple(finish_observers)

    async def authenticate(self, exchange: Exchange) -> Principal:
        keys, guard = self.keys, self.guard
        try:
            return await keys.authenticate(bearer_token(exchange))
        except AuthenticationError:
            # The guard slows failures only: a valid key always authenticates, or one
            # client would lock out everyone behind its address (a NAT, an office).
            # A failure spends the IP's unauthenticated budget and counts towards its
            # backoff and block; while blocked, failures are 429, not 401.
            ip = client_ip(exchange.remote, exchange.header(b"x-forwarded-for"),
                           self._trusted)
            guard.check_blocked(ip)
            guard.failure(ip)
            guard.check(ip)
            raise

    async def admit(self, exchange: Exchange, call: Call, principal: Principal,
                    started: float, started_ms: int) -> Admission:
        billing, usage = self.billing, self.usage
        usage.refuse_if_overloaded()
        account_id = principal.account_id
        if not billing.is_loaded(account_id):
            await billing.load(account_id)  # once per account per process
        caps = principal.caps
        books: tuple[CapBook, ...] = ()
        if caps is not None:  # a key with a spend cap: its books for this period
            found = billing.caps.books(principal.key_id, caps, started_ms)
            if found is None:  # once per key per period per process
                await billing.caps.load(principal.key_id, caps, started_ms)
                found = billing.caps.books(principal.key_id, caps, started_ms)
                if found is None:  # never uncapped by accident
                    raise ServiceUnavailable("Could not read the API key's spend; please "
                                             "retry shortly.", headers={"Retry-After": "1"})
            books = found
        # Embeddings produce no completion tokens: reserve only the prompt.
        max_tokens = 0 if call.endpoint == "embeddings" else call.max_tokens
        unbilled = call.endpoint in UNBILLED
        bound = call.bound or Bound(call.prompt_tokens_estimate, 0, 0 if max_tokens == 0 else 1,
                                    max_tokens, max_tokens, ())
        if not principal.limits_applied:  # a freshly loaded key: sync account overrides
            self.limiter.set_account_limits(account_id, *principal.account_limits)
            principal.limits_applied = True
        completion = self._default_max_tokens if max_tokens is None else max_tokens
        tokens = 0 if unbilled else call.prompt_tokens_estimate + completion
        local = self._local
        if local is not None:
            ticket: Any = local.acquire(principal, tokens)
        else:
            ticket = await self.limiter.admit(principal, tokens)
        headers = self.limiter.headers(ticket)
        try:
            if unbilled:
                reservation = billing.unbilled(account_id, call.model)
            else:
                try:
                    reservation = billing.reserve(account_id, call.model, bound, books)
                except LeaseShortfall as short:
                    reservation = await self._after_shortfall(call, account_id, bound, books,
                                                              short)
        except FlintError as exc:
            exc.headers = {**headers, **exc.headers}
            self.limiter.release(ticket, 0)
            raise
        except BaseException:
            self.limiter.release(ticket, 0)
            raise
        admission = Admission(call, principal, started, started_ms, exchange)
        admission.state = (ticket, reservation)
        if reservation.limit is not None:
            admission.limit = (
                bound.params or (default_limit_param(call.endpoint,
                                                     reservation.price.limit_param),),
                reservation.limit)
        call.admitted = True
        admission.headers = headers
        return admission

    async def _after_shortfall(self, call: Call, account_id: int, bound: Bound,
                               books: tuple[CapBook, ...], short: LeaseShortfall
                               ) -> Reservation:
        """Shared mode, the rare path: wait (bounded) for ONE top-up of the lease that
        fell short (this node's credit lease, or the key's cap lease that binds), then
        reserve again. Each lease is waited for at most once per request: a burst can
        find the credit lease and a cap lease short together (both sliced from the
        same sizes), and the second is then a pot of its own, not a second try. A
        second shortfall of the same lease is the 402 (spend_cap_reached for a cap)."""
        billing = self.billing
        waited: list[object | None] = []
        while True:
            if any(pot is short.cap for pot in waited):
                if short.refusal is not None:
                    raise short.refusal from None
                raise short
            waited.append(short.cap)
            await billing.top_up(account_id, short.need_nano, short.cap)
            try:
                return billing.reserve(account_id, call.model, bound, books)
            except LeaseShortfall as again:
                short = again

    def finish(self, admission: Admission, outcome: Outcome) -> None:
        ticket: Any
        reservation: Reservation
        ticket, reservation = admission.state  # type: ignore[misc]
        self.limiter.release(ticket, outcome.prompt_tokens + outcome.completion_tokens)
        cost = self.billing.settle(reservation, outcome)
        self.usage.record(usage_row(admission, outcome, cost))
        for observe in self.finish_observers:
            observe(admission, outcome, cost)

    def allowed_models(self, principal: Principal) -> frozenset[str] | None:
        return principal.allowed_models
