"""Spend caps per key in memory: one book per (key, UTC period), reserved like a balance.

A key's daily and monthly caps are books beside its account's balance book
(``gate.billing``): ``Billing.reserve`` books a request's maximum cost in the account
book AND in every cap book of its key with no ``await`` in between, and lowers the
request's ``max_tokens`` to what the tightest of them affords. So no interleaving of
requests lets a key's charged spend in a UTC day or month exceed its cap, exactly as
no interleaving lets an account spend more than its balance.

What a cap book still allows::

    embedded:  available = cap - spent (key_spend.spent_nano as committed)
                               - pending (rows of the key queued, not yet committed)
                               - reserved (maximum costs in flight)
    shared:    available = lease (this node's cap lease, gate.capleases) - pending - reserved

A book is made on the first request of a key in a period (the gate awaits it once);
it is read on the usage writer's own task between two batches (``Billing.
reload_stale``), together with the key's rows still queued, so the read and the
queue are one consistent picture. After that the writer's commits set ``spent``
from what its UPSERT returned. The cap itself is read with the key
(``Principal.caps``), so a changed cap applies once the key cache hears the change
event (within a second). A new UTC day or month starts new books; books of a past
period are dropped once nothing is reserved or pending in them.

Uncapped keys cost one ``if`` on the hot path (``Principal.caps is None``) and one
dict probe when their usage row is queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Protocol

from flintproxy.errors import ServiceUnavailable, SpendCapReached
from flintproxy.money import format_usd
from flintproxy.store.caps import DAY_MS, period_reset_ms, periods

__all__ = [
    "CapBook",
    "CapBooks",
    "CapKind",
    "CapSource",
    "CapSupply",
    "QueuedRows",
    "cap_refusal",
    "period_bounds",
]

LOAD_WAIT_S = 5.0  # the first request of a key in a period waits this long at most


class CapKind(StrEnum):
    DAY = "day"
    MONTH = "month"


class CapBook:
    """What one key may still spend in one UTC period on this process."""

    __slots__ = ("balance", "end_ms", "key_id", "kind", "limit", "low_water", "pending",
                 "period", "reserved", "spent", "start_ms")

    def __init__(self, key_id: int, period: str, spent: int) -> None:
        self.key_id = key_id
        self.period = period
        self.kind = CapKind.DAY if period.startswith("d") else CapKind.MONTH
        self.start_ms, self.end_ms = period_bounds(period)
        self.limit = 0  # the cap, from the key (set before each reservation)
        self.spent = spent  # embedded: key_spend.spent_nano as last committed
        self.balance = 0  # shared mode: this node's cap lease (what it still holds)
        self.pending = 0
        self.reserved = 0
        self.low_water = 0

    def idle(self) -> bool:
        return not self.pending and not self.reserved


def period_bounds(period: str) -> tuple[int, int]:
    """[start, end) of a period in unix ms."""
    end = period_reset_ms(period)
    if period.startswith("d"):
        return end - DAY_MS, end
    # The month's first day: step back from the end one day at a time is 28-31 steps;
    # the month is named in the period, so its first day is the 1st.
    year, month = (int(x) for x in period[1:].split("-"))
    start = period_reset_ms(f"d{year:04d}-{month:02d}-01") - DAY_MS
    return start, end


def cap_refusal(book: CapBook, available: int | None, need: int) -> SpendCapReached:
    """The 402 naming the cap that binds. ``available``: what the cap still allows,
    known exactly on one process; None in shared mode, where a node sees only its own
    slice of the cap, so the message names the cap without a spent figure."""
    if book.kind is CapKind.DAY:
        what, when, resets = "daily", "today", "at 00:00 UTC"
    else:
        what, when, resets = "monthly", "this month", "on the 1st at 00:00 UTC"
    if available is None:
        state = (f"what is spent or reserved {when} (UTC) leaves too little for this "
                 f"request, which may cost up to ${format_usd(need)}")
    else:
        used = max(book.limit - max(available, 0), 0)
        state = (f"${format_usd(used)} is spent or reserved {when} (UTC) and this request "
                 f"may cost up to ${format_usd(need)}")
    return SpendCapReached(
        f"This API key's {what} spend cap of ${format_usd(book.limit)} is reached: "
        f"{state}. The cap resets {resets}; raise it in the console or wait.")


class CapSupply(Protocol):
    """Shared mode: this node's cap leases (``gate.capleases.CapLeaseBook``)."""

    async def take(self, key_id: int, period: str) -> None:
        """Make the pot's book with a first cap lease (``CapBooks.add`` it)."""

    def may_grow(self, book: CapBook) -> bool:
        """Whether a top-up could still add to the book's cap lease."""

    def low(self, book: CapBook) -> None:
        """The cap lease fell below its low-water mark (O(1), no await)."""

    async def top_up(self, book: CapBook, need_nano: int) -> bool:
        """Top the cap lease up by at least ``need_nano`` if the cap has it (bounded)."""


class CapSource(Protocol):
    """Where spend is read (``store.ledger.Balances`` embedded: ``key_spend``)."""

    async def read_spend(self, key_ids: list[int], periods: list[str]
                         ) -> dict[tuple[int, str], int]: ...


# Queued usage rows of these keys, not yet committed: (key_id, started_ms, cost).
QueuedRows = Callable[[set[int]], Iterable[tuple[int, int, int]]]


class CapBooks:
    """This process's cap books, by key; see the module docstring. Owned by Billing."""

    def __init__(self, source: CapSource) -> None:
        self._source = source
        # key -> its books; Billing reads it directly on the hot path (one dict probe).
        self.by_key: dict[int, list[CapBook]] = {}
        # Books asked for and not yet read: (key, period) -> the waiters' future.
        self._wanted: dict[tuple[int, str], asyncio.Future[None]] = {}
        self._day = -1
        self._periods = ("", "")
        self.on_wanted: Callable[[], None] | None = None
        # Shared mode: the cap leases (set by gate.capleases); books hold leases then.
        self.leases: CapSupply | None = None

    def _now_periods(self, started_ms: int) -> tuple[str, str]:
        day = started_ms // DAY_MS
        if day != self._day:
            self._day = day
            self._periods = periods(started_ms)
            self.drop_past(started_ms)
        return self._periods

    def books(self, key_id: int, caps: tuple[int | None, int | None], started_ms: int
              ) -> tuple[CapBook, ...] | None:
        """The key's books for a request started at ``started_ms`` with each book's
        ``limit`` set from ``caps`` (day, month); None when one is not read yet."""
        day, month = self._now_periods(started_ms)
        out = []
        held = self.by_key.get(key_id, ())
        for cap, period in ((caps[0], day), (caps[1], month)):
            if cap is None:
                continue
            for book in held:
                if book.period == period:
                    book.limit = cap
                    out.append(book)
                    break
            else:
                return None
        return tuple(out)

    async def load(self, key_id: int, caps: tuple[int | None, int | None],
                   started_ms: int) -> None:
        """Have the key's books of these periods read (on the writer's task); bounded."""
        day, month = self._now_periods(started_ms)
        held = {b.period for b in self.by_key.get(key_id, ())}
        if self.leases is not None:  # shared mode: a book is a first cap lease
            try:
                async with asyncio.timeout(LOAD_WAIT_S):
                    for cap, period in ((caps[0], day), (caps[1], month)):
                        if cap is not None and period not in held:
                            await self.leases.take(key_id, period)
            except TimeoutError:
                raise ServiceUnavailable("The shared spend store is slow or failing; "
                                         "please retry shortly.",
                                         headers={"Retry-After": "1"}) from None
            return
        futs = []
        for cap, period in ((caps[0], day), (caps[1], month)):
            if cap is None or period in held:
                continue
            fut = self._wanted.get((key_id, period))
            if fut is None:
                fut = asyncio.get_running_loop().create_future()
                self._wanted[(key_id, period)] = fut
            futs.append(fut)
        if not futs:
            return
        if self.on_wanted is not None:
            self.on_wanted()
        try:
            async with asyncio.timeout(LOAD_WAIT_S):
                for fut in futs:
                    await asyncio.shield(fut)
        except TimeoutError:
            raise ServiceUnavailable("The usage ledger is behind (storage is slow or "
                                     "failing); please retry shortly.",
                                     headers={"Retry-After": "1"}) from None

    def has_wanted(self) -> bool:
        return bool(self._wanted)

    async def read_wanted(self, queued_rows: QueuedRows | None) -> None:
        """Read the wanted books (the usage writer's task, between two batches): the
        committed spend, plus the key's rows still queued as ``pending``."""
        wanted = dict(self._wanted)
        if not wanted:
            return
        keys = sorted({k for k, _ in wanted})
        names = sorted({p for _, p in wanted})
        spent = await self._source.read_spend(keys, names)
        queued = list(queued_rows(set(keys))) if queued_rows is not None else []
        for (key_id, period), fut in wanted.items():
            if self._wanted.get((key_id, period)) is fut:
                del self._wanted[(key_id, period)]
            if not any(b.period == period for b in self.by_key.get(key_id, ())):
                book = CapBook(key_id, period, spent.get((key_id, period), 0))
                book.pending = sum(c for k, s, c in queued
                                   if k == key_id and book.start_ms <= s < book.end_ms)
                self.by_key.setdefault(key_id, []).append(book)
            if not fut.done():
                fut.set_result(None)

    def fail_wanted(self, exc: BaseException) -> None:
        """The read failed: wake the waiters (they retry on their next request)."""
        for fut in self._wanted.values():
            if not fut.done():
                fut.set_exception(ServiceUnavailable(
                    "Could not read the API key's spend; please retry shortly.",
                    headers={"Retry-After": "1"}))
                fut.exception()  # retrieved: a waiter may have gone
        self._wanted.clear()
        del exc

    def add_pending(self, key_id: int, started_ms: int, cost: int) -> None:
        """A queued row of a key with books (the usage writer's record)."""
        for book in self.by_key.get(key_id, ()):
            if book.start_ms <= started_ms < book.end_ms:
                book.pending += cost

    def committed(self, spends: Mapping[tuple[int, str], int],
                  spent: Iterable[tuple[int, str, int]], shared: bool) -> None:
        """A batch committed: its rows left ``pending``; embedded, set ``spent`` as the
        UPSERT returned it; shared, the cap lease was spent."""
        by_key = self.by_key
        for (key_id, period), amount in spends.items():
            for book in by_key.get(key_id, ()):
                if book.period == period:
                    book.pending -= amount
                    if shared:
                        book.balance -= amount
        if not shared:
            for key_id, period, value in spent:
                for book in by_key.get(key_id, ()):
                    if book.period == period:
                        book.spent = value

    def drop_past(self, now_ms: int) -> None:
        """Forget books of periods that ended, once nothing is reserved or pending."""
        for key_id, books in list(self.by_key.items()):
            keep = [b for b in books if b.end_ms > now_ms or not b.idle()]
            if len(keep) != len(books):
                if keep:
                    self.by_key[key_id] = keep
                else:
                    del self.by_key[key_id]

    def add(self, key_id: int, period: str) -> CapBook:
        """The pot's book, made empty when missing (shared mode: the cap lease book)."""
        for book in self.by_key.get(key_id, ()):
            if book.period == period:
                return book
        book = CapBook(key_id, period, 0)
        self.by_key.setdefault(key_id, []).append(book)
        return book

    def held(self, key_id: int) -> list[CapBook]:
        """The key's books (tests, diagnostics, the lease book)."""
        return list(self.by_key.get(key_id, ()))
