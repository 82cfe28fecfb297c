"""``flintproxy admin`` verbs of money and the account's life (issue 17), beside the
core verbs of ``tools.admin`` which registers them: ``create-codes``, ``reconcile``,
``notify-policy-change``.

Exit status as the other verbs: 0 done, 1 refused or a mismatch found, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flintproxy.config import Config
from flintproxy.money import format_usd
from flintproxy.store.accounts import Accounts, parse_usd
from flintproxy.store.codes import Codes
from flintproxy.store.entries import reconcile
from flintproxy.store.notices import notify_all

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

    sub.add_parser("reconcile", help="check every balance against its ledger entries "
                   "(exit 1 on a mismatch)").set_defaults(run=_reconcile)
