"""The embedded SQLite store: connections (WAL, foreign keys) and schema migrations.

Migrations are numbered SQL scripts applied in order at start, each in its own
transaction, and recorded in ``schema_version``; add new ones at the end of
``MIGRATIONS`` and never edit a released one, and add the same one to
``store.postgres.MIGRATIONS`` (a test compares the two schemas). No ORM:
repositories (accounts, billing, usage) write portable SQL against ``store.db``'s
``Database``, which wraps the connection this module opens.

Times are integer unix milliseconds; money is integer nano-dollars.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

MIGRATIONS: tuple[str, ...] = (
    # 1: accounts, keys, sessions, credits, usage, change events
    """
    CREATE TABLE accounts (
        id              INTEGER PRIMARY KEY,
        email           TEXT UNIQUE,          -- NULL once the account is deleted
        password_hash   TEXT,                 -- bcrypt; NULL once deleted / never set
        status          TEXT NOT NULL DEFAULT 'active'
                        CHECK (status IN ('active', 'disabled', 'deleted')),
        created_at      INTEGER NOT NULL,
        deleted_at      INTEGER,
        credited_nano   INTEGER NOT NULL DEFAULT 0,   -- all credits ever
        charged_nano    INTEGER NOT NULL DEFAULT 0,   -- all usage ever charged
        balance_nano    INTEGER NOT NULL DEFAULT 0,   -- credited - charged, kept in step
        rpm             INTEGER,
        tpm             INTEGER,
        max_concurrent  INTEGER,
        CHECK (balance_nano = credited_nano - charged_nano)
    );
    CREATE TABLE credits (
        id          INTEGER PRIMARY KEY,
        account_id  INTEGER NOT NULL REFERENCES accounts(id),
        amount_nano INTEGER NOT NULL,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE api_keys (
        id              INTEGER PRIMARY KEY,
        account_id      INTEGER NOT NULL REFERENCES accounts(id),
        key_hash        BLOB NOT NULL UNIQUE,  -- SHA-256 of the plaintext key
        prefix          TEXT NOT NULL,
        last4           TEXT NOT NULL,
        name            TEXT NOT NULL DEFAULT '',
        created_at      INTEGER NOT NULL,
        last_used_at    INTEGER,
        expires_at      INTEGER,
        revoked_at      INTEGER,
        allowed_models  TEXT,                  -- JSON list, NULL = all models
        rpm             INTEGER,
        tpm             INTEGER,
        max_concurrent  INTEGER
    );
    CREATE INDEX api_keys_account ON api_keys(account_id);
    CREATE TABLE sessions (
        token_hash  BLOB PRIMARY KEY,          -- SHA-256 of the cookie value
        account_id  INTEGER NOT NULL REFERENCES accounts(id),
        csrf_token  TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL
    );
    CREATE INDEX sessions_account ON sessions(account_id);
    CREATE TABLE usage (
        id                INTEGER PRIMARY KEY,
        request_id        TEXT NOT NULL UNIQUE,
        account_id        INTEGER NOT NULL,
        key_id            INTEGER,
        model             TEXT NOT NULL,
        upstream          TEXT,
        prompt_tokens     INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cached_tokens     INTEGER NOT NULL DEFAULT 0,
        reasoning_tokens  INTEGER NOT NULL DEFAULT 0,
        estimated         INTEGER NOT NULL DEFAULT 0,  -- 1: counts estimated (disconnect)
        cost_nano         INTEGER NOT NULL,
        status            INTEGER NOT NULL,
        outcome           TEXT NOT NULL,               -- ok | client_disconnect | upstream_error
        stream            INTEGER NOT NULL,
        started_at        INTEGER NOT NULL,
        duration_ms       INTEGER NOT NULL,
        ttfb_ms           INTEGER
    );
    CREATE INDEX usage_account_time ON usage(account_id, started_at);
    -- Changes another process must see at once (revocations, disables, credits).
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        kind        TEXT NOT NULL,
        account_id  INTEGER,
        key_id      INTEGER,
        created_at  INTEGER NOT NULL
    );
    """,
    # 2: which API a usage row's request called ("chat/completions", "messages", ...)
    "ALTER TABLE usage ADD COLUMN endpoint TEXT",
    # 3: the operator role and the audit trail of operators' actions (store.operators)
    """
    CREATE TABLE operators (
        account_id  INTEGER PRIMARY KEY REFERENCES accounts(id),
        granted_at  INTEGER NOT NULL
    );
    -- Who did what to which account or key, when, and why: never content, never an IP.
    CREATE TABLE audit (
        id                 INTEGER PRIMARY KEY,
        operator_id        INTEGER,            -- NULL: the command line (flintproxy admin)
        action             TEXT NOT NULL,
        target_account_id  INTEGER,
        target_key_id      INTEGER,
        amount_nano        INTEGER,            -- credits and debits
        note               TEXT NOT NULL DEFAULT '',
        created_at         INTEGER NOT NULL
    );
    CREATE INDEX audit_time ON audit(created_at);
    """,
    # 4: every credits row says why and who; erased usage kept on the books
    """
    ALTER TABLE credits ADD COLUMN reason TEXT NOT NULL DEFAULT 'credit';
    ALTER TABLE credits ADD COLUMN actor TEXT NOT NULL DEFAULT 'operator';
    CREATE INDEX credits_account ON credits(account_id);
    -- Usage rows erased (on the holder's request, by retention): their cost stays on
    -- the books, so charged_nano = SUM(usage) + SUM(usage_erased) per account.
    CREATE TABLE usage_erased (
        id          INTEGER PRIMARY KEY,
        account_id  INTEGER NOT NULL,
        rows_erased INTEGER NOT NULL,
        cost_nano   INTEGER NOT NULL,
        created_at  INTEGER NOT NULL
    );
    CREATE INDEX usage_erased_account ON usage_erased(account_id);
    """,
    # 5: redemption codes, only their SHA-256 stored (store.codes)
    """
    CREATE TABLE redemption_codes (
        code_hash    BLOB PRIMARY KEY,
        amount_nano  INTEGER NOT NULL CHECK (amount_nano > 0),
        note         TEXT NOT NULL DEFAULT '',
        created_at   INTEGER NOT NULL,
        expires_at   INTEGER,
        redeemed_by  INTEGER REFERENCES accounts(id),
        redeemed_at  INTEGER
    );
    """,
    # 6: the email outbox (ops.mailer's sender) and password-reset tokens
    """
    CREATE TABLE email_outbox (
        id               INTEGER PRIMARY KEY,
        recipient        TEXT NOT NULL,
        subject          TEXT NOT NULL,
        body             TEXT NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  INTEGER NOT NULL,
        created_at       INTEGER NOT NULL
    );
    CREATE INDEX email_outbox_due ON email_outbox(next_attempt_at);
    CREATE TABLE password_resets (
        token_hash  BLOB PRIMARY KEY,
        account_id  INTEGER NOT NULL REFERENCES accounts(id),
        expires_at  INTEGER NOT NULL
    );
    CREATE INDEX password_resets_account ON password_resets(account_id);
    """,
    # 7: payment processor top-ups and the webhook events seen (store.topups)
    """
    CREATE TABLE topups (
        session_id    TEXT PRIMARY KEY,
        account_id    INTEGER NOT NULL REFERENCES accounts(id),
        amount_nano   INTEGER NOT NULL CHECK (amount_nano > 0),
        created_at    INTEGER NOT NULL,
        completed_at  INTEGER,
        event_id      TEXT
    );
    CREATE INDEX topups_account ON topups(account_id);
    CREATE TABLE payment_events (
        event_id     TEXT PRIMARY KEY,
        kind         TEXT NOT NULL,
        received_at  INTEGER NOT NULL
    );
    """,
    # 8: policy-change notices, resumable (store.notices)
    """
    CREATE TABLE notices (
        id               INTEGER PRIMARY KEY,
        digest           TEXT NOT NULL UNIQUE,   -- SHA-256 of subject and body
        created_at       INTEGER NOT NULL,
        last_account_id  INTEGER NOT NULL DEFAULT 0,
        queued           INTEGER NOT NULL DEFAULT 0,
        done_at          INTEGER
    );
    """,
    # 9: the email sealed at rest (store.pii): email holds its blind index then
    """
    ALTER TABLE accounts ADD COLUMN email_sealed BLOB;
    """,
    # 10: email changes waiting for the new address's confirmation
    """
    CREATE TABLE email_changes (
        token_hash  BLOB PRIMARY KEY,
        account_id  INTEGER NOT NULL REFERENCES accounts(id),
        new_email   TEXT NOT NULL,            -- sealed (store.pii) when there is a key
        expires_at  INTEGER NOT NULL
    );
    CREATE INDEX email_changes_account ON email_changes(account_id);
    """,
    # 11: the opt-in low-balance notice (store.low_balance)
    """
    ALTER TABLE accounts ADD COLUMN low_balance_nano INTEGER;
    ALTER TABLE accounts ADD COLUMN low_balance_notified INTEGER NOT NULL DEFAULT 0;
    """,
    # 12: credit leases (shared mode, gate.leases); mirrored here so both engines keep
    # one schema (copy-to-postgres, the parity check). Unused by the embedded mode.
    """
    ALTER TABLE accounts ADD COLUMN leased_nano INTEGER NOT NULL DEFAULT 0
        CHECK (leased_nano >= 0);
    CREATE TABLE credit_leases (
        id            INTEGER PRIMARY KEY,
        account_id    INTEGER NOT NULL REFERENCES accounts(id),
        node_id       TEXT NOT NULL,
        granted_nano  INTEGER NOT NULL CHECK (granted_nano >= 0),
        spent_nano    INTEGER NOT NULL DEFAULT 0
                      CHECK (spent_nano >= 0 AND spent_nano <= granted_nano),
        created_at    INTEGER NOT NULL,
        expires_at    INTEGER NOT NULL
    );
    CREATE INDEX credit_leases_node ON credit_leases(node_id);
    CREATE INDEX credit_leases_account ON credit_leases(account_id);
    CREATE INDEX credit_leases_expiry ON credit_leases(expires_at);
    """,
    # 13: spend caps per key (gate.spendcaps): the caps, the durable spend per UTC
    # period (never derived from usage rows, which users may erase) and, in shared
    # mode, the nodes' leases on a cap's free part (mirrors credit_leases).
    """
    ALTER TABLE api_keys ADD COLUMN cap_day_nano INTEGER CHECK (cap_day_nano >= 0);
    ALTER TABLE api_keys ADD COLUMN cap_month_nano INTEGER CHECK (cap_month_nano >= 0);
    CREATE TABLE key_spend (
        key_id       INTEGER NOT NULL,         -- like usage.key_id: no foreign key
        period       TEXT NOT NULL,           -- 'd2026-12-03' | 'm2026-12' (UTC)
        spent_nano   INTEGER NOT NULL DEFAULT 0 CHECK (spent_nano >= 0),
        leased_nano  INTEGER NOT NULL DEFAULT 0 CHECK (leased_nano >= 0),
        PRIMARY KEY (key_id, period)
    );
    CREATE TABLE cap_leases (
        id            INTEGER PRIMARY KEY,
        key_id        INTEGER NOT NULL,
        period        TEXT NOT NULL,
        node_id       TEXT NOT NULL,
        granted_nano  INTEGER NOT NULL CHECK (granted_nano >= 0),
        spent_nano    INTEGER NOT NULL DEFAULT 0
                      CHECK (spent_nano >= 0 AND spent_nano <= granted_nano),
        created_at    INTEGER NOT NULL,
        expires_at    INTEGER NOT NULL
    );
    CREATE INDEX cap_leases_node ON cap_leases(node_id);
    CREATE INDEX cap_leases_key ON cap_leases(key_id, period);
    CREATE INDEX cap_leases_expiry ON cap_leases(expires_at);
    """,
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def connect(path: Path) -> aiosqlite.Connection:
    """Open a connection with the pragmas every flintproxy connection uses.

    The database holds password hashes and key hashes: it and the directories made
    for it are the owner's alone (0600 / 0700), -wal and -shm included (SQLite gives
    them the database's mode; the umask covers them too while they are created).
    """
    old_umask = os.umask(0o077)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Never open and close a descriptor of the file here: closing any descriptor
        # drops the process's POSIX locks on it, SQLite's included. SQLite creates the
        # file itself, under the umask; one made before (older version, by hand) is
        # tightened.
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if f.exists() and f.stat().st_mode & 0o077:
                f.chmod(0o600)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            # First: setting the journal mode may wait for another connection's lock,
            # and without a busy timeout it fails at once.
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute("PRAGMA journal_mode=WAL")
        except BaseException:
            await db.close()
            raise
    finally:
        os.umask(old_umask)
    try:
        # NORMAL is durable across process crashes in WAL mode; only an OS crash
        # can lose the last transactions.
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        await db.close()
        raise
    return db


@asynccontextmanager
async def transaction(db: aiosqlite.Connection, lock: asyncio.Lock | None = None
                      ) -> AsyncIterator[aiosqlite.Connection]:
    """``BEGIN IMMEDIATE ... COMMIT``, rolled back on any exception or cancellation.

    The one transaction helper of the SQLite store. ``lock`` (one per connection)
    keeps other coroutines' statements out of the transaction. IMMEDIATE takes the
    write lock at BEGIN, so two processes never deadlock upgrading a read.
    """
    async with lock or contextlib.nullcontext():
        await db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            await db.execute("COMMIT")
        except BaseException:
            # Statements already queued still run on aiosqlite's thread even when we
            # are cancelled, so the ROLLBACK always follows them. Without an open
            # transaction (COMMIT failed half-way) it fails harmlessly.
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            raise


async def schema_version(db: aiosqlite.Connection) -> int:
    """The version reached (0 on a new file)."""
    async with db.execute("SELECT name FROM sqlite_master WHERE name = 'schema_version'") as c:
        if await c.fetchone() is None:
            return 0
    return await _version(db)


async def _version(db: aiosqlite.Connection) -> int:
    async with db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(db: aiosqlite.Connection) -> int:
    """Apply pending migrations; return the schema version reached.

    Safe when several processes start on one database at once (serve and admin,
    or workers): each migration re-reads the version under the write lock.
    """
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_version"
        " (version INTEGER PRIMARY KEY, applied_at INTEGER)"
    )
    current = await _version(db)
    for version, script in enumerate(MIGRATIONS, start=1):
        if version <= current:
            continue
        # executescript() would COMMIT on its own; run the statements inside one
        # explicit transaction so a failed migration leaves nothing behind.
        async with transaction(db):
            current = await _version(db)  # another process may have got here first
            if version > current:
                for statement in _split_sql(script):
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_version VALUES (?, ?)",
                                 (version, now_ms()))
                current = version
    return current


def _split_sql(script: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


async def open_store(path: Path) -> aiosqlite.Connection:
    """Connect and bring the schema up to date."""
    db = await connect(path)
    try:
        await migrate(db)
    except BaseException:
        await db.close()
        raise
    return db
