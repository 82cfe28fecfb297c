"""The one engine-neutral seam of the store: a ``Database`` that runs our SQL on SQLite
or PostgreSQL, and its ONE ``transaction()`` helper.

Repositories (accounts, ledger, change feed, retention, the usage API, admin) write
portable SQL with ``?`` placeholders against ``Queries``; the PostgreSQL side
translates each statement once to ``$1..$n`` (cached) and asyncpg prepares and
caches it per connection. Rows are indexable sequences on both engines (tuples,
asyncpg Records).

Third-party errors stop here (``errors.py`` names them): a unique violation becomes
``Conflict``, a lost, refused or shutting-down connection ``StoreUnavailable``;
anything else (a bug in our SQL) propagates as it is.

SQLite: one connection shared by coroutines, so a lock keeps a statement out of
another coroutine's open transaction; the embedded path stays what it was (the
lock, uncontended, costs well under a microsecond). PostgreSQL: an asyncpg pool;
plain statements run on any pooled connection, a transaction holds one.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

import aiosqlite
import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from flintproxy.errors import Conflict, StoreUnavailable
from flintproxy.store import sqlite

__all__ = ["Database", "Dialect", "PgDatabase", "Queries", "Row", "SqliteDatabase",
           "converted", "pg_sql"]

Row = Sequence[Any]


class Dialect(enum.StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


class Queries(Protocol):
    """Statements, inside or outside a transaction."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; returns the rows it changed (or returned)."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...


class Database(Queries, Protocol):
    """A store connection (SQLite) or pool (PostgreSQL)."""

    dialect: Dialect

    def transaction(self) -> AbstractAsyncContextManager[Queries]:
        """All statements on the yielded ``Queries`` commit together, or none does
        (rolled back on any exception or cancellation)."""

    async def close(self) -> None: ...


# --- errors ------------------------------------------------------------------------

_PG_UNAVAILABLE = (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
                   asyncpg.AdminShutdownError, asyncpg.TooManyConnectionsError,
                   asyncpg.exceptions.CrashShutdownError, OSError, TimeoutError)


def _convert(exc: BaseException) -> Exception | None:
    """The errors.py error for a driver's exception, or None to let it propagate."""
    if isinstance(exc, asyncpg.UniqueViolationError | sqlite3.IntegrityError):
        if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" not in str(exc):
            return None
        return Conflict("That record already exists.", code="conflict")
    if isinstance(exc, _PG_UNAVAILABLE):
        return StoreUnavailable(f"The database is unavailable ({type(exc).__name__}).")
    if isinstance(exc, asyncpg.InterfaceError) and (
            "closed" in str(exc) or "closing" in str(exc)):
        return StoreUnavailable("The database is unavailable (connection closed).")
    if isinstance(exc, sqlite3.OperationalError) and any(
            w in str(exc) for w in ("locked", "busy", "disk", "readonly", "unable to open")):
        return StoreUnavailable(f"The database is unavailable ({exc}).")
    return None


@asynccontextmanager
async def converted() -> AsyncIterator[None]:
    """Convert a driver's exception raised inside into errors.py's tree."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, sqlite3.Error, OSError,
            TimeoutError) as exc:
        mapped = _convert(exc)
        if mapped is None:
            raise
        raise mapped from exc


def _count(status: str) -> int:
    """Rows changed, from asyncpg's status string ("UPDATE 3", "INSERT 0 1")."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


# --- SQLite --------------------------------------------------------------------------


class _SqliteQueries:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        async with converted():
            cur = await self.conn.execute(sql, args)
            return cur.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with converted():
            await self.conn.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with converted():
            return list(await self.conn.execute_fetchall(sql, args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with converted(), self.conn.execute(sql, args) as cur:
            row: Row | None = await cur.fetchone()
            return row

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]


class SqliteDatabase:
    """One aiosqlite connection, shared by coroutines under ``lock``."""

    dialect = Dialect.SQLITE

    def __init__(self, conn: aiosqlite.Connection, lock: asyncio.Lock | None = None) -> None:
        self.conn = conn
        self.lock = lock or asyncio.Lock()
        self._q = _SqliteQueries(conn)

    @classmethod
    async def open(cls, path: Any, *, migrate: bool = True) -> SqliteDatabase:
        conn = await (sqlite.open_store(path) if migrate else sqlite.connect(path))
        return cls(conn)

    async def execute(self, sql: str, *args: Any) -> int:
        async with self.lock:
            return await self._q.execute(sql, *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self.lock:
            await self._q.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self.lock:
            return await self._q.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self.lock:
            return await self._q.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.lock:
            return await self._q.fetchval(sql, *args)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Queries]:
        async with converted(), sqlite.transaction(self.conn, self.lock):
            yield self._q

    async def close(self) -> None:
        await self.conn.close()


# --- PostgreSQL ----------------------------------------------------------------------

_TOKEN = re.compile(r"'(?:[^']|'')*'|\"[^\"]*\"|--[^\n]*|\?")


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """Our ``?`` placeholders as PostgreSQL's ``$1..$n`` (quoted text left alone)."""
    n = 0

    def number(m: re.Match[str]) -> str:
        nonlocal n
        if m[0] != "?":
            return m[0]
        n += 1
        return f"${n}"

    return _TOKEN.sub(number, sql)


_PgCon: TypeAlias = "asyncpg.Connection | PoolConnectionProxy[asyncpg.Record] | asyncpg.Pool"


class _PgQueries:
    def __init__(self, con: _PgCon) -> None:
        self.con = con

    async def execute(self, sql: str, *args: Any) -> int:
        async with converted():
            return _count(await self.con.execute(pg_sql(sql), *args))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with converted():
            await self.con.executemany(pg_sql(sql), rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with converted():
            return cast(list[Row], await self.con.fetch(pg_sql(sql), *args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with converted():
            return cast(Row | None, await self.con.fetchrow(pg_sql(sql), *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with converted():
            return await self.con.fetchval(pg_sql(sql), *args)


class PgDatabase(_PgQueries):
    """An asyncpg pool; open it with ``store.postgres.open_database``."""

    dialect = Dialect.POSTGRESQL

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        super().__init__(pool)
        self.pool = pool
        self.dsn = dsn  # may hold a password: never log it (config.mask_dsn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Queries]:
        async with converted(), self.pool.acquire() as con, con.transaction():
            yield _PgQueries(con)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        """A pooled connection for engine-specific work (COPY), errors converted."""
        async with converted(), self.pool.acquire() as con:
            yield con

    async def close(self) -> None:
        await self.pool.close()
