"""``GET /api/account/export``: everything held about the account, one JSON document
(the right of access, CONTRACT promise 7); ``GET /api/account/ledger``: its newest
balance changes (the console's balance history).

The profile (email, status, balance), the keys' metadata (never a key: only its
SHA-256 is held), the ledger of balance changes, erased-usage totals, top-ups,
redeemed codes, and every usage row. It is streamed: the small parts first, then the
usage rows a chunk at a time (web.usage_api's keyset walk), so an account with
millions of rows exports in constant memory. A disabled account may export too.
"""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from flintproxy.store.entries import history, recent_entries
from flintproxy.web.api import json_response, session_account
from flintproxy.web.keys import ACCOUNTS, USAGE, USAGE_DB
from flintproxy.web.usage_api import SYNC_TIMEOUT_S, Filters, usage_rows

__all__ = ["LEDGER_PAGE", "account_ledger", "export_account"]

LEDGER_PAGE = 20  # entries the console shows; the export has them all


async def export_account(request: web.Request) -> web.StreamResponse:
    account_id = await session_account(request)
    repo = request.app[ACCOUNTS]
    account = await repo.get(account_id)
    keys = await repo.list_keys(account_id)
    money = await history(repo.db, account_id)
    # Rows still queued in memory belong in it too (best effort: a slow ledger
    # leaves them to the next export rather than fail this one).
    await request.app[USAGE].sync(SYNC_TIMEOUT_S)
    head = orjson.dumps({
        "object": "account_export",
        "generated_at_ms": time.time_ns() // 1_000_000,
        "account": account.as_json(),
        "keys": [k.as_json() for k in keys],
        **money,
    })
    resp = web.StreamResponse(headers={
        "Content-Type": "application/json",
        "Content-Disposition": 'attachment; filename="flintproxy-account.json"',
        "Cache-Control": "no-store",
    })
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(head[:-1] + b',"usage":[')
    lead = b"\n"
    async for lines in usage_rows(request.app[USAGE_DB], account_id,
                                  Filters(None, None, None), False):
        await resp.write(lead + ",\n".join(lines).encode())
        lead = b",\n"
    await resp.write(b"\n]}\n")
    await resp.write_eof()
    return resp


async def account_ledger(request: web.Request) -> web.Response:
    """200 ``{data: [entry...]}``: the ``LEDGER_PAGE`` newest ledger entries (credits,
    redemptions, top-ups, adjustments), newest first."""
    account_id = await session_account(request)
    entries = await recent_entries(request.app[ACCOUNTS].db, account_id, LEDGER_PAGE)
    return json_response({"data": entries})
