"""API-key authentication on the hot path, and cross-process change propagation.

Hot path: ``KeyAuthenticator.authenticate`` hashes the bearer key and looks the
digest up in a dict; a hit awaits nothing and touches no disk. A miss goes to the
database once (concurrent misses for one digest share the query) and unknown or
revoked keys are remembered briefly, so a flood of bad keys costs one query each
at most. ``last_used_at`` is marked in memory and written in one batch every few
seconds.

Cross-process changes: every mutation in ``accounts`` writes an ``events`` row in
its own transaction. ``ChangeWatcher`` polls ``SELECT ... FROM events WHERE id > ?``
every ``accounts.change_poll_s`` (default 0.25 s) and tells its subscribers, which
drop what they cached; so a revocation or a disable done by ``flintproxy admin`` in
another process reaches a running server well within one second. Changes made in
this process are published at once, after their commit, and not again by the poll.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiosqlite
import orjson
from aiohttp import web

from flintproxy.config import Config
from flintproxy.errors import AuthenticationError, PermissionDenied
from flintproxy.gate.gate import Principal, hash_key
from flintproxy.gate.limiter import IpGuard, Network
from flintproxy.store import sqlite
from flintproxy.store.accounts import (
    EV_ACCOUNT_CREATED,
    EV_CREDIT,
    EV_EMAIL_CHANGED,
    EV_KEY_CREATED,
    EV_PASSWORD_CHANGED,
    KEY_RE,
    Accounts,
    bootstrap_demo_account,
)

log = logging.getLogger("flintproxy.gate.keys")

Subscriber = Callable[[str, int | None, int | None], None]

# Events that change nothing a cached key depends on.
_HARMLESS = frozenset({EV_ACCOUNT_CREATED, EV_CREDIT, EV_EMAIL_CHANGED, EV_KEY_CREATED,
                       EV_PASSWORD_CHANGED})


def _invalid_key() -> AuthenticationError:
    return AuthenticationError("Incorrect API key provided.", code="invalid_api_key")


@dataclass(slots=True)
class _Entry:
    principal: Principal
    expires_at: int | None  # the key's expiry, unix ms
    fresh_until: float  # monotonic: reload after this even without an event
    disabled: bool


class KeyAuthenticator:
    """API key -> Principal, cached in memory; see the module docstring."""

    def __init__(self, accounts: Accounts, *, cache_ttl_s: float = 300.0,
                 negative_ttl_s: float = 10.0, max_entries: int = 200_000,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = sqlite.now_ms) -> None:
        self._accounts = accounts
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
        async with self._accounts.db.execute(
                "SELECT k.id, k.account_id, k.expires_at, k.revoked_at, k.allowed_models, "
                "k.rpm, k.tpm, k.max_concurrent, a.status, a.rpm, a.tpm, a.max_concurrent "
                "FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.key_hash = ?",
                (h,)) as cur:
            row = await cur.fetchone()
        if row is None or row[3] is not None or row[8] == "deleted" or (
                row[2] is not None and row[2] <= self._wall()):
            # Unknown, revoked or expired: none of these can become valid again.
            self._drop(h)
            self._remember_invalid(h)
            return None
        models = None if row[4] is None else frozenset(orjson.loads(row[4]))
        principal = Principal(key_id=int(row[0]), account_id=int(row[1]), allowed_models=models,
                              rpm=row[5], tpm=row[6], max_concurrent=row[7],
                              account_limits=(row[9], row[10], row[11]))
        entry = _Entry(principal, row[2], self._clock() + self._cache_ttl, row[8] == "disabled")
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
            async with self._accounts.transaction() as db:
                await db.executemany(
                    "UPDATE api_keys SET last_used_at = ? WHERE id = ? AND "
                    "(last_used_at IS NULL OR last_used_at < ?)",
                    [(ts, kid, ts) for kid, ts in batch.items()])
        except BaseException:
            for kid, ts in batch.items():  # retry next time; a newer mark wins
                self._used.setdefault(kid, ts)
            raise
        return len(batch)

    async def run_flusher(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush_last_used()
            except Exception:
                log.exception("writing last_used_at failed; will retry")

    async def close(self) -> None:
        """Cancel in-flight lookups and write the last marks (call at shutdown)."""
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.flush_last_used()


class ChangeWatcher:
    """Polls the ``events`` table and calls subscribers; see the module docstring.

    Subscribers are plain callables ``(kind, account_id, key_id) -> None`` run on the
    event loop; they must be quick and idempotent (reload, don't add).
    """

    def __init__(self, db: aiosqlite.Connection, poll_s: float, *, batch: int = 1000,
                 lock: asyncio.Lock | None = None) -> None:
        self._db = db
        # The connection's transaction lock (Accounts.lock): a poll must never run
        # inside an open transaction, where it could see an event row that is then
        # rolled back and its id reused.
        self._lock = lock or asyncio.Lock()
        self.poll_s = poll_s
        self._batch = batch
        self._subscribers: list[Subscriber] = []
        self._published: set[int] = set()
        self.last_id = 0

    def subscribe(self, callback: Subscriber) -> None:
        self._subscribers.append(callback)

    async def start(self) -> None:
        """Skip past existing events: nothing is cached yet, so they changed nothing."""
        async with self._lock, self._db.execute("SELECT COALESCE(MAX(id), 0) FROM events") as cur:
            row = await cur.fetchone()
        self.last_id = int(row[0]) if row else 0
        self._published = {i for i in self._published if i > self.last_id}

    def publish(self, event_id: int, kind: str, account_id: int | None,
                key_id: int | None) -> None:
        """Dispatch a change committed by this process now; the poll will skip it."""
        if event_id > self.last_id:
            self._published.add(event_id)
        self._dispatch(kind, account_id, key_id)

    def _dispatch(self, kind: str, account_id: int | None, key_id: int | None) -> None:
        for callback in self._subscribers:
            try:
                callback(kind, account_id, key_id)
            except Exception:
                log.exception("change subscriber failed on %r", kind)

    async def poll_once(self) -> int:
        """Dispatch events newer than ``last_id``; returns how many were read."""
        async with self._lock, self._db.execute(
                "SELECT id, kind, account_id, key_id FROM events WHERE id > ? ORDER BY id "
                "LIMIT ?", (self.last_id, self._batch)) as cur:
            rows = list(await cur.fetchall())
        for event_id, kind, account_id, key_id in rows:
            self.last_id = event_id
            if event_id in self._published:
                self._published.discard(event_id)
                continue
            self._dispatch(kind, account_id, key_id)
        return len(rows)

    async def run(self) -> None:
        while True:
            try:
                while await self.poll_once() >= self._batch:
                    pass
            except Exception:
                log.exception("polling the events table failed; will retry")
            await asyncio.sleep(self.poll_s)


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """What the /api/ handlers need from the config (set by ``accounts_ctx``)."""

    secure_cookies: bool
    session_ttl_s: int
    trusted_proxies: tuple[Network, ...]
    models: frozenset[str]

    @classmethod
    def from_config(cls, cfg: Config) -> AuthSettings:
        models = frozenset(m for u in cfg.upstreams for m in u.models)
        return cls(cfg.accounts.secure_cookies, cfg.accounts.session_ttl_s,
                   cfg.limits.trusted_proxies, models)


ACCOUNTS = web.AppKey("flint.accounts", Accounts)
SETTINGS = web.AppKey("flint.auth_settings", AuthSettings)
KEY_AUTH = web.AppKey("flint.key_auth", KeyAuthenticator)
WATCHER = web.AppKey("flint.change_watcher", ChangeWatcher)
# The demo key created at this start (accounts.bootstrap_demo), for the operator's
# console only: never logged, never written to disk. Absent when none was created.
DEMO_KEY = web.AppKey("flint.demo_key", str)
# Throttles logins (per IP and per account) and failed API-key auth per IP.
LOGIN_GUARD = web.AppKey("flint.login_guard", IpGuard)

LAST_USED_FLUSH_S = 5.0
JANITOR_S = 600.0
EVENTS_KEEP_MS = 24 * 3600 * 1000


async def _janitor(repo: Accounts) -> None:
    while True:
        await asyncio.sleep(JANITOR_S)
        try:
            await repo.purge_expired_sessions()
            async with repo.transaction() as db:
                await db.execute("DELETE FROM events WHERE created_at < ?",
                                 (repo.clock() - EVENTS_KEEP_MS,))
        except Exception:
            log.exception("session/event cleanup failed; will retry")


async def accounts_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: accounts repository, key cache, change watcher and their tasks.

    Uses its own connection to the store (opened after ``db_ctx`` migrated it) so
    its short transactions never interleave with other components' statements.
    """
    from flintproxy.app.factory import CONFIG  # app imports this module

    cfg = app[CONFIG]
    db = await sqlite.open_store(cfg.storage.path)
    tasks: list[asyncio.Task[None]] = []
    keys: KeyAuthenticator | None = None
    try:
        lock = asyncio.Lock()
        watcher = ChangeWatcher(db, cfg.accounts.change_poll_s, lock=lock)
        await watcher.start()
        repo = Accounts(db, cfg.accounts.bcrypt_cost, cfg.accounts.session_ttl_s,
                        notify=watcher.publish, lock=lock)
        keys = KeyAuthenticator(repo)
        watcher.subscribe(keys.on_change)
        app[ACCOUNTS] = repo
        app[KEY_AUTH] = keys
        app[WATCHER] = watcher
        app[LOGIN_GUARD] = IpGuard(cfg.limits)
        app[SETTINGS] = AuthSettings.from_config(cfg)
        await repo.warm()
        demo_key = await bootstrap_demo_account(repo, cfg)
        if demo_key is not None:
            app[DEMO_KEY] = demo_key
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(watcher.run()),
                 loop.create_task(keys.run_flusher(LAST_USED_FLUSH_S)),
                 loop.create_task(_janitor(repo))]
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            if keys is not None:
                await keys.close()
        except Exception:
            log.exception("final last_used_at flush failed")
        finally:
            await db.close()

