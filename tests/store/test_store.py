"""store: connection pragmas, migrations applied once, atomic and recorded."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiosqlite
import pytest

from flintproxy.store import sqlite

TABLES = {"accounts", "credits", "api_keys", "sessions", "usage", "events", "schema_version",
          "operators", "audit",
          # issue 17: the ledger, codes, outbox, tokens, top-ups, notices
          "usage_erased", "redemption_codes", "email_outbox", "password_resets", "topups",
          "payment_events", "notices", "email_changes",
          "credit_leases",
          # issue 17: spend caps per key
          "key_spend", "cap_leases"}


async def scalar(db: aiosqlite.Connection, sql: str) -> object:
    async with db.execute(sql) as cur:
        row = await cur.fetchone()
    assert row is not None
    return row[0]


async def tables(db: aiosqlite.Connection) -> set[str]:
    async with db.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cur:
        return {r[0] for r in await cur.fetchall() if not r[0].startswith("sqlite_")}


async def versions(db: aiosqlite.Connection) -> list[int]:
    async with db.execute("SELECT version FROM schema_version ORDER BY version") as cur:
        return [r[0] for r in await cur.fetchall()]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    conn = await sqlite.open_store(tmp_path / "store.db")
    yield conn
    await conn.close()


async def test_open_store_creates_the_file_and_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "flint.db"
    db = await sqlite.open_store(path)
    try:
        assert path.is_file()
        assert await tables(db) == TABLES
        assert await versions(db) == list(range(1, len(sqlite.MIGRATIONS) + 1))
    finally:
        await db.close()


async def test_connection_pragmas(db: aiosqlite.Connection) -> None:
    assert await scalar(db, "PRAGMA journal_mode") == "wal"
    assert await scalar(db, "PRAGMA foreign_keys") == 1
    assert await scalar(db, "PRAGMA synchronous") == 1  # NORMAL
    assert await scalar(db, "PRAGMA busy_timeout") == 5000
    assert not db.in_transaction  # autocommit: repositories open their own transactions


async def test_foreign_keys_are_enforced(db: aiosqlite.Connection) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        await db.execute("INSERT INTO credits (account_id, amount_nano, created_at)"
                         " VALUES (424242, 1, 0)")


async def test_balance_check_constraint(db: aiosqlite.Connection) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        await db.execute("INSERT INTO accounts (email, created_at, credited_nano, balance_nano)"
                         " VALUES ('a@example.com', 0, 5, 4)")


async def test_migrate_is_idempotent(db: aiosqlite.Connection, tmp_path: Path) -> None:
    latest = len(sqlite.MIGRATIONS)
    applied_at = await scalar(db, "SELECT applied_at FROM schema_version WHERE version = 1")
    assert await sqlite.migrate(db) == latest
    assert await sqlite.migrate(db) == latest
    assert await versions(db) == list(range(1, latest + 1))
    assert await scalar(db, "SELECT applied_at FROM schema_version WHERE version = 1") == (
        applied_at)
    # And across connections: a second process opening the same file.
    other = await sqlite.open_store(tmp_path / "store.db")
    try:
        assert await versions(other) == list(range(1, latest + 1))
    finally:
        await other.close()


async def test_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    db = await sqlite.open_store(path)
    await db.execute("INSERT INTO accounts (email, created_at) VALUES ('a@example.com', ?)",
                     (sqlite.now_ms(),))
    await db.close()
    db = await sqlite.open_store(path)
    try:
        assert await scalar(db, "SELECT email FROM accounts") == "a@example.com"
    finally:
        await db.close()


async def test_a_failing_migration_rolls_back(db: aiosqlite.Connection,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    before = await versions(db)
    broken = """
    CREATE TABLE added_by_the_broken_migration (id INTEGER PRIMARY KEY);
    INSERT INTO events (kind, created_at) VALUES ('half-done', 0);
    CREATE TABLE broken (;
    """
    monkeypatch.setattr(sqlite, "MIGRATIONS", (*sqlite.MIGRATIONS, broken))
    with pytest.raises(sqlite3.OperationalError):
        await sqlite.migrate(db)
    assert not db.in_transaction
    assert await versions(db) == before
    assert "added_by_the_broken_migration" not in await tables(db)
    assert await scalar(db, "SELECT COUNT(*) FROM events") == 0
    # A fixed migration then applies normally.
    fixed = "CREATE TABLE added_by_the_fixed_migration (id INTEGER PRIMARY KEY);"
    monkeypatch.setattr(sqlite, "MIGRATIONS", (*sqlite.MIGRATIONS[:-1], fixed))
    assert await sqlite.migrate(db) == len(before) + 1
    assert "added_by_the_fixed_migration" in await tables(db)


async def test_a_conflicting_table_rolls_back_the_first_migration(tmp_path: Path) -> None:
    db = await sqlite.connect(tmp_path / "store.db")
    try:
        await db.execute("CREATE TABLE events (something_else TEXT)")
        with pytest.raises(sqlite3.OperationalError, match="events already exists"):
            await sqlite.migrate(db)
        assert not db.in_transaction
        assert await tables(db) == {"events", "schema_version"}  # accounts etc. rolled back
        assert await versions(db) == []
    finally:
        await db.close()


class _MigratedMeanwhile(tuple[str, ...]):
    """MIGRATIONS that, when migrate() starts applying them, are applied by another
    process first: simulates two processes starting on a fresh database at once."""

    path: Path

    def __iter__(self) -> Iterator[str]:
        other = sqlite3.connect(self.path, isolation_level=None)
        try:
            done = ", ".join(f"({v}, 0)" for v in range(1, len(self) + 1))
            other.executescript("BEGIN IMMEDIATE;" + ";".join(tuple.__iter__(self))
                                + f"; INSERT INTO schema_version VALUES {done}; COMMIT;")
        finally:
            other.close()
        return tuple.__iter__(self)


async def test_concurrent_first_start_does_not_fail(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    migrations = _MigratedMeanwhile(sqlite.MIGRATIONS)
    migrations.path = tmp_path / "store.db"
    monkeypatch.setattr(sqlite, "MIGRATIONS", migrations)
    db = await sqlite.connect(migrations.path)
    try:
        assert await sqlite.migrate(db) == len(migrations)
    finally:
        await db.close()
