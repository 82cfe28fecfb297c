"""Operators' API under /api/admin/: find accounts, adjust money, disable, revoke, limit.

Every route needs a login session of an account with the operator role
(``flintproxy admin grant-operator EMAIL``): 401 without a session, 403 for anyone
else. Changes also need the CSRF token (``session_account``) and an account that is
not disabled; each writes an audit row in the same transaction (``store.operators``).
Money is a decimal USD string in (``"5.00"``, never a float) and integer nano-USD
plus a decimal string out; a credit or a debit needs a note.

Routes:
    GET  /api/admin/accounts?email=PART             -> {data: [account summary...]}
    GET  /api/admin/accounts/{id}                   -> summary + keys
    POST /api/admin/accounts/{id}/credit  {amount_usd, note}    -> summary
    POST /api/admin/accounts/{id}/debit   {amount_usd, note}    -> summary (409 below 0)
    POST /api/admin/accounts/{id}/disable {note?}   -> summary
    POST /api/admin/accounts/{id}/enable  {note?}   -> summary
    POST /api/admin/accounts/{id}/limits  {key_id?, rpm?, tpm?, max_concurrent?, note?}
    POST /api/admin/keys/{id}/revoke      {note?}   -> 204
    POST /api/admin/keys/{id}/caps        {spend_cap_day_usd?, spend_cap_month_usd?, note?}
                                                    -> summary + keys (null: no cap)
    GET  /api/admin/audit?limit=&before=            -> {data: [entry...], next_before}
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from flintproxy.errors import BadRequest, Conflict, NotFound, PermissionDenied
from flintproxy.money import format_usd
from flintproxy.store.accounts import MAX_EMAIL_CHARS, parse_usd
from flintproxy.store.operators import MAX_AUDIT_PAGE, audit_note
from flintproxy.web.api import (
    CAP_FIELDS,
    active_account,
    cap_changes,
    json_body,
    json_response,
    keys_json,
    no_content,
    session_account,
)
from flintproxy.web.keys import ACCOUNTS, BILLING, OPERATORS

MAX_LIMIT_VALUE = 10**9


async def _operator(request: web.Request, *, change: bool = False) -> int:
    """The operator's account id: 401 without a session, 403 without the role."""
    account_id = await (active_account if change else session_account)(request)
    if not await request.app[OPERATORS].is_operator(account_id):
        raise PermissionDenied("Only operators may use this.", code="not_operator")
    return account_id


def _id(request: web.Request, name: str, what: str) -> int:
    raw = request.match_info[name]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"No {what} with id {raw[:32]!r}.")
    return int(raw)


def _amount(raw: object) -> int:
    if not isinstance(raw, str):
        raise BadRequest("'amount_usd' must be a decimal string such as \"5.00\".",
                         param="amount_usd")
    return parse_usd(raw[:64])


async def _summary(request: web.Request, account_id: int) -> web.Response:
    return json_response((await request.app[OPERATORS].summary(account_id)).as_json())


async def find_accounts(request: web.Request) -> web.Response:
    await _operator(request)
    part = request.query.get("email", "").strip()
    if not part or len(part) > MAX_EMAIL_CHARS:
        raise BadRequest("Give part of an email address to search for (1 to "
                         f"{MAX_EMAIL_CHARS} characters).", param="email")
    found = await request.app[OPERATORS].find(part)
    return json_response({"object": "list", "data": [s.as_json() for s in found]})


async def get_account(request: web.Request) -> web.Response:
    await _operator(request)
    account_id = _id(request, "account_id", "account")
    summary = (await request.app[OPERATORS].summary(account_id)).as_json()
    return json_response({**summary, "keys": await keys_json(request.app[ACCOUNTS],
                                                             account_id)})


def _money(debit: bool) -> Any:
    """The credit and debit handlers: an amount and a required note, audited."""
    async def handler(request: web.Request) -> web.Response:
        operator = await _operator(request, change=True)
        account_id = _id(request, "account_id", "account")
        body = await json_body(request, frozenset({"amount_usd", "note"}))
        amount = _amount(body.get("amount_usd"))
        note = audit_note(body.get("note"), required=True)
        operators = request.app[OPERATORS]
        if not debit:
            await operators.credit(operator, account_id, amount, note)
            return await _summary(request, account_id)
        await operators.summary(account_id)  # NotFound for an unknown id
        billing = request.app[BILLING]
        if not await billing.hold(account_id, amount):
            balance, pending, reserved = billing.snapshot(account_id)
            available = max((balance or 0) - pending - reserved, 0)
            raise Conflict(
                f"The available balance is {format_usd(available)} USD "
                f"({format_usd(reserved)} USD reserved by requests in flight, "
                f"{format_usd(pending)} USD spent by usage not yet written): a debit of "
                f"{format_usd(amount)} USD would make it negative.",
                code="insufficient_balance")
        try:
            await operators.debit(operator, account_id, amount, note)
        except Exception:  # not made (a cancellation may come after the commit: keep it)
            billing.unhold(account_id, amount)
            raise
        billing.debited(account_id, amount)
        return await _summary(request, account_id)
    return handler


credit = _money(debit=False)
debit = _money(debit=True)


def _set_status(status: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        operator = await _operator(request, change=True)
        account_id = _id(request, "account_id", "account")
        body = await json_body(request, frozenset({"note"}))
        note = audit_note(body.get("note"), required=False)
        await request.app[OPERATORS].set_status(operator, account_id, status, note)
        return await _summary(request, account_id)

    return handler


disable = _set_status("disabled")
enable = _set_status("active")


def _limit(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not (
            1 <= value <= MAX_LIMIT_VALUE):
        raise BadRequest(f"'{name}' must be an integer from 1 to {MAX_LIMIT_VALUE}, or null "
                         "for the configured default.", param=name)
    return value


async def set_limits(request: web.Request) -> web.Response:
    operator = await _operator(request, change=True)
    account_id = _id(request, "account_id", "account")
    body = await json_body(request, frozenset({"key_id", "rpm", "tpm", "max_concurrent",
                                               "note"}))
    key_id = body.get("key_id")
    if key_id is not None and (isinstance(key_id, bool) or not isinstance(key_id, int)
                               or not 1 <= key_id < 2**63):
        raise BadRequest("'key_id' must be one of the account's key ids.", param="key_id")
    limits = (_limit(body, "rpm"), _limit(body, "tpm"), _limit(body, "max_concurrent"))
    note = audit_note(body.get("note"), required=False)
    await request.app[OPERATORS].set_limits(operator, account_id, key_id, limits, note)
    return await _summary(request, account_id)


async def set_key_caps(request: web.Request) -> web.Response:
    operator = await _operator(request, change=True)
    key_id = _id(request, "key_id", "API key")
    body = await json_body(request, frozenset({*CAP_FIELDS, "note"}))
    limits = cap_changes(body)
    note = audit_note(body.get("note"), required=False)
    account_id = await request.app[OPERATORS].set_key_caps(operator, key_id, limits, note)
    return await _summary(request, account_id)


async def revoke_key(request: web.Request) -> web.Response:
    operator = await _operator(request, change=True)
    key_id = _id(request, "key_id", "API key")
    body = await json_body(request, frozenset({"note"}))
    note = audit_note(body.get("note"), required=False)
    await request.app[OPERATORS].revoke_key(operator, key_id, note)
    return no_content()


def _query_int(request: web.Request, name: str, default: int | None,
               top: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18 or not 1 <= int(raw) <= top:
        raise BadRequest(f"'{name}' must be an integer from 1 to {top}.", param=name)
    return int(raw)


async def audit_log(request: web.Request) -> web.Response:
    await _operator(request)
    limit = _query_int(request, "limit", 50, MAX_AUDIT_PAGE) or 50
    before = _query_int(request, "before", None, 2**62)
    entries = await request.app[OPERATORS].audit_log(limit + 1, before)
    page = entries[:limit]
    more = len(entries) > limit
    return json_response({"object": "list", "data": [e.as_json() for e in page],
                          "next_before": page[-1].id if more else None})

