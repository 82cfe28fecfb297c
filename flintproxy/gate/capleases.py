"""The node-local cap lease book: spend caps per key exact on many nodes (shared mode).

A key's cap in a UTC period (a *pot*: (key, period)) is leased like an account's
balance (``gate.leases``, RFC 4006 quota grants): this node holds a slice of the
cap's free part (``store.cap_leases``) in the pot's ``CapBook.balance``, and
``Billing.reserve`` books a request in it beside the account's credit lease with no
``await`` in between. No node spends more than its cap leases and the cap leases of
a pot never sum to more than ``cap - spent``, so **no interleaving of requests on
any number of nodes lets a key's charged spend in a UTC day or month exceed its
cap**; a late row of an expired cap lease is charged only the cap's free part
(``store.debitplan.plan_debits``), the rest written off.

Same mechanics as the credit leases, and the same jobs: the first request of a key
in a period awaits one grant (``take``); slices are sized by ``gate.leases.
slice_size`` and topped up in the background at half; a request the cap lease
cannot cover while the cap may still have free money raises ``LeaseShortfall``
naming the book, on which the gate awaits ONE top-up (``TOP_UP_WAIT_S``) before a
402 ``spend_cap_reached``; a pot found exhausted is not asked again for
``EXHAUSTED_RETRY_S`` unless its cap changes. ``LeaseBook``'s periodic jobs run
this book's too: the renewal (one more statement for all the node's cap leases,
and the same freeze when it cannot renew), the expiry sweep, the idle return, and
the return at shutdown after the usage writer drained.

A cap lowered, removed, or the key revoked: the change event (``key_caps_changed``,
``key_revoked``, within a second on every node) makes this node give back the
unreserved rest of its cap leases on the key; new slices are then taken under the
new cap. The window that remains: requests already admitted keep their
reservations, so a key's spend in the period may end up to what was reserved on
its nodes when the cap changed above a *lowered* cap (never above the cap in force
when they were admitted); no request admitted after the give-back can pass it.
A cap newly *set* on a key that had none has the same window from the other side:
a node admits the key's requests uncapped until it hears the change (within a
second; the embedded mode has it too, and the README states it), and those rows
are charged in full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from dataclasses import dataclass

from flintproxy.gate.billing import Billing
from flintproxy.gate.leases import (
    EXHAUSTED_RETRY_S,
    LeaseBook,
    LeaseWork,
    slice_size,
)
from flintproxy.gate.spendcaps import CapBook
from flintproxy.store.cap_leases import CapLeaseStore, Pot

__all__ = ["CapLeaseBook"]

log = logging.getLogger("flintproxy.gate.capleases")

GIVE_BACK_KINDS = frozenset({"key_caps_changed", "key_revoked"})


@dataclass(slots=True)
class _CapLease:
    book: CapBook
    lease_id: int | None  # None: the cap had nothing free when asked (or it ended)
    taken_at: float
    grown_at: float = 0.0
    available_then: int = 0
    slice: int = 0
    exhausted_until: float = 0.0
    seen: tuple[int, int, int] = (0, 0, 0)
    seen_at: float = 0.0


def _available(book: CapBook) -> int:
    return book.balance - book.pending - book.reserved


class CapLeaseBook:
    """This node's cap leases; see the module docstring. Built after the LeaseBook
    (registers itself as ``billing.caps.leases`` and ``leases.caps``); ``run`` is a
    task of the composition root."""

    def __init__(self, store: CapLeaseStore, billing: Billing, leases: LeaseBook) -> None:
        self.store = store
        self._billing = billing
        self._books = billing.caps
        self._books.leases = self
        self._credit = leases
        leases.caps = self
        self.node_id = leases.node_id
        self._ttl_ms = leases.ttl_ms
        self._min = leases.min_nano
        self._max = leases.max_nano
        self.idle_s = leases.idle_s
        self._leases: dict[Pot, _CapLease] = {}
        self._takes: dict[Pot, asyncio.Task[None]] = {}
        self._work: LeaseWork[Pot] = LeaseWork(lambda pot: f"key {pot[0]}, {pot[1]}")
        self.top_ups = 0  # read by tests and the bench

    # --- the hot path's hooks (synchronous, O(1)) ------------------------------------

    def cap_leases_of(self, key_id: int) -> dict[str, int | None] | None:
        """The usage writer: the key's cap lease per period, None without cap books."""
        books = self._books.by_key.get(key_id)
        if books is None:
            return None
        out: dict[str, int | None] = {}
        for book in books:
            lease = self._leases.get((key_id, book.period))
            out[book.period] = None if lease is None else lease.lease_id
        return out

    def low(self, book: CapBook) -> None:
        self._work.soon((book.key_id, book.period))

    def may_grow(self, book: CapBook) -> bool:
        if self._billing.frozen:
            return False
        lease = self._leases.get((book.key_id, book.period))
        return lease is None or lease.exhausted_until <= time.monotonic()

    def holds_any(self) -> bool:
        return any(lease.lease_id is not None for lease in self._leases.values())

    # --- the rare path (awaited by a request) ------------------------------------------

    async def take(self, key_id: int, period: str) -> None:
        """The pot's book with a first cap lease; concurrent callers share one grant."""
        pot = (key_id, period)
        task = self._takes.get(pot)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._take(pot))
            self._takes[pot] = task
            task.add_done_callback(lambda t: self._take_done(pot, t))
        await asyncio.shield(task)

    def _take_done(self, pot: Pot, task: asyncio.Task[None]) -> None:
        self._takes.pop(pot, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def _take(self, pot: Pot) -> None:
        started = time.monotonic()
        grant = await self.store.grant(pot, self.node_id, self._min, self._ttl_ms)
        book = self._books.add(*pot)
        if pot in self._leases:  # a top-up made one meanwhile
            if grant is not None:
                await self.store.close(grant.lease_id, pot, self.node_id)
            return
        now = time.monotonic()
        if grant is None:
            self._leases[pot] = _CapLease(book, None, now, now,
                                          exhausted_until=now + EXHAUSTED_RETRY_S)
            return
        self._credit.renewed_unless_held(started)
        self._leases[pot] = _CapLease(book, grant.lease_id, started, now,
                                      _available(book) + grant.granted_nano,
                                      slice=grant.granted_nano)
        book.balance += grant.granted_nano
        book.low_water = grant.granted_nano // 2

    async def top_up(self, book: CapBook, need_nano: int) -> bool:
        """Wait for one top-up covering ``need_nano`` more (coalesced per pot)."""
        if not self.may_grow(book):
            return False
        pot = (book.key_id, book.period)
        return await self._work.top_up(pot, need_nano)

    # --- the change feed ---------------------------------------------------------------

    def on_change(self, kind: str, account_id: int | None, key_id: int | None) -> None:
        """ChangeFeed subscriber: a key's caps changed or it was revoked: give back the
        unreserved rest of its cap leases (new slices come under the new cap)."""
        if kind not in GIVE_BACK_KINDS:
            return
        for pot, lease in self._leases.items():
            if key_id is None or pot[0] == key_id:
                lease.exhausted_until = float("inf") if kind == "key_revoked" else 0.0
                self._work.give_back.add(pot)
        if self._work.give_back:
            self._work.wake.set()

    # --- background work -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve top-ups and give-backs as the hot path asks (a task of the root)."""
        await self._work.serve(self._return_rest, self._grow)

    async def _grow(self, pot: Pot, need: int) -> bool:
        lease = self._leases.get(pot)
        book = self._books.add(*pot) if lease is None else lease.book
        if not self.may_grow(book):
            return False
        available = _available(book)
        want = max(need, self._min if lease is None else slice_size(
            self._min, self._max, lease.slice, lease.grown_at, lease.available_then,
            available))
        started = time.monotonic()
        if lease is None or lease.lease_id is None:
            grant = await self.store.grant(pot, self.node_id, want, self._ttl_ms,
                                           ensure=lease is None)
            added = 0 if grant is None else grant.granted_nano
            current = self._leases.get(pot)
            if grant is not None and current is not lease and current is not None and \
                    current.lease_id is not None:
                await self.store.close(grant.lease_id, pot, self.node_id)  # one per pot
                return False
            if grant is not None:
                self._credit.renewed_unless_held(started)
                lease = self._leases[pot] = _CapLease(book, grant.lease_id, started)
        else:
            added = await self.store.top_up(lease.lease_id, pot, self.node_id, want,
                                             self._ttl_ms)
            if self._leases.get(pot) is not lease:
                return False  # closed or expired meanwhile: what was added went with it
        now = time.monotonic()
        if lease is None:
            lease = self._leases[pot] = _CapLease(book, None, now)
        if added < want:
            lease.exhausted_until = now + EXHAUSTED_RETRY_S
        if added:
            self.top_ups += 1
            lease.grown_at = now
            lease.slice = added
            lease.available_then = _available(book) + added
            book.balance += added
            book.low_water = max(want, added) // 2
        return added >= need and added > 0

    async def _return_rest(self, pot: Pot) -> bool:
        """Give back what the cap lease holds beyond its reservations and unwritten
        rows; close it when nothing is outstanding."""
        lease = self._leases.get(pot)
        if lease is None or lease.lease_id is None:
            return True
        book = lease.book
        if not book.pending and not book.reserved:
            return await self._close(pot, lease)
        rest = _available(book)
        if rest <= 0:
            return True
        book.balance -= rest  # before the await: never spent
        return await self.store.give_back(lease.lease_id, pot, self.node_id, rest)

    async def _close(self, pot: Pot, lease: _CapLease) -> bool:
        assert lease.lease_id is not None
        if self._leases.get(pot) is lease:
            del self._leases[pot]
            lease.book.balance = 0
            lease.book.low_water = 0
        await self.store.close(lease.lease_id, pot, self.node_id)
        return True

    def _ended(self, pot: Pot, lease: _CapLease) -> None:
        """The database no longer has the lease (swept): nothing of it is spendable;
        rows still queued for it are charged as late rows (store.leases)."""
        if self._leases.get(pot) is lease:
            del self._leases[pot]
            lease.book.balance = 0
            lease.book.low_water = 0

    async def renew(self, sent: float) -> None:
        """Renew every cap lease of the node (one statement; ``LeaseBook.renew``)."""
        held = {lease.lease_id: (pot, lease) for pot, lease in self._leases.items()
                if lease.lease_id is not None}
        if not held:
            return
        alive = await self.store.extend(self.node_id, self._ttl_ms, list(held))
        for lease_id, (pot, lease) in held.items():
            if lease_id not in alive and lease.taken_at < sent:
                log.warning("cap lease %d expired before it could be renewed", lease_id)
                self._ended(pot, lease)
        for lease in self._leases.values():  # a backstop for a failed top-up
            if lease.lease_id is not None and lease.slice and \
                    _available(lease.book) < lease.slice // 2:
                self.low(lease.book)

    async def sweep(self) -> None:
        """Return expired cap leases (any node's) to their caps (periodic)."""
        await self.store.sweep()

    async def return_idle(self) -> None:
        """Close cap leases that nothing used for ``idle_s`` (periodic)."""
        now = time.monotonic()
        for pot, lease in list(self._leases.items()):
            book = lease.book
            snap = (book.balance, book.pending, book.reserved)
            if snap != lease.seen:
                lease.seen, lease.seen_at = snap, now
            elif now - lease.seen_at >= self.idle_s and book.idle():
                if lease.lease_id is None:
                    if self._leases.get(pot) is lease:
                        del self._leases[pot]
                else:
                    await self._work.guarded(self._return_rest, pot)

    async def close(self) -> None:
        """Shutdown, after the usage writer drained: return every cap lease with
        nothing outstanding (the others expire)."""
        for pot, lease in list(self._leases.items()):
            if lease.lease_id is not None:
                with suppress(Exception):
                    await self._return_rest(pot)
        self._work.closed()
