"""The composition root: every component built complete, in start-up order.

``open_components`` is the one place that knows how the gateway is assembled. Each
component is constructed with everything it needs (no ``bind()``, no attribute set
later); each resource's closer is pushed on the caller's exit stack as it opens, so
shutdown closes them in the reverse order; every background job is a task of the
caller's ``TaskGroup``. The order, and why:

    store        the engine ([storage] backend, picked here and nowhere else):
                 SQLite migrates on its first connection (before anyone else
                 connects); PostgreSQL opens one pool, refuses a schema behind this
                 release (``flintproxy admin migrate``) and LISTENs for changes.
                 Then the accounts repository, change feed, key cache, IP guard
    ledger       balances (shared mode: the node's credit leases, returned after the
                 writer drained) and the usage writer (its own connection; drained at exit),
                 retention, the usage API's read connection
    observers    access log and metrics, which the gate tells of every finish
    limits       with [cluster] redis_url: the Redis link and the shared limiter, its
                 release flusher, slot renewal and reconnect jobs (closed after the
                 data plane drained, so the last releases reach Redis)
    gate         keys + guard + limiter + billing + usage writer
    relay        routing, the pooled upstream client, heartbeats
    health       the readiness probe's connection
"""

from __future__ import annotations

import contextlib
from contextlib import AsyncExitStack
from dataclasses import dataclass

from flintproxy.config import Config, StorageBackend
from flintproxy.crypto import load_keyring
from flintproxy.errors import SharedStateDown
from flintproxy.gate.billing import Billing
from flintproxy.gate.capleases import CapLeaseBook
from flintproxy.gate.ipguard import IpGuard
from flintproxy.gate.keys import KeyAuthenticator
from flintproxy.gate.leases import RENEWALS_PER_TTL, LeaseBook
from flintproxy.gate.service import ServiceGate
from flintproxy.gate.sharedlimits import SharedLimiter
from flintproxy.http.client import UpstreamClient
from flintproxy.http.heartbeat import Heartbeats
from flintproxy.ops import mailer
from flintproxy.ops.accesslog import FLUSH_S, AccessLog, Sink
from flintproxy.ops.health import DbProbe, Readiness, open_probe_db
from flintproxy.ops.metrics import MULTIPROCESS_SYNC_S, Metrics
from flintproxy.relay.answer import StreamGauge
from flintproxy.relay.relay import Relay
from flintproxy.relay.routing import Router
from flintproxy.store import low_balance, postgres, retention, sqlite
from flintproxy.store.accounts import Accounts, bootstrap_demo_account
from flintproxy.store.changes import ChangeWatcher
from flintproxy.store.db import Database, PgDatabase, SqliteDatabase
from flintproxy.store.leases import LeaseStore
from flintproxy.store.ledger import Balances, UsageWriter, open_writer_db
from flintproxy.store.low_balance import LowBalance
from flintproxy.store.outbox import Outbox
from flintproxy.store.pii import PiiCodec
from flintproxy.store.redislink import RedisLink
from flintproxy.tasks import TaskGroup

__all__ = ["Components", "open_components"]

LAST_USED_FLUSH_S = 5.0
JANITOR_S = 600.0
EVENTS_KEEP_MS = 24 * 3600 * 1000
REDIS_RECONNECT_TICK_S = 0.05  # the link's own backoff decides when it really tries


@dataclass(frozen=True, slots=True)
class Components:
    """Everything the two planes serve with, open and running."""

    config: Config
    accounts: Accounts
    watcher: ChangeWatcher
    keys: KeyAuthenticator
    guard: IpGuard
    billing: Billing
    usage: UsageWriter
    usage_db: Database
    retention: retention.RetentionJob
    access_log: AccessLog | None
    metrics: Metrics
    gate: ServiceGate
    # The Redis-backed limiter ([cluster] redis_url), else None: in-memory limits.
    limits: SharedLimiter | None
    router: Router
    relay: Relay
    readiness: Readiness
    # The demo key created at this start (``accounts.bootstrap_demo``), printed once
    # on stdout by the runner: never logged, never written to disk.
    demo_key: str | None
    # Shared mode: this node's credit leases (None on the embedded store).
    leases: LeaseBook | None = None


async def open_components(config: Config, stack: AsyncExitStack, tasks: TaskGroup,
                          access_sink: Sink | None = None) -> Components:
    """Open every component in start-up order; ``stack`` closes them, ``tasks`` owns
    their background jobs (close ``tasks`` first, then ``stack``)."""
    path = config.storage.path
    shared = config.storage.backend is StorageBackend.POSTGRESQL
    # -- store
    pg: PgDatabase | None = None
    accounts_db: Database
    if shared:
        assert config.storage.dsn is not None
        pg = await postgres.open_database(config.storage.dsn, config.storage.pool_size)
        stack.push_async_callback(pg.close)
        await postgres.check_schema(pg)
        accounts_db = pg
    else:
        # Migrations run on this first connection, before any other opens.
        accounts_db = SqliteDatabase(await sqlite.open_store(path))
        stack.push_async_callback(accounts_db.close)
    # Account data at rest: a missing or wrong key stops the start here (KeyringError).
    pii = PiiCodec(load_keyring(config.crypto))
    await pii.check(accounts_db)
    watcher = ChangeWatcher(accounts_db, config.accounts.change_poll_s)
    watcher.subscribe(pii.reloader(lambda: load_keyring(config.crypto)))
    await watcher.start()
    accounts = Accounts(accounts_db, config.accounts.bcrypt_cost,
                        config.accounts.session_ttl_s, notify=watcher.publish, pii=pii)
    keys = KeyAuthenticator(accounts)
    stack.push_async_callback(keys.close)  # writes the last last_used_at marks
    watcher.subscribe(keys.on_change)
    guard = IpGuard(config.limits)
    await accounts.warm()
    demo_key = await bootstrap_demo_account(accounts, config)
    tasks.every("change feed poll", config.accounts.change_poll_s, watcher.poll)
    if pg is not None:
        assert config.storage.dsn is not None
        tasks.spawn("change feed listen", watcher.listen(config.storage.dsn, postgres.CHANNEL))
    tasks.every("last_used_at flush", LAST_USED_FLUSH_S, keys.flush_last_used)
    if config.email.enabled:
        sender = mailer.OutboxSender(Outbox(accounts_db, pii=pii),
                                     mailer.Mailer(config.email))
        tasks.every("email outbox", mailer.TICK_S, sender.run_once)
        tasks.every("low-balance notices", low_balance.INTERVAL_S,
                    LowBalance(accounts).run_once)
    tasks.every("session and event cleanup", JANITOR_S,
                lambda: accounts.sweep(EVENTS_KEEP_MS))

    # -- ledger: balances and the usage writer, on a connection of their own
    writer_db: Database
    usage_db: Database
    if pg is not None:
        writer_db = usage_db = pg
    else:
        writer_db = await open_writer_db(path)
        stack.push_async_callback(writer_db.close)
    billing = Billing(config.models, config.billing, Balances(writer_db))
    leases: LeaseBook | None = None
    if pg is not None:
        # Shared mode: balances are this node's credit leases (gate.leases). Their
        # closer is pushed before the writer's drain, so it runs after it: every
        # lease is returned once its rows are charged.
        lease_store = LeaseStore(pg)
        leases = LeaseBook(lease_store, billing, config.billing)
        stack.push_async_callback(leases.close)
        watcher.subscribe(leases.on_change)
        # Spend caps' leases (gate.capleases): run by the lease book's periodic jobs.
        cap_leases = CapLeaseBook(lease_store.caps, billing, leases)
        watcher.subscribe(cap_leases.on_change)
        ttl = config.billing.lease_ttl_s
        tasks.spawn("credit lease top-ups", leases.run())
        tasks.spawn("cap lease top-ups", cap_leases.run())
        tasks.every("credit lease renewal", ttl / RENEWALS_PER_TTL, leases.renew)
        tasks.every("credit lease expiry sweep", ttl / 2, leases.sweep)
        tasks.every("credit lease idle return", config.billing.lease_idle_return_s / 2,
                    leases.return_idle)
        usage = UsageWriter(writer_db, billing, config.billing, leases=lease_store,
                            lease_of=leases.lease_of,
                            cap_leases_of=cap_leases.cap_leases_of)
    else:
        watcher.subscribe(billing.on_change)
        usage = UsageWriter(writer_db, billing, config.billing)
    usage.start()
    stack.push_async_callback(usage.drain, config.server.shutdown_timeout_s)
    if pg is None:
        usage_db = SqliteDatabase(await sqlite.connect(path))
        stack.push_async_callback(usage_db.close)
    job = retention.RetentionJob(usage_db, config.billing.retention_days)
    tasks.every("usage retention", retention.INTERVAL_S, job.run_once, now=True)

    # -- shared limits: Redis, when configured
    limits = None
    if config.cluster.redis_url is not None:
        link = RedisLink(config.cluster)
        stack.push_async_callback(link.close)
        tasks.spawn("redis pipeline", link.pipeline())
        with contextlib.suppress(SharedStateDown):
            await link.ping()  # down at start: served per on_redis_down until it is back
        limits = SharedLimiter(config, link)
        stack.push_async_callback(limits.close)  # the last releases, before link.close
        tasks.every("limiter releases", config.cluster.release_interval_s, limits.flush)
        tasks.every("limiter slot renewal", limits.renew_interval_s, limits.renew)
        tasks.every("redis reconnect", REDIS_RECONNECT_TICK_S, link.reconnect)

    # -- observers of every request
    router = Router(config)
    streams = StreamGauge()
    access_log = None
    if config.metrics.access_log:
        access_log = AccessLog(config, access_sink)
        stack.push_async_callback(access_log.close)  # writes what is left, last
        tasks.every("access log flush", FLUSH_S, access_log.flush)
    metrics = Metrics(config, router, streams, usage, access_log, billing, leases, limits)
    stack.callback(metrics.close)
    if metrics.multiprocess:
        tasks.every("metrics sync", MULTIPROCESS_SYNC_S, metrics.sync)
    observers = [metrics.finished] + ([access_log.finished] if access_log else [])

    # -- the gate, then the relay
    gate = ServiceGate(config, keys, guard, billing, usage, observers, limits)
    # One pool of keep-alive connections for all upstream traffic, unbounded:
    # thousands of concurrent streams each hold one.
    client = UpstreamClient()
    stack.callback(client.close)
    heartbeats = Heartbeats(config.server.heartbeat_interval_s)
    stack.callback(heartbeats.close)
    relay = Relay(config, router, gate, client, heartbeats, streams,
                  refusal_observers=[metrics.rejected]
                  + ([access_log.rejected] if access_log else []))

    # -- readiness
    if pg is not None:
        probe = DbProbe(pg)
    else:
        probe_db = await open_probe_db(path)
        stack.push_async_callback(probe_db.close)
        probe = DbProbe(probe_db)
    stack.push_async_callback(probe.close)
    readiness = Readiness(probe, router, usage, limits)

    return Components(config=config, accounts=accounts, watcher=watcher, keys=keys,
                      guard=guard, billing=billing, usage=usage, usage_db=usage_db,
                      retention=job, access_log=access_log, metrics=metrics, gate=gate,
                      limits=limits, router=router, relay=relay, readiness=readiness,
                      demo_key=demo_key, leases=leases)
