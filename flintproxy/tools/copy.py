"""``flintproxy admin copy-to-postgres``: move an embedded install into PostgreSQL.

Copies every table of the SQLite store (accounts with their balances, credits, API
keys, sessions, usage rows, change events) into an empty PostgreSQL database,
migrated first if it is not yet. Ids are kept (keys, usage rows and sessions refer
to accounts by id), and each identity sequence is set past the largest copied id,
the ``events`` one included, so the change feed's high-water mark carries on.

Without loss: everything is written in ONE PostgreSQL transaction with COPY, then,
inside it, checked against the source: row counts per table, the sum of credits,
the sum of usage costs, and each account's (credited, charged, balance); any
difference rolls the whole copy back. A target holding any row is refused. Stop
the gateway first (the source must not change while it is read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flintproxy.config import mask_dsn
from flintproxy.errors import Conflict
from flintproxy.money import format_usd
from flintproxy.store import postgres, sqlite
from flintproxy.store.db import PgDatabase, SqliteDatabase

__all__ = ["TABLES", "copy_to_postgres"]

# In foreign-key order; (table, key column for paging or None to read at once).
TABLES: tuple[tuple[str, str | None], ...] = (
    ("accounts", "id"), ("credits", "id"), ("api_keys", "id"), ("sessions", None),
    ("usage", "id"), ("events", "id"),
)
CHUNK = 20_000


class CopyMismatch(Conflict):
    """The copy differs from its source (rolled back)."""

    code = "copy_mismatch"


async def _columns(src: SqliteDatabase, table: str) -> list[str]:
    return [str(r[1]) for r in await src.fetch(f"PRAGMA table_info({table})")]


async def _totals(db: Any) -> dict[str, Any]:
    """What must be equal on both sides: counts, sums, every balance."""
    out: dict[str, Any] = {}
    for table, _ in TABLES:
        out[f"rows:{table}"] = int(await db.fetchval(f"SELECT COUNT(*) FROM {table}"))  # noqa: S608
    out["credits_nano"] = int(await db.fetchval(
        "SELECT COALESCE(SUM(amount_nano), 0) FROM credits"))
    out["usage_cost_nano"] = int(await db.fetchval(
        "SELECT COALESCE(SUM(cost_nano), 0) FROM usage"))
    out["balances"] = {int(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in await db.fetch(
        "SELECT id, credited_nano, charged_nano, balance_nano FROM accounts ORDER BY id")}
    return out


async def copy_to_postgres(path: Path, dsn: str) -> list[str]:
    """Copy the SQLite store at ``path`` into the database at ``dsn``; report lines."""
    src = SqliteDatabase(await sqlite.open_store(path))
    try:
        dst = await postgres.open_database(dsn, 2)
        try:
            await postgres.migrate(dst)
            return await _copy(src, dst, path, dsn)
        finally:
            await dst.close()
    finally:
        await src.close()


async def _copy(src: SqliteDatabase, dst: PgDatabase, path: Path,
                dsn: str) -> list[str]:
    for table, _ in TABLES:
        if await dst.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):  # noqa: S608
            raise Conflict(f"the target database is not empty (table {table} has rows); "
                           "copy-to-postgres only fills an empty database")
    before = await _totals(src)
    async with dst.connection() as con, con.transaction():
        for table, key in TABLES:
            cols = await _columns(src, table)
            names = ", ".join(cols)
            if key is None:
                rows = await src.fetch(f"SELECT {names} FROM {table}")  # noqa: S608
                if rows:
                    await con.copy_records_to_table(table, records=rows, columns=cols)
                continue
            after = -1
            while True:
                rows = await src.fetch(
                    f"SELECT {names} FROM {table} WHERE {key} > ? "  # noqa: S608
                    f"ORDER BY {key} LIMIT ?", after, CHUNK)
                if not rows:
                    break
                await con.copy_records_to_table(table, records=rows, columns=cols)
                after = rows[-1][cols.index(key)]
            await con.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{key}'), "  # noqa: S608
                f"COALESCE(MAX({key}), 0) + 1, false) FROM {table}")
        copied = await _totals(con)
        for name, want in before.items():
            if copied[name] != want:
                shown = "each account's balance" if name == "balances" else name
                raise CopyMismatch(f"copy differs from its source in {shown}; "
                                   "nothing was written")
    balances = before["balances"]
    lines = [f"copied {path} -> {mask_dsn(dsn)}"]
    lines += [f"  {table}: {before[f'rows:{table}']} rows" for table, _ in TABLES]
    lines.append(f"  sum of credits: {format_usd(before['credits_nano'])} USD "
                 f"({before['credits_nano']} nano), equal on both sides")
    lines.append(f"  sum of usage costs: {format_usd(before['usage_cost_nano'])} USD "
                 f"({before['usage_cost_nano']} nano), equal on both sides")
    total = sum(b[2] for b in balances.values())
    lines.append(f"  balances: {len(balances)} accounts, each equal; total "
                 f"{format_usd(total)} USD")
    return lines
