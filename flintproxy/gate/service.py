"""The shipped Gate: API keys, IP guard, rate limits, balance reservation and usage.

Per /v1 request, in memory only (see ``gate`` for the seam):

    authenticate   IP block check -> key cache (a miss goes to the DB once)
    admit          usage backlog bound (503) -> first use of an account loads its
                   balance (once) -> limiter acquire (429) -> balance reserve (402)
    finish         limiter true-up/release -> settle the reservation -> enqueue the
                   usage row for the background writer

Nothing is held when ``admit`` raises: whatever was acquired is released first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from flintproxy.config import Config
from flintproxy.errors import AuthenticationError, FlintError
from flintproxy.gate.billing import Billing, Reservation
from flintproxy.gate.gate import Admission, Call, Exchange, Outcome, Principal, bearer_token
from flintproxy.gate.keys import KEY_AUTH, LOGIN_GUARD, KeyAuthenticator
from flintproxy.gate.limiter import IpGuard, Limiter, Ticket, client_ip
from flintproxy.store.ledger import BILLING, USAGE, UsageWriter, usage_row


class ServiceGate:
    """Composes the components; they are bound by ``service_ctx`` at start-up."""

    def __init__(self, config: Config) -> None:
        self._trusted = config.limits.trusted_proxies
        self._default_max_tokens = config.billing.default_max_tokens
        self.limiter = Limiter(config.limits)
        # Bound at start-up (they need the event loop and the database).
        self.keys: KeyAuthenticator | None = None
        self.guard: IpGuard | None = None
        self.billing: Billing | None = None
        self.usage: UsageWriter | None = None
        # Called with (admission, outcome, cost_nano) as each request finishes
        # (metrics, access log); each must be cheap and must not raise.
        self.finish_observers: list[Callable[[Admission, Outcome, int], None]] = []

    def bind(self, keys: KeyAuthenticator, guard: IpGuard, billing: Billing,
             usage: UsageWriter) -> None:
        self.keys, self.guard, self.billing, self.usage = keys, guard, billing, usage

    async def authenticate(self, exchange: Exchange) -> Principal:
        keys, guard = self.keys, self.guard
        assert keys is not None and guard is not None, "ServiceGate used before bind()"
        ip = client_ip(exchange.remote, exchange.header(b"x-forwarded-for"), self._trusted)
        guard.check_blocked(ip)
        try:
            return await keys.authenticate(bearer_token(exchange))
        except AuthenticationError:
            # Failed auth spends the IP's unauthenticated budget and counts towards
            # its backoff and block.
            guard.failure(ip)
            guard.check(ip)
            raise

    async def admit(self, exchange: Exchange, call: Call, principal: Principal,
                    started: float, started_ms: int) -> Admission:
        billing, usage = self.billing, self.usage
        assert billing is not None and usage is not None, "ServiceGate used before bind()"
        usage.refuse_if_overloaded()
        account_id = principal.account_id
        if not billing.is_loaded(account_id):
            await billing.load(account_id)  # once per account per process
        # Embeddings produce no completion tokens: reserve only the prompt.
        max_tokens = 0 if call.endpoint == "embeddings" else call.max_tokens
        if not principal.limits_applied:  # a freshly loaded key: sync account overrides
            self.limiter.set_account_limits(account_id, *principal.account_limits)
            principal.limits_applied = True
        completion = self._default_max_tokens if max_tokens is None else max_tokens
        ticket = self.limiter.acquire(principal, call.prompt_tokens_estimate + completion)
        headers = self.limiter.headers(ticket)
        try:
            reservation = billing.reserve(account_id, call.model, call.prompt_tokens_estimate,
                                          max_tokens)
        except FlintError as exc:
            exc.headers = {**headers, **exc.headers}
            self.limiter.release(ticket, 0)
            raise
        except BaseException:
            self.limiter.release(ticket, 0)
            raise
        admission = Admission(call, principal, started, started_ms, exchange)
        admission.state = (ticket, reservation)
        call.admitted = True
        admission.headers = headers
        return admission

    def finish(self, admission: Admission, outcome: Outcome) -> None:
        assert self.billing is not None and self.usage is not None
        ticket: Ticket
        reservation: Reservation
        ticket, reservation = admission.state  # type: ignore[misc]
        self.limiter.release(ticket, outcome.prompt_tokens + outcome.completion_tokens)
        cost = self.billing.settle(reservation, outcome)
        self.usage.record(usage_row(admission, outcome, cost))
        for observe in self.finish_observers:
            observe(admission, outcome, cost)

    def allowed_models(self, principal: Principal) -> frozenset[str] | None:
        return principal.allowed_models


async def service_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context binding the gate to the components opened before it."""
    from flintproxy.app.factory import GATE  # app imports this module

    gate = app[GATE]
    if isinstance(gate, ServiceGate):
        gate.bind(app[KEY_AUTH], app[LOGIN_GUARD], app[BILLING], app[USAGE])
    yield
