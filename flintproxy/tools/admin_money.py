"""``flintproxy admin`` verbs of money and the account's life (issue 17), beside the
core verbs of ``tools.admin`` which registers them: ``create-codes``, ``reconcile``,
``notify-policy-change``, ``rotate-key``.

Exit status as the other verbs: 0 done, 1 refused or a mismatch found, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from flintproxy.config import Config
from flintproxy.crypto import generate_key, load_keyring
from flintproxy.money import format_usd
from flintproxy.store.accounts import Accounts, parse_usd
from flintproxy.store.codes import Codes
from flintproxy.store.entries import reconcile
from flintproxy.store.notices import notify_all
from flintproxy.store.pii import EV_KEYRING, reseal_outbox

__all__ = ["add_verbs"]

MAX_EXPIRY_DAYS = 3650


async def _create_codes(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    amount = parse_usd(args.usd)
    expires_at = None
    if args.expires_days is not None:
        if not 1 <= args.expires_days <= MAX_EXPIRY_DAYS:
            print(f"flintproxy admin: --expires-days must be in [1, {MAX_EXPIRY_DAYS}]",
                  file=sys.stderr)
            return 2
        expires_at = repo.clock() + args.expires_days * 86_400_000
    codes = await Codes(repo).create(args.count, amount, expires_at=expires_at,
                                     note=args.note)
    print(f"created {len(codes)} codes of {format_usd(amount)} USD each"
          + (f", expiring in {args.expires_days} days" if expires_at else "")
          + "; they are shown only now", file=sys.stderr)
    for code in codes:
        print(code)
    return 0


async def _reconcile(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    report = await reconcile(repo.db)
    for line in report.mismatches:
        print(line)
    print(f"checked {report.accounts} accounts: "
          + ("the books balance" if report.ok else f"{len(report.mismatches)} mismatches"),
          file=sys.stderr)
    return 0 if report.ok else 1


async def _notify_policy_change(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    try:
        body = args.body_file.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"flintproxy admin: --body-file {args.body_file}: cannot read it "
              f"({type(exc).__name__})", file=sys.stderr)
        return 2
    if not cfg.email.enabled:
        print("flintproxy admin: [email] is not configured: the notice would never be sent",
              file=sys.stderr)
        return 2
    run = await notify_all(repo.db, args.subject, body, pii=repo.pii)
    print(("resumed: " if run.resumed else "")
          + f"queued {run.queued_now} messages now, {run.queued_total} in all for this "
          f"notice; the server sends them at most {cfg.email.max_per_second} a second",
          file=sys.stderr)
    return 0


def _write_key_file(path: Path, text: str) -> None:
    """Replace the key file atomically, mode 0600 (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def _rotate_key(repo: Accounts, args: argparse.Namespace, cfg: Config) -> int:
    """New key first in the file (servers reload it: they seal with it and still open
    the old); every row re-sealed; then the old key leaves the file."""
    path = cfg.crypto.key_file
    if path is None:
        print("flintproxy admin: rotate-key needs [crypto] key_file (with key_env, put the "
              "new key first and the old one after it in the variable, restart, run "
              "rotate-key --reseal-only, then drop the old key)", file=sys.stderr)
        return 2
    old = load_keyring(cfg.crypto)
    assert old is not None
    old_text = path.read_text("ascii")
    if not args.reseal_only:
        _write_key_file(path, generate_key() + "\n" + old_text)
        await repo.announce(EV_KEYRING)
        # Every server applies a change within a second (the change feed); wait them out
        # so none seals a new row under the old key after the pass below.
        await asyncio.sleep(args.settle_s)
    repo.pii.keyring = load_keyring(cfg.crypto)
    rows = await repo.pii.seal_clear(repo.db)
    mails = await reseal_outbox(repo.db, repo.pii)
    rows += await repo.pii.seal_clear(repo.db)  # anything a late server wrote meanwhile
    if not args.reseal_only:
        current = path.read_text("ascii").splitlines()[0]
        _write_key_file(path, current + "\n")
        await repo.announce(EV_KEYRING)
    print(f"re-sealed {rows} accounts and {mails} queued messages under the new key"
          + ("" if args.reseal_only else f"; {path} now holds it alone (keep a copy)"),
          file=sys.stderr)
    return 0


def add_verbs(sub: Any) -> None:
    """Register the verbs on ``flintproxy admin``'s subparsers."""
    v = sub.add_parser("create-codes", help="create redemption codes (printed once, one a "
                       "line), e.g. create-codes 10 5.00")
    v.add_argument("count", type=int)
    v.add_argument("usd", help="value of each code in USD, e.g. 5.00")
    v.add_argument("--expires-days", type=int)
    v.add_argument("--note", default="", help="why the codes exist (kept with them)")
    v.set_defaults(run=_create_codes)

    v = sub.add_parser("notify-policy-change", help="email a notice to every active account "
                       "(resumable: run it again with the same subject and body)")
    v.add_argument("--subject", required=True)
    v.add_argument("--body-file", type=Path, required=True)
    v.set_defaults(run=_notify_policy_change)

    v = sub.add_parser("rotate-key", help="re-encrypt account data under a new data key, "
                       "while servers run ([crypto] key_file)")
    v.add_argument("--reseal-only", action="store_true",
                   help="no new key: re-seal under the key file's first key")
    v.add_argument("--settle-s", type=float, default=2.0, help=argparse.SUPPRESS)
    v.set_defaults(run=_rotate_key)

    sub.add_parser("reconcile", help="check every balance against its ledger entries "
                   "(exit 1 on a mismatch)").set_defaults(run=_reconcile)
