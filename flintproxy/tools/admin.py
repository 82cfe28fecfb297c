"""``flintproxy admin``: operator tasks against the store, safe while the server runs.

Each verb is one short transaction that also writes an ``events`` row (and, for
credit, revoke-key, disable/enable-account, set-limits, set-key-cap and the operator role, an
``audit`` row whose operator is the command line: ``store.operators``); a running
server polls that table (``accounts.change_poll_s``, default 0.25 s; on PostgreSQL
it is also woken by a NOTIFY) and applies the change within one second. Exit
status: 0 done, 1 refused (unknown account, duplicate email, schema behind...),
2 bad usage or configuration.

On PostgreSQL the schema is migrated only by ``migrate`` (every other verb checks
it is current); ``copy-to-postgres`` moves an embedded install (tools/copy.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from flintproxy.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    StorageBackend,
    load_config,
    mask_dsn,
)
from flintproxy.crypto import load_keyring
from flintproxy.errors import FlintError, KeyringError, SchemaBehind
from flintproxy.money import format_usd
from flintproxy.store import postgres, sqlite
from flintproxy.store.accounts import (
    Accounts,
    key_name,
    model_list,
    new_password,
    normalize_email,
    parse_usd,
)
from flintproxy.store.caps import KeyCaps, key_caps, parse_cap
from flintproxy.store.db import Database, SqliteDatabase
from flintproxy.store.operators import Operators, audit_note
from flintproxy.store.pii import PiiCodec
from flintproxy.store.retention import purge
from flintproxy.tools import admin_money
from flintproxy.tools.copy import copy_to_postgres

Verb = Callable[[Accounts, argparse.Namespace, Config], Awaitable[int]]


def _err(msg: str) -> None:
    print(f"flintproxy admin: {msg}", file=sys.stderr)


def _note(args: argparse.Namespace) -> str:
    """``--note``: why, for the audit log (these verbs are audited as "command line")."""
    return audit_note(args.note, required=False)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


async def _create_account(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    email = normalize_email(args.email)
    password = None
    if args.password_stdin:
        line = sys.stdin.readline()
        password = new_password(line.removesuffix("\n").removesuffix("\r"))
    account_id = await repo.create_account(email, password)
    print(f"created account {account_id} {email}"
          + ("" if password else " (no password: API keys only until one is set)"))
    return 0


async def _credit(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    amount = parse_usd(args.usd)
    account = await repo.by_email(normalize_email(args.email))
    balance = await Operators(repo).credit(None, account.id, amount, _note(args))
    print(f"credited {format_usd(amount)} USD to {account.email}; "
          f"balance {format_usd(balance)} USD")
    return 0


async def _create_key(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    account = await repo.by_email(normalize_email(args.email))
    expires_at = None
    if args.expires_in_days is not None:
        if args.expires_in_days < 1:
            _err("--expires-in-days must be at least 1")
            return 2
        expires_at = repo.clock() + args.expires_in_days * 86_400_000
    models = None
    if args.models:
        served = {m for u in cfg.upstreams for m in u.models}
        models = model_list([m.strip() for m in args.models.split(",") if m.strip()], served)
    info, key = await repo.create_key(account.id, key_name(args.name), expires_at=expires_at,
                                      allowed_models=models)
    print(f"created key {info.id} ({info.prefix}...{info.last4}) for {account.email}; "
          "it is shown only now", file=sys.stderr)
    print(key)  # alone on the last line of stdout, for scripts
    return 0


async def _revoke_key(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    changed = await Operators(repo).revoke_key(None, args.key_id, _note(args))
    print(f"revoked key {args.key_id}" if changed else f"key {args.key_id} was already revoked")
    return 0


async def _set_key_cap(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    limits: dict[str, int | None] = {}
    for kind, raw in (("day", args.day_usd), ("month", args.month_usd)):
        if raw is not None:
            limits[kind] = None if raw.strip().lower() == "none" else parse_cap(
                raw, f"--{kind}-usd")
    if not limits:
        _err("give --day-usd and/or --month-usd (a USD amount, or 'none' to clear)")
        return 2
    await Operators(repo).set_key_caps(None, args.key_id, limits, _note(args))
    shown = ", ".join(f"{n}={'none' if v is None else format_usd(v) + ' USD'}"
                      for n, v in limits.items())
    print(f"spend caps of key {args.key_id}: {shown}")
    return 0


async def _set_limits(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    account = await repo.by_email(normalize_email(args.email))
    await Operators(repo).set_limits(None, account.id, args.key,
                                     (args.rpm, args.tpm, args.max_concurrent), _note(args))
    target = f"key {args.key}" if args.key is not None else f"account {account.email}"
    shown = ", ".join(f"{n}={'default' if v is None else v}" for n, v in
                      (("rpm", args.rpm), ("tpm", args.tpm),
                       ("max_concurrent", args.max_concurrent)))
    print(f"limits of {target}: {shown}")
    return 0


def _set_status(status: str) -> Verb:
    async def verb(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
        account = await repo.by_email(normalize_email(args.email))
        changed = await Operators(repo).set_status(None, account.id, status, _note(args))
        word = "disabled" if status == "disabled" else "enabled"
        print(f"{word} account {account.email}" if changed
              else f"account {account.email} was already {word}")
        return 0

    return verb


async def _delete_account(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    account = await repo.by_email(normalize_email(args.email))
    await repo.delete_account(account.id)
    print(f"deleted account {account.id}: email and password erased, keys revoked")
    return 0


def _operator_role(grant: bool) -> Verb:
    async def verb(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
        account = await repo.by_email(normalize_email(args.email))
        ops = Operators(repo)
        if grant:
            changed = await ops.grant(account.id)
            print(f"{account.email} is now an operator" if changed
                  else f"{account.email} was already an operator")
        else:
            changed = await ops.revoke(account.id)
            print(f"{account.email} is no longer an operator" if changed
                  else f"{account.email} was not an operator")
        return 0

    return verb


async def _list_accounts(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    rows = [("ID", "EMAIL", "STATUS", "BALANCE_USD", "KEYS", "CREATED")]
    for a, live_keys in await repo.list_accounts():
        rows.append((str(a.id), a.email or "-", a.status, format_usd(a.balance_nano),
                     str(live_keys), _when(a.created_at)))
    _table(rows)
    return 0


async def _purge(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    days = cfg.billing.retention_days
    n = await purge(repo.db, days, sqlite.now_ms())
    print(f"purged {n} usage rows of accounts deleted more than {days} days ago")
    return 0


async def _list_keys(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    account = await repo.by_email(normalize_email(args.email))
    rows = [("ID", "KEY", "NAME", "CREATED", "LAST_USED", "EXPIRES", "REVOKED", "MODELS",
             "DAY_CAP", "TODAY", "MONTH_CAP", "THIS_MONTH")]
    spend = await key_caps(repo.db, account.id, repo.clock())
    for k in await repo.list_keys(account.id):
        c = spend.get(k.id, KeyCaps(None, None, 0, 0)).as_json()
        rows.append((str(k.id), f"{k.prefix}...{k.last4}", k.name or "-", _when(k.created_at),
                     _when(k.last_used_at), _when(k.expires_at), _when(k.revoked_at),
                     ",".join(k.allowed_models) if k.allowed_models else "*",
                     c["spend_cap_day_usd"] or "-", c["spent_today_usd"],
                     c["spend_cap_month_usd"] or "-", c["spent_this_month_usd"]))
    _table(rows)
    return 0


async def _migrate(repo: Accounts | None, args: argparse.Namespace, cfg: Config) -> int:
    if cfg.storage.backend is StorageBackend.POSTGRESQL:
        assert cfg.storage.dsn is not None
        db = await postgres.open_database(cfg.storage.dsn, 2)
        try:
            before, after = await postgres.migrate(db)
        finally:
            await db.close()
        where = mask_dsn(cfg.storage.dsn)
    else:
        conn = await sqlite.connect(cfg.storage.path)
        try:
            before = await sqlite.schema_version(conn)
            after = await sqlite.migrate(conn)
        finally:
            await conn.close()
        where = str(cfg.storage.path)
    print(f"schema of {where}: version {after}"
          + (f" (applied {after - before} migrations)" if after != before else " (up to date)"))
    return 0


async def _copy(repo: Accounts | None, args: argparse.Namespace, cfg: Config) -> int:
    dsn = cfg.storage.dsn
    if args.dsn_env:
        dsn = os.environ.get(args.dsn_env)
        if not dsn:
            _err(f"the environment variable {args.dsn_env} is not set")
            return 2
    elif args.dsn:
        dsn = args.dsn
    if not dsn:
        _err("give the target with --dsn-env VAR (preferred), --dsn, or [storage] dsn/dsn_env")
        return 2
    report = await copy_to_postgres(cfg.storage.path, dsn)
    for line in report:
        print(line)
    return 0


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flintproxy admin",
        description="Operator tasks on the flintproxy store. Safe while the server runs: "
                    "it applies each change within one second.")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                   help=f"config file (default {DEFAULT_CONFIG_PATH})")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    v = sub.add_parser("create-account", help="create an account")
    v.add_argument("email")
    v.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    v.set_defaults(run=_create_account)

    v = sub.add_parser("credit", help="add funds, e.g. credit a@b.c 5.00")
    v.add_argument("email")
    v.add_argument("usd", help="amount in USD as a decimal, e.g. 5.00")
    v.add_argument("--note", help="why (kept in the audit log)")
    v.set_defaults(run=_credit)

    v = sub.add_parser("create-key", help="create an API key (printed once, last line)")
    v.add_argument("email")
    v.add_argument("--name", default="")
    v.add_argument("--expires-in-days", type=int)
    v.add_argument("--models", help="comma-separated allow-list (default: all models)")
    v.set_defaults(run=_create_key)

    v = sub.add_parser("revoke-key", help="revoke an API key by id")
    v.add_argument("key_id", type=int)
    v.add_argument("--note", help="why (kept in the audit log)")
    v.set_defaults(run=_revoke_key)

    for name, status in (("disable-account", "disabled"), ("enable-account", "active")):
        v = sub.add_parser(name, help=f"{name.split('-')[0]} an account and its keys")
        v.add_argument("email")
        v.add_argument("--note", help="why (kept in the audit log)")
        v.set_defaults(run=_set_status(status))

    v = sub.add_parser("set-limits", help="override rate limits of an account or one key "
                       "(options left out go back to the configured defaults)")
    v.add_argument("email")
    v.add_argument("--key", type=int, metavar="KEY_ID", help="one key of the account")
    v.add_argument("--rpm", type=int, help="requests per minute")
    v.add_argument("--tpm", type=int, help="tokens per minute")
    v.add_argument("--max-concurrent", type=int, help="requests in flight at once")
    v.add_argument("--note", help="why (kept in the audit log)")
    v.set_defaults(run=_set_limits)

    v = sub.add_parser("set-key-cap", help="set or clear (none) a key's spend caps per UTC "
                       "day and month (options left out keep their value)")
    v.add_argument("key_id", type=int)
    v.add_argument("--day-usd", metavar="USD", help="e.g. 5.00, or none")
    v.add_argument("--month-usd", metavar="USD", help="e.g. 50, or none")
    v.add_argument("--note", help="why (kept in the audit log)")
    v.set_defaults(run=_set_key_cap)

    v = sub.add_parser("delete-account",
                       help="close an account: erase email and password, revoke keys")
    v.add_argument("email")
    v.set_defaults(run=_delete_account)

    for name, grant, what in (("grant-operator", True, "give an account the operator role "
                                "(the console's operator pages and /api/admin/)"),
                               ("revoke-operator", False, "take the operator role away")):
        v = sub.add_parser(name, help=what)
        v.add_argument("email")
        v.set_defaults(run=_operator_role(grant))

    sub.add_parser("list-accounts", help="list accounts").set_defaults(run=_list_accounts)

    v = sub.add_parser("list-keys", help="list an account's keys")
    v.add_argument("email")
    v.set_defaults(run=_list_keys)

    sub.add_parser("purge", help="run the usage retention job now (billing.retention_days)"
                   ).set_defaults(run=_purge)

    sub.add_parser("migrate", help="apply pending schema migrations (safe to run on "
                   "several nodes at once)").set_defaults(run=_migrate, raw=True)

    v = sub.add_parser("copy-to-postgres",
                       help="copy this install's SQLite store (storage.path) into an empty "
                            "PostgreSQL database, verify counts and money, and report them")
    v.add_argument("--dsn-env", metavar="VAR",
                   help="environment variable holding the target DSN (preferred)")
    v.add_argument("--dsn", help="the target DSN (visible in the process list: prefer "
                   "--dsn-env)")
    v.set_defaults(run=_copy, raw=True)
    admin_money.add_verbs(sub)
    return p


async def _open(cfg: Config) -> Database:
    if cfg.storage.backend is StorageBackend.POSTGRESQL:
        assert cfg.storage.dsn is not None
        db = await postgres.open_database(cfg.storage.dsn, 2)
        try:
            await postgres.check_schema(db)
        except BaseException:
            await db.close()
            raise
        return db
    return SqliteDatabase(await sqlite.open_store(cfg.storage.path))


async def _run(verb: Verb, args: argparse.Namespace, cfg: Config) -> int:
    if getattr(args, "raw", False):  # verbs that open the store themselves
        return await verb(None, args, cfg)  # type: ignore[arg-type]
    db = await _open(cfg)
    try:
        repo = Accounts(db, cfg.accounts.bcrypt_cost, cfg.accounts.session_ttl_s,
                        pii=PiiCodec(load_keyring(cfg.crypto)))
        return await verb(repo, args, cfg)
    finally:
        await db.close()


def main(argv: list[str]) -> int:
    """Run one admin verb; returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        _err(str(exc))
        return 2
    try:
        return asyncio.run(_run(args.run, args, cfg))
    except FlintError as exc:
        _err(exc.message)
        return 2 if exc.status == 400 else 1
    except (SchemaBehind, KeyringError) as exc:
        _err(str(exc))
        return 1
