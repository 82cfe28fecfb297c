"""Prices and balances: exact integer costs and the in-memory balance book.

Money is integer nano-dollars everywhere (CONTRACT "Money"); prices are integer
nano-dollars per million tokens, converted once from the config's decimal strings.

Costs. ``cost_nano`` follows OpenAI's usage accounting: ``cached`` tokens are a
part of ``prompt`` tokens and are billed at the cached-input price, the rest of
the prompt at the input price, completion tokens at the output price. The exact
sum (in nano-dollars x 1e6) is rounded **up** once per request to whole
nano-dollars, so a request is never billed less than its exact price, by at most
one nano-dollar more.

Balances. ``Billing`` is this process's single source of truth for what an
account may still spend::

    available = balance (the DB's balance_nano as last read)
                - pending  (costs of usage rows queued but not yet committed)
                - reserved (maximum costs of requests in flight)

``reserve`` checks and books a request's maximum cost with no ``await`` in
between, so concurrent requests can never together reserve more than is
available. ``settle`` releases the reservation and returns the actual cost; the
caller then queues the usage row (``UsageWriter.record``), which moves the cost
into ``pending`` until the writer's transaction debits it in the DB.

No overshoot (CONTRACT promise 5): the reservation is the maximum cost of an
upper bound on the prompt plus the completion limit times the number of choices
(``gate.bounds``), and the upstream is sent that very limit, so a request can never
cost more than it reserved. Should an upstream still report more (one that ignores
``max_tokens``), ``settle`` charges the reservation and no more, and counts the
overrun (``Billing.overruns``, a log line without content). A balance never goes
below zero.

Shared mode (``storage.backend = "postgresql"``, many nodes). ``balance`` is not
the account's balance but what remains of this node's credit lease on it
(``gate.leases``): the formula, ``reserve`` and ``settle`` are unchanged, so the hot
path stays the same O(1) code with no ``await``. A reservation that takes the
available amount below the lease's low-water mark wakes the lease book (once per
slice) to top up in the background; a request the lease cannot cover while the
account may still have unleased credit raises ``LeaseShortfall``, on which the gate
awaits ONE top-up before reserving again (the rare path). Commits lower ``balance``
by their debits (the lease was spent) instead of setting it from the database. A
key's spend-cap books hold the node's cap leases the same way (``gate.capleases``):
a cap that binds and falls short raises ``LeaseShortfall`` naming its book, and the
gate waits once for that lease too.

Consistency with the DB. All reads of ``balance_nano`` run on the usage
writer's own connection, and the writer sets the balances of the accounts a
batch touched from the values its transaction returned. aiosqlite executes one
connection's statements in order and delivers their results in order, so a read
can never be applied "between" a commit and the matching ``pending`` decrease;
at worst a read made inside an open batch transaction counts that batch twice
for a moment (available too low, never too high).
On PostgreSQL (a pool, no such ordering) the same holds for another reason:
re-reads (``reload_stale``) run on the writer's own task, between its batches, and
a first ``load`` reads an account with nothing pending in this process yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from flintproxy.config import BillingConfig, ModelPrice
from flintproxy.errors import (
    InsufficientQuota,
    LeaseShortfall,
    ModelNotFound,
    ServiceUnavailable,
)
from flintproxy.gate.bounds import Bound
from flintproxy.gate.gate import Outcome
from flintproxy.gate.spendcaps import CapBook, CapBooks, QueuedRows, cap_refusal
from flintproxy.money import format_usd

log = logging.getLogger("flintproxy.gate.billing")

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens
_RELOAD_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's variable limit


def cost_nano(price: ModelPrice, prompt: int, completion: int, cached: int,
              cache_write: int = 0) -> int:
    """Exact cost of one request in nano-dollars, rounded up to a whole nano-dollar.

    ``cached`` (cache reads) and ``cache_write`` (Anthropic's cache creation) are parts
    of ``prompt``, each billed at its own rate, the rest at the input price.
    """
    prompt = max(prompt, 0)
    completion = max(completion, 0)
    cached = min(max(cached, 0), prompt)
    cache_write = min(max(cache_write, 0), prompt - cached)
    exact = ((prompt - cached - cache_write) * price.input_nano_per_mtok
             + cached * price.cached_input_nano_per_mtok
             + cache_write * _cache_write_rate(price)
             + completion * price.output_nano_per_mtok)
    return -(-exact // TOKENS_PER_PRICE_UNIT)


def _cache_write_rate(price: ModelPrice) -> int:
    rate = price.cache_write_nano_per_mtok
    return price.input_nano_per_mtok if rate is None else rate


def prompt_rate(price: ModelPrice) -> int:
    """The dearest price a prompt token can have (input, cache read or cache write)."""
    return max(price.input_nano_per_mtok, price.cached_input_nano_per_mtok,
               _cache_write_rate(price))


def max_cost_nano(price: ModelPrice, prompt: int, completion: int) -> int:
    """The most ``cost_nano`` can return for at most these token counts."""
    exact = max(prompt, 0) * prompt_rate(price) + max(completion, 0) * price.output_nano_per_mtok
    return -(-exact // TOKENS_PER_PRICE_UNIT)


@dataclass(slots=True)
class Reservation:
    """A request's booked maximum cost; settle or release it exactly once."""

    account_id: int
    model: str
    price: ModelPrice
    amount: int
    # The per-choice completion limit granted, and the one to write into the body
    # (None: the body already holds the upstream to it).
    max_tokens: int = 0
    limit: int | None = None
    done: bool = False
    cost: int = 0
    # The key's spend-cap books the amount is also booked in (gate.spendcaps).
    caps: tuple[CapBook, ...] = ()


class _Book:
    __slots__ = ("balance", "low_water", "pending", "reserved")

    def __init__(self) -> None:
        self.balance: int | None = None  # None: not read from the DB yet
        self.pending = 0
        self.reserved = 0
        # Shared mode: below this availability the lease book is told (then 0 until it
        # re-arms it). Always 0 embedded, where availability never goes below 0.
        self.low_water = 0


class BalanceSource(Protocol):
    """Where balances are stored (``store.ledger.Balances`` embedded)."""

    async def read(self, account_ids: list[int]) -> dict[int, int]: ...

    async def read_spend(self, key_ids: list[int], periods: list[str]
                         ) -> dict[tuple[int, str], int]:
        """``key_spend.spent_nano`` per (key, period) (spend caps)."""


class LeaseSupply(Protocol):
    """Shared mode: this node's credit leases (``gate.leases.LeaseBook``)."""

    async def take(self, account_id: int) -> None:
        """Take the first lease on the account (``lease_changed`` reports it)."""

    def may_grow(self, account_id: int) -> bool:
        """Whether a top-up could still add to the account's lease."""

    def low(self, account_id: int) -> None:
        """The lease fell below its low-water mark: top it up soon (O(1), no await)."""

    async def top_up(self, account_id: int, need_nano: int) -> bool:
        """Top the lease up by at least ``need_nano`` if the account has it (bounded
        wait); whether it grew."""


class Billing:
    """The in-memory balance book of this process; see the module docstring."""

    def __init__(self, prices: Mapping[str, ModelPrice], cfg: BillingConfig,
                 balances: BalanceSource) -> None:
        self._prices = prices
        self._default_max_tokens = cfg.default_max_tokens
        self._per_media_part = cfg.max_tokens_per_media_part
        # Requests whose upstream reported more than was reserved (charged the
        # reservation); read by metrics.
        self.overruns = 0
        self._balances = balances
        self._books: dict[int, _Book] = {}
        # The keys' spend-cap books (gate.spendcaps), read on the writer's task.
        self.caps = CapBooks(balances)
        self._capped = self.caps.by_key  # the same dict: the writer's one probe
        self.caps.on_wanted = self._wake_writer
        # Set by the usage writer: its queued rows of some keys (cap books count them).
        self.queued_rows: QueuedRows | None = None
        self._loads: dict[int, asyncio.Task[None]] = {}
        # Accounts whose load was running when a change event arrived: re-read.
        self._dirty_loads: set[int] = set()
        self._stale: set[int] = set()
        self._reload_all = False
        # Embedded: debits the control plane committed, held (as reserved) until a
        # re-read that started after the commit has applied them (``debited``).
        self._debited: dict[int, int] = {}
        # Set by the usage writer: wakes it to run ``reload_stale`` soon.
        self.on_stale: Callable[[], None] | None = None
        # Shared mode: set by the lease book (gate.leases) when it is built; None embedded.
        self.leases: LeaseSupply | None = None
        # Shared mode: the lease book's local deadline passed (the shared store was not
        # reachable to renew): no reservation until it is renewed.
        self.frozen = False

    # --- reading balances ---------------------------------------------------------

    def is_loaded(self, account_id: int) -> bool:
        book = self._books.get(account_id)
        return book is not None and book.balance is not None

    async def load(self, account_id: int) -> None:
        """Read the account's balance on first use; concurrent callers share one read."""
        if self.is_loaded(account_id):
            return
        task = self._loads.get(account_id)
        if task is None:
            # A task of its own, so one caller's cancellation (client gone) does not
            # fail the others waiting on the same read.
            task = asyncio.get_running_loop().create_task(self._read_first(account_id))
            self._loads[account_id] = task
            task.add_done_callback(lambda t: self._load_done(account_id, t))
        await asyncio.shield(task)

    def _load_done(self, account_id: int, task: asyncio.Task[None]) -> None:
        self._loads.pop(account_id, None)
        if not task.cancelled():
            task.exception()  # mark retrieved: every waiter may have gone away

    async def _read_first(self, account_id: int) -> None:
        if self.leases is not None:
            await self.leases.take(account_id)
            return
        while True:
            self._dirty_loads.discard(account_id)
            balances = await self._balances.read([account_id])
            book = self._books.get(account_id)
            if book is None:
                book = self._books[account_id] = _Book()
            book.balance = balances.get(account_id, 0)
            if account_id not in self._dirty_loads:
                return

    def on_change(self, kind: str, account_id: int | None, key_id: int | None) -> None:
        """ChangeWatcher subscriber: re-read the balance after any account change.

        Re-reading is always correct (balances are set, never adjusted), so this does
        not need to know which event kinds move money (``credit`` today).
        """
        if self.leases is not None:
            return  # shared mode: balances are leases (gate.leases hears the changes)
        if account_id is None:
            self._reload_all = True
        elif account_id in self._loads:
            self._dirty_loads.add(account_id)
            return
        elif self.is_loaded(account_id):
            self._stale.add(account_id)
        else:
            return
        self._wake_writer()

    def _wake_writer(self) -> None:
        """Ask the usage writer's task to run ``reload_stale`` soon."""
        if self.on_stale is not None:
            self.on_stale()

    def has_stale(self) -> bool:
        return self._reload_all or bool(self._stale) or self.caps.has_wanted()

    async def reload_stale(self) -> None:
        """Re-read balances flagged by ``on_change`` and read the cap books requests
        wait for (run by the usage writer's task, between two batches)."""
        if self.caps.has_wanted():
            try:
                await self.caps.read_wanted(self.queued_rows)
            except BaseException as exc:
                self.caps.fail_wanted(exc)
                raise
        if self._reload_all:
            self._reload_all = False
            self._stale.update(a for a, b in self._books.items() if b.balance is not None)
        while self._stale:
            ids = [self._stale.pop() for _ in range(min(len(self._stale), _RELOAD_CHUNK))]
            # Holds of debits committed before this read started: it sees them.
            held = {a: self._debited.pop(a) for a in ids if a in self._debited}
            try:
                balances = await self._balances.read(ids)
            except BaseException:
                self._stale.update(ids)
                self._debited.update(held)
                raise
            for account_id in ids:
                book = self._books.get(account_id)
                if book is not None and book.balance is not None:
                    book.balance = balances.get(account_id, 0)
                    book.reserved -= held.get(account_id, 0)

    # --- the hot path (synchronous) -------------------------------------------------

    def price(self, model: str) -> ModelPrice:
        price = self._prices.get(model)
        if price is None:
            # Never free by accident: a model without a price is not served.
            raise ModelNotFound(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model")
        return price

    def available(self, account_id: int) -> int | None:
        """What the account may still reserve; None when its balance is not loaded."""
        book = self._books.get(account_id)
        if book is None or book.balance is None:
            return None
        return book.balance - book.pending - book.reserved

    def reserve(self, account_id: int, model: str, bound: Bound,
                caps: tuple[CapBook, ...] = ()) -> Reservation:
        """Book the request's maximum cost, or raise 402 insufficient_quota.

        The completion limit per choice is the client's (else
        ``billing.default_max_tokens``), capped by the model's ``max_output_tokens``
        and lowered to what the available balance affords; the result is in
        ``Reservation.max_tokens`` / ``.limit``. The account must be loaded
        (``await load``) first. ``caps``: the key's spend-cap books
        (``CapBooks.books``), booked too; the tightest of all the books binds, and a
        refusal that a cap causes is 402 ``spend_cap_reached`` naming it.
        """
        price = self.price(model)
        book = self._books.get(account_id)
        if book is None or book.balance is None:
            raise RuntimeError(f"Billing.reserve before Billing.load for account {account_id}")
        if self.frozen:
            raise ServiceUnavailable("The shared balance store has been unreachable for too "
                                     "long to spend credit safely; please retry shortly.",
                                     headers={"Retry-After": "1"})
        own = available = book.balance - book.pending - book.reserved
        binding: CapBook | None = None
        if caps:
            shared = self.leases is not None
            for cb in caps:
                left = (cb.balance if shared else cb.limit - cb.spent) - cb.pending - cb.reserved
                if left < available:
                    available, binding = left, cb
        text, media, choices, requested, largest, _ = bound
        prompt = text + media * self._per_media_part if media else text
        exact = prompt * prompt_rate(price)  # the maximum cost, x 1e6, before rounding up
        granted = 0
        limit = None
        if choices:
            granted = self._default_max_tokens if requested is None else requested
            cap = price.max_output_tokens
            if cap is not None and cap < granted:
                granted = cap
            per_choice = choices * price.output_nano_per_mtok
            if per_choice:
                # The most tokens per choice whose cost, rounded up, fits the balance:
                # ceil(x / 1e6) <= a  <=>  x <= a * 1e6 for an integer x.
                room = available * TOKENS_PER_PRICE_UNIT - exact
                affordable = room // per_choice if room > 0 else 0
                if affordable < granted:
                    if self.leases is not None:
                        self._shortfall(account_id, exact + granted * per_choice, available,
                                        binding, price, prompt, choices)
                    granted = affordable
                exact += granted * per_choice
            if largest is None or largest > granted:
                limit = granted  # the body must say it: it is absent or larger
        amount = -(-exact // TOKENS_PER_PRICE_UNIT)
        if amount > available or (choices and granted < 1):
            if self.leases is not None:
                self._shortfall(account_id, exact, available, binding, price, prompt, choices)
            need = max_cost_nano(price, prompt, choices)
            if binding is not None:
                raise cap_refusal(binding, None if self.leases is not None else available,
                                  max(amount, need))
            raise InsufficientQuota(
                "You exceeded your current quota: this request may cost up to "
                f"${format_usd(max(amount, need))} but the account has "
                f"${format_usd(max(available, 0))} available. Add credit, or send a "
                "shorter request.")
        book.reserved += amount
        if own - amount < book.low_water:
            book.low_water = 0  # once per slice: the lease book re-arms it
            if self.leases is not None:
                self.leases.low(account_id)
        if caps:
            supply = self.caps.leases  # shared mode: the cap leases
            for cb in caps:
                cb.reserved += amount
                if supply is not None and cb.balance - cb.pending - cb.reserved < cb.low_water:
                    cb.low_water = 0  # once per slice: the cap lease book re-arms it
                    supply.low(cb)
            return Reservation(account_id, model, price, amount, granted, limit, caps=caps)
        return Reservation(account_id, model, price, amount, granted, limit)

    def unbilled(self, account_id: int, model: str) -> Reservation:
        """A reservation of nothing, for a request that is not billed (count_tokens)."""
        price = self._prices.get(model)
        if price is None:
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        return Reservation(account_id, model, price, 0)

    def _shortfall(self, account_id: int, exact: int, available: int,
                   binding: CapBook | None, price: ModelPrice, prompt: int, choices: int
                   ) -> None:
        """Shared mode: raise LeaseShortfall when a top-up could cover ``exact``: of the
        account's credit lease, or of the binding cap book's cap lease."""
        assert self.leases is not None
        need = -(-exact // TOKENS_PER_PRICE_UNIT) - available
        if binding is not None:
            supply = self.caps.leases
            if supply is not None and supply.may_grow(binding):
                most = max(-(-exact // TOKENS_PER_PRICE_UNIT),
                           max_cost_nano(price, prompt, choices))
                raise LeaseShortfall(
                    "This node could not reserve the request's maximum cost from the API "
                    "key's spend cap.", need_nano=need, cap=binding,
                    refusal=cap_refusal(binding, None, most))
            return
        if self.leases.may_grow(account_id):
            raise LeaseShortfall(
                "You exceeded your current quota: this node could not reserve the "
                "request's maximum cost from the account's credit.", need_nano=need)

    async def top_up(self, account_id: int, need_nano: int, cap: object | None = None
                     ) -> bool:
        """Shared mode: wait (bounded) for one top-up of the lease (of the cap book's
        cap lease when ``cap`` is one); False embedded."""
        if self.leases is None:
            return False
        if isinstance(cap, CapBook):
            supply = self.caps.leases
            grew = supply is not None and await supply.top_up(cap, need_nano)
        else:
            grew = await self.leases.top_up(account_id, need_nano)
        if not self.is_loaded(account_id):  # the lease ended meanwhile (idle, expired)
            await self.load(account_id)
        return grew

    def lease_changed(self, account_id: int, delta: int | None, low_water: int) -> None:
        """Shared mode (the lease book): the node's lease on the account grew (delta >
        0) or shrank (< 0), with a new low-water mark; None: it ended (unloaded, so the
        next request takes a new one; reservations and pending rows still count)."""
        book = self._books.get(account_id)
        if book is None:
            book = self._books[account_id] = _Book()
        if delta is None:
            book.balance = None
            book.low_water = 0
            return
        book.balance = (book.balance or 0) + delta
        book.low_water = low_water

    def settle(self, res: Reservation, outcome: Outcome) -> int:
        """Release the reservation; return the actual cost, never more than reserved.

        Idempotent. The cost becomes a debit when the caller records the usage row
        with ``cost_nano`` set to the returned value.
        """
        if res.done:
            return res.cost
        self.release(res)
        cost = cost_nano(res.price, outcome.prompt_tokens, outcome.completion_tokens,
                         outcome.cached_tokens, outcome.cache_write_tokens)
        if cost > res.amount:
            # The promise is the reservation. An upstream that ignored the limit (or a
            # prompt above its bound) is counted, never with content or account; our
            # own estimate (no usage reported, 4 bytes a token) can exceed the bound of
            # an image-heavy body without anyone misbehaving.
            if not outcome.estimated:
                self.overruns += 1
                log.warning("usage above reservation for model %s: %d prompt + %d "
                            "completion tokens reported; charged the reservation",
                            res.model, outcome.prompt_tokens, outcome.completion_tokens)
            cost = res.amount
        res.cost = cost
        return cost

    def release(self, res: Reservation) -> None:
        """Drop a reservation that will not be charged (refused before the upstream call)."""
        if res.done:
            return
        res.done = True
        book = self._books.get(res.account_id)
        if book is not None:
            book.reserved -= res.amount
        if res.caps:
            for cb in res.caps:
                cb.reserved -= res.amount

    # --- money the control plane takes (an operator's debit) ------------------------

    async def hold(self, account_id: int, amount: int) -> bool:
        """Set ``amount`` aside before the control plane debits it; False when less is
        available (requests in flight hold reservations, queued rows are pending).

        Embedded, the database's balance does not know what requests in flight have
        reserved, so a debit checked against it alone could take their money and leave
        the account below zero once they settle. After True, call exactly one of
        ``unhold`` (the debit failed) or ``debited`` (it committed). Shared mode needs
        no hold (the debit cannot take what the nodes' leases hold): always True.
        """
        if self.leases is not None:
            return True
        await self.load(account_id)
        book = self._books[account_id]
        assert book.balance is not None
        if book.balance - book.pending - book.reserved < amount:
            return False
        book.reserved += amount
        return True

    def unhold(self, account_id: int, amount: int) -> None:
        """The held debit was not made: the money is available again."""
        book = self._books.get(account_id)
        if self.leases is None and book is not None:
            book.reserved -= amount

    def debited(self, account_id: int, amount: int) -> None:
        """The held debit committed. The hold ends when a re-read of the balance that
        started after now has applied it: ending it at once would let a re-read begun
        before the commit hand the money out a second time."""
        if self.leases is not None:
            return
        self._debited[account_id] = self._debited.get(account_id, 0) + amount
        self._stale.add(account_id)
        self._wake_writer()

    # --- the usage writer's side ----------------------------------------------------

    def add_pending(self, account_id: int, cost: int, key_id: int | None = None,
                    started_ms: int = 0) -> None:
        """A usage row with this cost was queued (called by ``UsageWriter.record``)."""
        book = self._books.get(account_id)
        if book is None:
            book = self._books[account_id] = _Book()
        book.pending += cost
        if self._capped and key_id in self._capped:
            self.caps.add_pending(key_id, started_ms, cost)

    def committed(self, debits: Mapping[int, int], balances: Iterable[tuple[int, int]],
                  spends: Mapping[tuple[int, str], int] | None = None,
                  spent: Iterable[tuple[int, str, int]] = ()) -> None:
        """A batch committed: its debits left ``pending``; set the balances it returned
        (and the spend of the keys' cap books)."""
        if spends and self._capped:
            self.caps.committed(spends, spent, self.leases is not None)
        for account_id, debit in debits.items():
            book = self._books.get(account_id)
            if book is not None:
                book.pending -= debit
                if self.leases is not None and book.balance is not None:
                    book.balance -= debit  # shared mode: spent from the lease
        if self.leases is not None:
            return
        for account_id, balance in balances:
            book = self._books.get(account_id)
            if book is not None and book.balance is not None:
                book.balance = balance

    def snapshot(self, account_id: int) -> tuple[int | None, int, int]:
        """(balance, pending, reserved) for tests and diagnostics."""
        book = self._books.get(account_id)
        if book is None:
            return (None, 0, 0)
        return (book.balance, book.pending, book.reserved)
