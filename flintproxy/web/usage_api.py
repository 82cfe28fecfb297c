"""Users' rights over their usage rows (CONTRACT promise 7): list, export, delete, retention.

Routes (login session; the unsafe one also needs the CSRF token):
    GET    /api/usage         ?limit=&cursor=&since=&until=&model=   newest first, paged
    GET    /api/usage/export  ?format=csv|json&since=&until=&model=  oldest first, streamed
    DELETE /api/usage         (also POST /api/usage/delete)          -> {"deleted": n}

``since`` (inclusive) and ``until`` (exclusive) are ISO 8601 times (UTC unless they
say otherwise) or integer unix milliseconds, compared with ``started_at``.

The export walks the account's rows with a keyset cursor over the
``(account_id, started_at, id)`` index, a chunk at a time, writing each chunk to
the client before reading the next, so memory stays constant however many rows
there are. It contains every row committed before it started. Deleting removes
the rows only; the account's ``charged_nano`` total is kept, so
balance = credited - charged still holds.

Retention: rows of a deleted account are kept ``billing.retention_days`` (90) after
its deletion, then ``store.retention.purge`` removes them: at start-up and hourly,
and on demand with ``flintproxy admin purge``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from flintproxy.errors import BadRequest, ServiceUnavailable
from flintproxy.store.db import Database, Dialect
from flintproxy.web.api import require_csrf, session_account
from flintproxy.web.keys import USAGE, USAGE_DB

log = logging.getLogger("flintproxy.store.ledger")

DEFAULT_PAGE = 100
MAX_PAGE = 1000
EXPORT_CHUNK = 2000
DELETE_CHUNK = 5000
SYNC_TIMEOUT_S = 5.0
_CURSOR_RE = re.compile(r"([0-9]{1,18})_([0-9]{1,18})")  # < 2**63: a SQLite integer
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

# Rows are formatted by the database itself (C, not a Python dict per row): the
# export of a million rows is bound by the disk and the socket, not the interpreter.
# Each engine spells the time and the decimal its own way.
_ISO = {
    Dialect.SQLITE: ("strftime('%Y-%m-%dT%H:%M:%S', started_at / 1000, 'unixepoch') "
                     "|| printf('.%03dZ', started_at % 1000)"),
    Dialect.POSTGRESQL: ("to_char(to_timestamp(started_at / 1000) AT TIME ZONE 'UTC', "
                         "'YYYY-MM-DD\"T\"HH24:MI:SS') || '.' || "
                         "lpad((started_at % 1000)::text, 3, '0') || 'Z'"),
}
_FRAC = {Dialect.SQLITE: "rtrim(printf('%09d', cost_nano % 1000000000), '0')",
         Dialect.POSTGRESQL: "rtrim(lpad((cost_nano % 1000000000)::text, 9, '0'), '0')"}
_WHOLE = {Dialect.SQLITE: "printf('%d.', cost_nano / 1000000000)",
          Dialect.POSTGRESQL: "(cost_nano / 1000000000)::text || '.'"}


def _usd(d: Dialect) -> str:
    """Exact decimal USD with at least two decimals, as money.format_usd (costs >= 0)."""
    frac = _FRAC[d]
    return (f"{_WHOLE[d]} || CASE WHEN length({frac}) < 2 "
            f"THEN substr({frac} || '00', 1, 2) ELSE {frac} END")

# (name, SQL expression, kind): kind "text" is quoted in CSV, "plain" needs no quoting.
_FIELDS = (
    ("request_id", "request_id", "text"), ("started_at", "{iso}", "plain"),
    ("started_at_ms", "started_at", "int"), ("model", "model", "text"),
    ("upstream", "upstream", "text"), ("key_id", "key_id", "int"),
    ("prompt_tokens", "prompt_tokens", "int"), ("completion_tokens", "completion_tokens", "int"),
    ("cached_tokens", "cached_tokens", "int"), ("reasoning_tokens", "reasoning_tokens", "int"),
    ("total_tokens", "prompt_tokens + completion_tokens", "int"),
    ("cost_nano", "cost_nano", "int"), ("cost_usd", "{usd}", "plain"), ("status", "status", "int"),
    ("outcome", "outcome", "text"), ("stream", "stream", "bool"),
    ("estimated", "estimated", "bool"), ("duration_ms", "duration_ms", "int"),
    ("ttfb_ms", "ttfb_ms", "int"),
)
FIELDS = tuple(name for name, _, _ in _FIELDS)


def _json_expr(expr: str, kind: str, d: Dialect) -> str:
    if kind != "bool":
        return expr
    if d is Dialect.POSTGRESQL:
        return f"({expr} <> 0)"
    return f"json(CASE WHEN {expr} THEN 'true' ELSE 'false' END)"


def _csv_expr(expr: str, kind: str) -> str:
    if kind == "bool":
        return f"CASE WHEN {expr} <> 0 THEN 'true' ELSE 'false' END"
    if kind == "text":
        return f"""COALESCE('"' || replace({expr}, '"', '""') || '"', '')"""
    return f"COALESCE(CAST({expr} AS TEXT), '')"


def _row_sql(d: Dialect) -> tuple[str, str]:
    """(JSON, CSV) expressions of one usage row in dialect ``d``."""
    fields = [(n, e.format(iso=_ISO[d], usd=_usd(d)), k) for n, e, k in _FIELDS]
    pairs = ", ".join(f"'{n}', {_json_expr(e, k, d)}" for n, e, k in fields)
    json_sql = (f"json_build_object({pairs})::text" if d is Dialect.POSTGRESQL
                else f"json_object({pairs})")
    return json_sql, " || ',' || ".join(_csv_expr(e, k) for _, e, k in fields)


ROW_SQL = {d: _row_sql(d) for d in Dialect}
JSON_SQL, CSV_SQL = ROW_SQL[Dialect.SQLITE]
CSV_HEADER = ",".join(FIELDS) + "\r\n"


class Filters(NamedTuple):
    since: int | None
    until: int | None
    model: str | None


def _time_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if raw.isascii() and raw.isdigit():
        ms = int(raw) if len(raw) <= 16 else MAX_TIME_MS + 1
    else:
        try:
            when = datetime.fromisoformat(raw)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            # Years 1 and 9999 with an offset leave datetime's range: OverflowError.
            ms = int(when.timestamp() * 1000)
        except (ValueError, OverflowError):
            raise BadRequest(f"'{name}' must be an ISO 8601 time or unix milliseconds.",
                             param=name) from None
    if not 0 <= ms <= MAX_TIME_MS:
        # SQLite integers are 64-bit: an unbounded value would be an OverflowError (500).
        raise BadRequest(f"'{name}' must be a time between 1970 and 9999.", param=name)
    return ms


def _filters(request: web.Request) -> Filters:
    model = request.query.get("model") or None
    return Filters(_time_param(request, "since"), _time_param(request, "until"), model)


def _where(account_id: int, f: Filters) -> tuple[str, list[Any]]:
    sql, args = "account_id = ?", list[Any]([account_id])
    if f.since is not None:
        sql += " AND started_at >= ?"
        args.append(f.since)
    if f.until is not None:
        sql += " AND started_at < ?"
        args.append(f.until)
    if f.model is not None:
        sql += " AND model = ?"
        args.append(f.model)
    return sql, args


async def list_usage(request: web.Request) -> web.Response:
    account_id = await session_account(request)
    f = _filters(request)
    raw_limit = request.query.get("limit", str(DEFAULT_PAGE))
    limit = int(raw_limit) if raw_limit.isascii() and raw_limit.isdigit() and len(
        raw_limit) <= 4 else -1
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"'limit' must be an integer from 1 to {MAX_PAGE}.", param="limit")
    where, args = _where(account_id, f)
    cursor = request.query.get("cursor")
    if cursor:
        m = _CURSOR_RE.fullmatch(cursor)
        if m is None:
            raise BadRequest("Invalid 'cursor'.", param="cursor")
        where += " AND (started_at, id) < (?, ?)"
        args += [int(m[1]), int(m[2])]
    db = request.app[USAGE_DB]
    rows = await db.fetch(
        f"SELECT started_at, id, {ROW_SQL[db.dialect][0]} FROM usage WHERE {where} "  # noqa: S608
        "ORDER BY started_at DESC, id DESC LIMIT ?", *args, limit + 1)
    page = rows[:limit]
    more = len(rows) > limit
    cursor_out = orjson.dumps(f"{page[-1][0]}_{page[-1][1]}" if more else None)
    body = "".join(('{"object":"list","data":[', ",".join(r[2] for r in page),
                    '],"has_more":', "true" if more else "false", ',"next_cursor":',
                    cursor_out.decode(), "}"))
    return web.Response(body=body.encode(), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def _chunks(db: Database, account_id: int, f: Filters,
                  as_csv: bool) -> AsyncIterator[list[str]]:
    """The account's rows, oldest first, formatted by ``expr``, EXPORT_CHUNK at a time."""
    where, args = _where(account_id, f)
    expr = ROW_SQL[db.dialect][1 if as_csv else 0]
    sql = (f"SELECT started_at, id, {expr} FROM usage WHERE {where} "  # noqa: S608
           "AND (started_at, id) > (?, ?) ORDER BY started_at, id LIMIT ?")
    after: tuple[int, int] = (-1, -1)
    while True:
        rows = await db.fetch(sql, *args, *after, EXPORT_CHUNK)
        if not rows:
            return
        yield [r[2] for r in rows]
        if len(rows) < EXPORT_CHUNK:
            return
        after = (rows[-1][0], rows[-1][1])


async def export_usage(request: web.Request) -> web.StreamResponse:
    account_id = await session_account(request)
    fmt = request.query.get("format", "csv")
    if fmt not in ("csv", "json"):
        raise BadRequest("'format' must be csv or json.", param="format")
    f = _filters(request)
    resp = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8" if fmt == "csv"
        else "application/json",
        "Content-Disposition": f'attachment; filename="flintproxy-usage.{fmt}"',
        "Cache-Control": "no-store",
    })
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    as_csv = fmt == "csv"
    await resp.write(CSV_HEADER.encode() if as_csv else b"[")
    sep = "\r\n" if as_csv else ",\n"
    lead = "" if as_csv else "\n"
    async for lines in _chunks(request.app[USAGE_DB], account_id, f, as_csv):
        # write() waits while the client is slow (flow control): memory stays bounded.
        await resp.write((lead + sep.join(lines) + ("\r\n" if as_csv else "")).encode())
        lead = "" if as_csv else ",\n"
    if not as_csv:
        await resp.write(b"\n]\n")
    await resp.write_eof()
    return resp


async def delete_usage(request: web.Request) -> web.Response:
    account_id = await session_account(request)
    require_csrf(request)
    # Rows still queued would land after the delete: commit them first.
    if not await request.app[USAGE].sync(SYNC_TIMEOUT_S):
        raise ServiceUnavailable("The usage ledger is catching up; please retry shortly.",
                                 headers={"Retry-After": "5"})
    db = request.app[USAGE_DB]
    deleted = 0
    while True:
        # Chunks, each its own short transaction: never blocks the writer for long.
        n = await db.execute(
            "DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE account_id = ? "
            "LIMIT ?)", account_id, DELETE_CHUNK)
        deleted += n
        if n < DELETE_CHUNK:
            break
    return web.Response(body=orjson.dumps({"deleted": deleted}),
                        content_type="application/json")


# --- retention ----------------------------------------------------------------------
