"""API-key authentication on the hot path.

Hot path: ``KeyAuthenticator.authenticate`` hashes the bearer key and looks the
digest up in a dict; a hit awaits nothing and touches no disk. A miss goes to the
database once (concurrent misses for one digest share the query) and unknown or
revoked keys are remembered briefly, so a flood of bad keys costs one query each
at most. ``last_used_at`` is marked in memory and written in one batch every few
seconds.

Cross-process changes reach the cache through ``on_change``, a subscriber of the
change feed (``store.changes``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from flintproxy.errors import AuthenticationError, PermissionDenied
from flintproxy.gate.gate import Principal
from flintproxy.store import sqlite
from flintproxy.store.accounts import (
    EV_ACCOUNT_CREATED,
    EV_CREDIT,
    EV_EMAIL_CHANGED,
    EV_KEY_CREATED,
    EV_PASSWORD_CHANGED,
    KEY_RE,
    KeyRecord,
    hash_key,
)

log = logging.getLogger("flintproxy.gate.keys")

# Events that change nothing a cached key depends on.
_HARMLESS = frozenset({EV_ACCOUNT_CREATED, EV_CREDIT, EV_EMAIL_CHANGED, EV_KEY_CREATED,
                       EV_PASSWORD_CHANGED})


def _invalid_key() -> AuthenticationError:
    return AuthenticationError("Incorrect API key provided.", code="invalid_api_key")


class KeyStore(Protocol):
    """Where keys live (``store.accounts.Accounts`` embedded; a shared database later)."""

    async def find_key(self, key_hash: bytes) -> KeyRecord | None: ...

    async def mark_keys_used(self, used: dict[int, int]) -> None: ...


@dataclass(slots=True)
class _Entry:
    principal: Principal
    expires_at: int | None  # the key's expiry, unix ms
    fresh_until: float  # monotonic: reload after this even without an event
    disabled: bool


class KeyAuthenticator:
    """API key -> Principal, cached in memory; see the module docstring."""

    def __init__(self, store: KeyStore, *, cache_ttl_s: float = 300.0,
                 negative_ttl_s: float = 10.0, max_entries: int = 200_000,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = sqlite.now_ms) -> None:
        self._store = store
        self._cache_ttl = cache_ttl_s
        self._negative_ttl = negative_ttl_s
        self._max = max_entries
        self._clock = clock
        self._wall = wall_ms
        self._cache: dict[bytes, _Entry] = {}
        self._by_account: dict[int, set[bytes]] = {}
        self._negative: dict[bytes, float] = {}
        self._inflight: dict[bytes, asyncio.Task[_Entry | None]] = {}
        self._used: dict[int, int] = {}
        # Bumped by every invalidation: a query that started before one must not
        # cache what it read, which may already be stale.
        self._generation = 0
        self.db_lookups = 0  # for tests and metrics

    async def authenticate(self, token: str) -> Principal:
        """The principal for an API key; 401 for unknown/revoked/expired, 403 if disabled."""
        h = hash_key(token)
        entry = self._cache.get(h)
        if entry is None or entry.fresh_until <= self._clock():
            neg = self._negative.get(h)
            if neg is not None and neg > self._clock():
                raise _invalid_key()
            if not KEY_RE.fullmatch(token):
                raise _invalid_key()  # cannot be one of ours: no query
            task = self._inflight.get(h)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load(h))
                self._inflight[h] = task
                task.add_done_callback(functools.partial(self._done, h))
            # Shielded: one waiter's cancellation must not cancel the shared query.
            entry = await asyncio.shield(task)
            if entry is None:
                raise _invalid_key()
        if entry.disabled:
            raise PermissionDenied("This account is disabled.", code="account_disabled")
        now = self._wall()
        if entry.expires_at is not None and now >= entry.expires_at:
            self._drop(h)
            self._remember_invalid(h)
            raise AuthenticationError("This API key has expired.", code="invalid_api_key")
        self._used[entry.principal.key_id] = now
        return entry.principal

    def _done(self, h: bytes, task: asyncio.Task[_Entry | None]) -> None:
        if self._inflight.get(h) is task:
            del self._inflight[h]
        if not task.cancelled():
            task.exception()  # retrieved: waiters got it; no "never retrieved" warning

    async def _load(self, h: bytes) -> _Entry | None:
        generation = self._generation
        self.db_lookups += 1
        rec = await self._store.find_key(h)
        if rec is None or rec.revoked or rec.account_status == "deleted" or (
                rec.expires_at is not None and rec.expires_at <= self._wall()):
            # Unknown, revoked or expired: none of these can become valid again.
            self._drop(h)
            self._remember_invalid(h)
            return None
        principal = Principal(key_id=rec.key_id, account_id=rec.account_id,
                              allowed_models=rec.allowed_models, rpm=rec.rpm, tpm=rec.tpm,
                              max_concurrent=rec.max_concurrent,
                              account_limits=rec.account_limits,
                              caps=None if rec.caps == (None, None) else rec.caps)
        entry = _Entry(principal, rec.expires_at, self._clock() + self._cache_ttl,
                       rec.account_status == "disabled")
        if generation == self._generation:
            if len(self._cache) >= self._max:
                self._drop(next(iter(self._cache)))
            self._cache[h] = entry
            self._by_account.setdefault(principal.account_id, set()).add(h)
        return entry

    def _remember_invalid(self, h: bytes) -> None:
        neg = self._negative
        if len(neg) >= self._max:
            now = self._clock()
            for k in [k for k, until in neg.items() if until <= now]:
                del neg[k]
            if len(neg) >= self._max:
                neg.clear()
        neg[h] = self._clock() + self._negative_ttl

    def _drop(self, h: bytes) -> None:
        entry = self._cache.pop(h, None)
        if entry is not None:
            hashes = self._by_account.get(entry.principal.account_id)
            if hashes is not None:
                hashes.discard(h)
                if not hashes:
                    del self._by_account[entry.principal.account_id]

    # invalidation ----------------------------------------------------------------

    def on_change(self, kind: str, account_id: int | None, key_id: int | None) -> None:
        """ChangeWatcher subscriber: drop the cache entries an event may have changed."""
        if kind in _HARMLESS:
            return
        if key_id is not None:
            self.invalidate_key(key_id, account_id)
        elif account_id is not None:
            self.invalidate_account(account_id)
        else:
            self.clear()

    def invalidate_key(self, key_id: int, account_id: int | None = None) -> None:
        self._generation += 1
        if account_id is not None:
            candidates = list(self._by_account.get(account_id, ()))
        else:
            candidates = list(self._cache)
        for h in candidates:
            entry = self._cache.get(h)
            if entry is not None and entry.principal.key_id == key_id:
                self._drop(h)

    def invalidate_account(self, account_id: int) -> None:
        self._generation += 1
        for h in list(self._by_account.get(account_id, ())):
            self._drop(h)

    def clear(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._by_account.clear()

    # last_used_at ------------------------------------------------------------------

    async def flush_last_used(self) -> int:
        """Write the marked last_used_at times in one transaction; returns rows written."""
        if not self._used:
            return 0
        batch, self._used = self._used, {}
        try:
            await self._store.mark_keys_used(batch)
        except BaseException:
            for kid, ts in batch.items():  # retry next time; a newer mark wins
                self._used.setdefault(kid, ts)
            raise
        return len(batch)

    async def close(self) -> None:
        """Cancel in-flight lookups and write the last marks (call at shutdown)."""
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.flush_last_used()
        except Exception as exc:
            # Best-effort metadata: a store still locked by another process at exit
            # ("database is locked" after the busy timeout) must not fail the shutdown
            # (the usage writer, which holds money, has already drained by now).
            log.warning("last_used_at: %d marks not written at shutdown (%s)",
                        len(self._used), type(exc).__name__)
