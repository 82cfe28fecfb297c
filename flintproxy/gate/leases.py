"""The node-local lease book: exact money on many nodes at ~0 shared round trips a request.

RFC 4006 (Diameter credit control) does not ask the account server before every
unit of service: it grants a quota, the client spends it locally and asks again
before it runs out. Here a node takes a *lease* on a slice of an account's
available balance in PostgreSQL (``store.leases``: one conditional statement),
and ``gate.billing.Billing`` reserves against what remains of that lease exactly as
it reserves against a balance in the embedded mode: a dict lookup and integer
arithmetic, no ``await``. Since no node can spend more than its leases and the
leases never sum to more than the balance, no interleaving of requests on any
number of nodes charges an account beyond its credit.

Round trips. A slice is sized to ``SLICE_HORIZON_S`` (10 s) of the account's recent
spend, within ``[billing.lease_min_usd, billing.lease_max_usd]``, and topped up in
the background when half of it is used, so an account spending at r requests/s
costs ~1 / (10 r) round trips per request (0.01 at 10 requests/s; ``< 0.1`` from 1
request/s up); renewals are one statement per node every TTL/4 for all its leases,
whatever the traffic. Only a request its lease cannot cover, while the account may
still have unleased credit, waits for ONE top-up (``TOP_UP_WAIT_S`` at most)
before a 402: the amortized rare path. An account found exhausted is not asked for
again for ``EXHAUSTED_RETRY_S`` unless the change feed reports a credit (then at
once), so a flood against an empty account costs at most one round trip a second.

Safety. A lease lives ``billing.lease_ttl_s`` past its last renewal on PostgreSQL's
clock. This node stops spending at half that after the last renewal it *sent*
(``Billing.frozen``, a local deadline with a TTL/2 margin), so it never reserves on
a lease the database may already have expired; a lease of a crashed node expires
back to the account through the sweep any node runs. Leases idle for
``billing.lease_idle_return_s`` are returned; at shutdown (after the usage writer
drained) all are; a disabled or deleted account's unreserved lease is given back
as soon as the change feed reports it (within a second).

Spend caps per key are leased the same way (``gate.capleases``, a book beside this
one that reuses ``slice_size``); this book's periodic jobs run its jobs too, so one
renewal job (one more statement) and one freeze cover both kinds of lease.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from flintproxy.config import BillingConfig
from flintproxy.gate.billing import Billing
from flintproxy.store.leases import LeaseStore

log = logging.getLogger("flintproxy.gate.leases")

SLICE_HORIZON_S = 10.0  # a slice covers ~10 s of the account's recent spend
TOP_UP_WAIT_S = 2.0  # the rare path's bounded wait for one top-up
EXHAUSTED_RETRY_S = 1.0  # an exhausted account is asked again after this (or a credit)
RENEWALS_PER_TTL = 4  # leases are renewed every TTL/4
SAFE_FRACTION = 0.5  # ... and spent until TTL/2 after the last renewal sent
GIVE_BACK_KINDS = frozenset({"account_disabled", "account_deleted"})
REFILL_KINDS = frozenset({"credit", "account_enabled"})


def new_node_id() -> str:
    """A node identity unique to this process's life: a restarted node never resumes
    the leases of its previous life (it no longer knows what they spent)."""
    return f"{socket.gethostname()[:40]}/{os.getpid()}/{secrets.token_hex(4)}"


def slice_size(lo: int, hi: int, last_slice: int, grown_at: float, available_then: int,
               available: int) -> int:
    """The next slice of a pot (an account, or a key's cap in a period): ``lo`` at
    first, then ``SLICE_HORIZON_S`` of the spend rate seen since the last grow."""
    if last_slice == 0:
        return lo
    elapsed = time.monotonic() - grown_at
    spent = max(available_then - available, 0)
    rate = spent / elapsed if elapsed > 0 else 0.0
    return min(max(int(rate * SLICE_HORIZON_S), lo), hi)


class CapLeaseJobs(Protocol):
    """The spend caps' leases (``gate.capleases.CapLeaseBook``), run by this book's
    periodic jobs so that ONE renewal covers both kinds of lease."""

    def holds_any(self) -> bool: ...

    async def renew(self, sent: float) -> None: ...

    async def sweep(self) -> None: ...

    async def return_idle(self) -> None: ...

    async def close(self) -> None: ...


PotT = TypeVar("PotT", int, tuple[int, str])  # an account id, or a key's (key, period)


class LeaseWork(Generic[PotT]):
    """What a lease book asks its background task to do, and the one loop doing it.

    Both books (credit leases here, cap leases in ``gate.capleases``) queue give-backs
    and top-ups from the hot path in O(1) and wake the task; it serves give-backs
    first, then top-ups, and answers the requests waiting for one. A failed operation
    is logged (ids only) and counts as not grown: the waiting request gets its 402
    or 503, the next one asks again.
    """

    def __init__(self, label: Callable[[PotT], str]) -> None:
        self.wanted: dict[PotT, int] = {}  # pot -> the extra a waiting request needs
        self.give_back: set[PotT] = set()
        self.waiters: dict[PotT, asyncio.Future[bool]] = {}
        self.wake = asyncio.Event()
        self._label: Callable[[PotT], str] = label

    def soon(self, pot: PotT) -> None:
        """Top the pot's lease up in the background (its low-water mark passed; O(1))."""
        if pot not in self.wanted:
            self.wanted[pot] = 0
            self.wake.set()

    async def top_up(self, pot: PotT, need_nano: int) -> bool:
        """Wait, at most ``TOP_UP_WAIT_S``, for one top-up covering ``need_nano`` more
        (coalesced per pot); whether it grew."""
        self.wanted[pot] = max(self.wanted.get(pot, 0), need_nano)
        fut = self.waiters.get(pot)
        if fut is None:
            fut = self.waiters[pot] = asyncio.get_running_loop().create_future()
        self.wake.set()
        try:
            async with asyncio.timeout(TOP_UP_WAIT_S):
                return await asyncio.shield(fut)
        except TimeoutError:
            return False

    def closed(self) -> None:
        """Shutdown: every request still waiting for a top-up is told it did not grow."""
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_result(False)

    async def serve(self, return_rest: Callable[[PotT], Awaitable[bool]],
                    grow: Callable[[PotT, int], Awaitable[bool]]) -> None:
        """The book's background task: runs until cancelled."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.give_back:
                await self.guarded(return_rest, self.give_back.pop())
            while self.wanted:
                pot, need = self.wanted.popitem()
                grew = await self.guarded(grow, pot, need)
                fut = self.waiters.pop(pot, None)
                if fut is not None and not fut.done():
                    fut.set_result(grew)

    async def guarded(self, job: Callable[..., Awaitable[bool]], pot: PotT, *args: int
                      ) -> bool:
        try:
            return bool(await job(pot, *args))
        except Exception as exc:
            log.warning("lease operation failed (%s): %s", self._label(pot), exc)
            return False


@dataclass(slots=True)
class _Lease:
    account_id: int
    lease_id: int | None  # None: the account had nothing free when asked
    taken_at: float  # monotonic time the lease was granted (renewal safety)
    grown_at: float  # monotonic time of the last grant or top-up (spend rate)
    available_then: int  # Billing.available right after it
    slice: int = 0
    exhausted_until: float = 0.0
    seen: tuple[int | None, int, int] = (None, 0, 0)  # Billing.snapshot at the last idle pass
    seen_at: float = 0.0


class LeaseBook:
    """This node's credit leases; see the module docstring.

    Built after ``Billing`` (it registers itself as ``billing.leases``), owned by the
    composition root: ``run`` is a spawned task, ``renew``, ``sweep`` and
    ``return_idle`` are periodic jobs, ``close`` runs after the usage writer drained.
    """

    def __init__(self, store: LeaseStore, billing: Billing, cfg: BillingConfig,
                 node_id: str | None = None) -> None:
        self.store = store
        self._billing = billing
        billing.leases = self
        self.node_id = node_id or new_node_id()
        self.ttl_s = cfg.lease_ttl_s
        self._ttl_ms = round(cfg.lease_ttl_s * 1000)
        self._min = cfg.lease_min_nano
        self._max = cfg.lease_max_nano
        self.idle_s = cfg.lease_idle_return_s
        self._leases: dict[int, _Lease] = {}
        self._work: LeaseWork[int] = LeaseWork(lambda account_id: f"account {account_id}")
        self._renewed_at: float | None = None  # the last renewal covering every lease
        self._deadline: asyncio.TimerHandle | None = None
        # Read by metrics.
        self.top_ups = 0
        self.freezes = 0
        # Shared mode with spend caps: the cap leases (gate.capleases registers itself).
        self.caps: CapLeaseJobs | None = None
        self.min_nano, self.max_nano, self.ttl_ms = self._min, self._max, self._ttl_ms

    # --- the hot path's hooks (synchronous, O(1)) ------------------------------------

    def lease_of(self, account_id: int) -> int | None:
        """The lease the account's queued usage rows are charged to (the usage writer)."""
        lease = self._leases.get(account_id)
        return None if lease is None else lease.lease_id

    def low(self, account_id: int) -> None:
        self._work.soon(account_id)

    def may_grow(self, account_id: int) -> bool:
        if self._billing.frozen:
            return False
        lease = self._leases.get(account_id)
        return lease is None or lease.exhausted_until <= time.monotonic()

    # --- the rare path (awaited by a request) ------------------------------------------

    async def take(self, account_id: int) -> None:
        """The first lease on an account (Billing.load); raises 503 when unreachable."""
        started = time.monotonic()
        grant = await self.store.grant(account_id, self.node_id, self._min, self._ttl_ms)
        now = time.monotonic()
        current = self._leases.get(account_id)
        if grant is None:
            if current is None or current.lease_id is None:
                self._leases[account_id] = _Lease(account_id, None, now, now, 0,
                                                  exhausted_until=now + EXHAUSTED_RETRY_S)
            if not self._billing.is_loaded(account_id):
                self._billing.lease_changed(account_id, 0, 0)
            return
        if current is not None and current.lease_id is not None:
            # A background top-up took one meanwhile: one lease per account.
            await self.store.close(grant.lease_id, account_id, self.node_id)
            if not self._billing.is_loaded(account_id):
                self._billing.lease_changed(account_id, 0, 0)
            return
        if not self._holds_any():
            self._set_renewed(started)
        self._leases[account_id] = _Lease(account_id, grant.lease_id, started, now,
                                          grant.granted_nano, grant.granted_nano)
        self._billing.lease_changed(account_id, grant.granted_nano, grant.granted_nano // 2)

    async def top_up(self, account_id: int, need_nano: int) -> bool:
        """Wait for one top-up covering ``need_nano`` more (coalesced per account)."""
        if not self.may_grow(account_id):
            return False
        return await self._work.top_up(account_id, need_nano)

    # --- the change feed ---------------------------------------------------------------

    def on_change(self, kind: str, account_id: int | None, key_id: int | None) -> None:
        """ChangeFeed subscriber: credits are leasable at once; a disabled or deleted
        account's unreserved lease goes back."""
        targets = list(self._leases.values()) if account_id is None else (
            [self._leases[account_id]] if account_id in self._leases else [])
        if kind in REFILL_KINDS:
            for lease in targets:
                lease.exhausted_until = 0.0
        elif kind in GIVE_BACK_KINDS:
            for lease in targets:
                lease.exhausted_until = float("inf")  # until enabled again
                self._work.give_back.add(lease.account_id)
            if targets:
                self._work.wake.set()

    # --- background work -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve top-ups and give-backs as the hot path asks (a task of the root)."""
        await self._work.serve(self._return_rest, self._grow)

    def _slice(self, lease: _Lease | None, available: int) -> int:
        if lease is None:
            return self._min
        return slice_size(self._min, self._max, lease.slice, lease.grown_at,
                          lease.available_then, available)

    async def _grow(self, account_id: int, need: int) -> bool:
        lease = self._leases.get(account_id)
        if not self.may_grow(account_id):
            return False
        available = self._billing.available(account_id) or 0
        want = max(self._slice(lease, available), need)
        started = time.monotonic()
        if lease is None or lease.lease_id is None:
            grant = await self.store.grant(account_id, self.node_id, want, self._ttl_ms)
            added = 0 if grant is None else grant.granted_nano
            current = self._leases.get(account_id)
            if grant is not None and current is not lease and current is not None and \
                    current.lease_id is not None:
                # A first request took a lease meanwhile: one lease per account.
                await self.store.close(grant.lease_id, account_id, self.node_id)
                return False
            if grant is not None:
                if not self._holds_any():
                    self._set_renewed(started)
                lease = self._leases[account_id] = _Lease(account_id, grant.lease_id, started,
                                                          started, 0)
        else:
            added = await self.store.top_up(lease.lease_id, account_id, self.node_id, want,
                                             self._ttl_ms)
            if self._leases.get(account_id) is not lease:
                # Closed or expired meanwhile: whatever was added went back with it.
                return False
        now = time.monotonic()
        if lease is None:
            lease = self._leases[account_id] = _Lease(account_id, None, now, now, 0)
        if added < want:
            lease.exhausted_until = now + EXHAUSTED_RETRY_S
        if added:
            self.top_ups += 1
            lease.grown_at = now
            lease.slice = added
            lease.available_then = (self._billing.available(account_id) or 0) + added
            self._billing.lease_changed(account_id, added, max(want, added) // 2)
        return added >= need and added > 0

    async def _return_rest(self, account_id: int) -> bool:
        """Give back what the account's lease holds beyond its reservations and
        unwritten rows; close it when nothing is outstanding."""
        lease = self._leases.get(account_id)
        if lease is None or lease.lease_id is None:
            return True
        balance, pending, reserved = self._billing.snapshot(account_id)
        if not pending and not reserved:
            return await self._close(lease)
        rest = (balance or 0) - pending - reserved
        if rest <= 0:
            return True
        self._billing.lease_changed(account_id, -rest, 0)  # before the await: never spent
        return await self.store.give_back(lease.lease_id, account_id, self.node_id, rest)

    async def _close(self, lease: _Lease) -> bool:
        assert lease.lease_id is not None
        if self._leases.get(lease.account_id) is lease:
            del self._leases[lease.account_id]
            self._billing.lease_changed(lease.account_id, None, 0)
        await self.store.close(lease.lease_id, lease.account_id, self.node_id)
        return True

    async def renew(self) -> None:
        """Renew every lease this node holds (one statement); drop those the database
        no longer has, and lift a freeze (periodic, every TTL/4)."""
        held = {lease.lease_id: lease for lease in self._leases.values()
                if lease.lease_id is not None}
        caps = self.caps
        if not held and (caps is None or not caps.holds_any()):
            self._unfreeze()
            return
        sent = time.monotonic()
        alive = await self.store.extend(self.node_id, self._ttl_ms, list(held)) if held \
            else set()
        if caps is not None:
            await caps.renew(sent)  # one more statement: the node's cap leases
        for lease_id, lease in held.items():
            if lease_id not in alive and lease.taken_at < sent and \
                    self._leases.get(lease.account_id) is lease:
                # Swept while we could not renew it: its rest went back to the account.
                # Rows still queued for it are charged as late rows (store.leases).
                log.warning("credit lease %d expired before it could be renewed", lease_id)
                del self._leases[lease.account_id]
                self._billing.lease_changed(lease.account_id, None, 0)
        self._set_renewed(sent)
        # A backstop for a top-up that failed: re-arm what is below its mark.
        for lease in self._leases.values():
            if lease.lease_id is not None and lease.slice and \
                    (self._billing.available(lease.account_id) or 0) < lease.slice // 2:
                self.low(lease.account_id)

    def _holds_any(self) -> bool:
        return any(lease.lease_id is not None for lease in self._leases.values()) or \
            (self.caps is not None and self.caps.holds_any())

    def renewed_unless_held(self, sent: float) -> None:
        """A first lease (a cap lease) granted at ``sent``: arm the renewal deadline
        when this node held no lease before (the cap lease book)."""
        if not self._holds_any():
            self._set_renewed(sent)

    def _set_renewed(self, sent: float) -> None:
        self._renewed_at = sent
        if self._deadline is not None:
            self._deadline.cancel()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_at(
            loop.time() + (sent + self.ttl_s * SAFE_FRACTION - time.monotonic()), self._freeze)
        self._unfreeze()

    def _freeze(self) -> None:
        if (self._leases or self._holds_any()) and not self._billing.frozen:
            log.error("credit leases could not be renewed for %.1f s: no new reservations "
                      "until the shared store answers", self.ttl_s * SAFE_FRACTION)
            self.freezes += 1
            self._billing.frozen = True

    def _unfreeze(self) -> None:
        if self._billing.frozen:
            log.warning("credit leases renewed: reservations resume")
            self._billing.frozen = False

    async def sweep(self) -> None:
        """Return expired leases (any node's) to their accounts (periodic); expired cap
        leases to their caps."""
        await self.store.sweep()
        if self.caps is not None:
            await self.caps.sweep()

    async def return_idle(self) -> None:
        """Close leases that nothing used for ``idle_s`` (periodic)."""
        now = time.monotonic()
        for lease in list(self._leases.values()):
            snap = self._billing.snapshot(lease.account_id)
            if snap != lease.seen:
                lease.seen, lease.seen_at = snap, now
            elif now - lease.seen_at >= self.idle_s and not snap[1] and not snap[2]:
                if lease.lease_id is None:
                    if self._leases.get(lease.account_id) is lease:
                        del self._leases[lease.account_id]
                        self._billing.lease_changed(lease.account_id, None, 0)
                else:
                    await self._work.guarded(self._return_rest, lease.account_id)
        if self.caps is not None:
            await self.caps.return_idle()

    async def close(self) -> None:
        """Shutdown, after the usage writer drained: return every lease with nothing
        outstanding (the others expire)."""
        if self._deadline is not None:
            self._deadline.cancel()
        if self.caps is not None:
            with suppress(Exception):
                await self.caps.close()
        for lease in list(self._leases.values()):
            if lease.lease_id is not None:
                with suppress(Exception):
                    await self._return_rest(lease.account_id)
        self._work.closed()
