"""Users' access to their usage rows (CONTRACT promise 7): list, export, delete.

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
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import aiosqlite
import orjson
from aiohttp import web

from flintproxy.api import require_csrf, session_account
from flintproxy.billing import format_usd
from flintproxy.errors import BadRequest, ServiceUnavailable
from flintproxy.usage import USAGE, USAGE_DB

DEFAULT_PAGE = 100
MAX_PAGE = 1000
EXPORT_CHUNK = 2000
DELETE_CHUNK = 5000
SYNC_TIMEOUT_S = 5.0
_CURSOR_RE = re.compile(r"(\d{1,19})_(\d{1,19})")

_SELECT = ("SELECT id, request_id, key_id, model, upstream, prompt_tokens, completion_tokens, "
           "cached_tokens, reasoning_tokens, estimated, cost_nano, status, outcome, stream, "
           "started_at, duration_ms, ttfb_ms FROM usage WHERE ")
FIELDS = ("request_id", "started_at", "started_at_ms", "model", "upstream", "key_id",
          "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
          "total_tokens", "cost_nano", "cost_usd", "status", "outcome", "stream", "estimated",
          "duration_ms", "ttfb_ms")


class Filters(NamedTuple):
    since: int | None
    until: int | None
    model: str | None


def _time_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if raw.isdigit():
        return int(raw)
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"'{name}' must be an ISO 8601 time or unix milliseconds.",
                         param=name) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


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


def _iso(ms: int) -> str:
    secs, frac = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:03d}Z"


def _record(r: Sequence[Any]) -> dict[str, Any]:
    return {
        "request_id": r[1], "started_at": _iso(r[14]), "started_at_ms": r[14], "model": r[3],
        "upstream": r[4], "key_id": r[2], "prompt_tokens": r[5], "completion_tokens": r[6],
        "cached_tokens": r[7], "reasoning_tokens": r[8], "total_tokens": r[5] + r[6],
        "cost_nano": r[10], "cost_usd": format_usd(r[10]), "status": r[11],
        "outcome": r[12], "stream": bool(r[13]), "estimated": bool(r[9]),
        "duration_ms": r[15], "ttfb_ms": r[16],
    }


async def list_usage(request: web.Request) -> web.Response:
    account_id = await session_account(request)
    f = _filters(request)
    try:
        limit = int(request.query.get("limit", DEFAULT_PAGE))
    except ValueError:
        limit = -1
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
    rows = list(await request.app[USAGE_DB].execute_fetchall(
        _SELECT + where + " ORDER BY started_at DESC, id DESC LIMIT ?", [*args, limit + 1]))
    page = rows[:limit]
    more = len(rows) > limit
    body = {"object": "list", "data": [_record(r) for r in page], "has_more": more,
            "next_cursor": f"{page[-1][14]}_{page[-1][0]}" if more else None}
    return web.Response(body=orjson.dumps(body), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def _chunks(db: aiosqlite.Connection, account_id: int,
                  f: Filters) -> AsyncIterator[list[Any]]:
    where, args = _where(account_id, f)
    sql = _SELECT + where + " AND (started_at, id) > (?, ?) ORDER BY started_at, id LIMIT ?"
    after: tuple[int, int] = (-1, -1)
    while True:
        rows = list(await db.execute_fetchall(sql, [*args, *after, EXPORT_CHUNK]))
        if not rows:
            return
        yield rows
        if len(rows) < EXPORT_CHUNK:
            return
        after = (rows[-1][14], rows[-1][0])


def _csv_value(v: Any) -> Any:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else v


def _csv_chunk(rows: list[Any], header: bool) -> bytes:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\r\n")
    if header:
        out.writerow(FIELDS)
    out.writerows([_csv_value(v) for v in _record(r).values()] for r in rows)
    return buf.getvalue().encode()


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
    first = True
    if fmt == "csv":
        await resp.write(_csv_chunk([], header=True))
    else:
        await resp.write(b"[")
    async for rows in _chunks(request.app[USAGE_DB], account_id, f):
        if fmt == "csv":
            data = _csv_chunk(rows, header=False)
        else:
            data = (b"\n" if first else b",\n") + b",\n".join(
                orjson.dumps(_record(r)) for r in rows)
        first = False
        # write() waits while the client is slow (flow control): memory stays bounded.
        await resp.write(data)
    if fmt == "json":
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
        cur = await db.execute(
            "DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE account_id = ? "
            "LIMIT ?)", (account_id, DELETE_CHUNK))
        deleted += cur.rowcount
        if cur.rowcount < DELETE_CHUNK:
            break
    return web.Response(body=orjson.dumps({"deleted": deleted}),
                        content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/usage", list_usage)
    app.router.add_get("/api/usage/export", export_usage)
    app.router.add_delete("/api/usage", delete_usage)
    app.router.add_post("/api/usage/delete", delete_usage)
