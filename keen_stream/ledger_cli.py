"""``keen-stream ledger ...``: prove the credit ledger, sweep expired holds, show or set the price.

Picked up by ``keen_stream.cli`` through :func:`register`.
"""

from __future__ import annotations

import argparse
from decimal import Decimal
from typing import TYPE_CHECKING

from keen_stream.clikit import run_with_database
from keen_stream.dal.models.credits import LedgerReport
from keen_stream.settings import Settings

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ledger = sub.add_parser("ledger", help="credit ledger maintenance")
    commands = ledger.add_subparsers(dest="ledger_command", required=True)

    p = commands.add_parser(
        "verify",
        help="check every account against its ledger; exit 1 on any mismatch",
        description=(
            "For every account: balance == sum of its ledger rows, sequence numbers contiguous "
            "from 1, each balance_after chains from the previous one, lifetime totals and held "
            "amounts match, refunds stay within their charges."
        ),
    )
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser("expire-holds", help="free credit holds past their expiry")
    p.add_argument("--limit", type=int, default=10_000)
    p.set_defaults(func=cmd_expire_holds)

    p = commands.add_parser("markup", help="show the markup charges are priced at")
    p.set_defaults(func=cmd_markup)

    p = commands.add_parser(
        "set-markup",
        help="change the markup (an admin answers for it; recorded in audit_log)",
        description="Credits per dollar of provider cost, from the next charge or hold on.",
    )
    p.add_argument("markup", help="e.g. 5.00 (0.01 to 99.99)")
    p.add_argument("--reason", required=True, help="why, for the audit log")
    p.add_argument("--admin-email", help="the acting admin (default: KEEN_ADMIN_EMAIL)")
    p.set_defaults(func=cmd_set_markup)


def format_report(report: LedgerReport) -> str:
    lines = [
        f"ledger verify: {report.accounts} accounts, {report.transactions} transactions, "
        f"{report.active_holds} active holds"
    ]
    for p in report.problems:
        lines.append(
            f"  MISMATCH account {p.account_id} (user {p.user_id}): {p.problem}"
            f" (expected {p.expected}, found {p.actual})"
        )
    if report.ok:
        lines.append("ledger verify: OK")
    else:
        accounts = len({p.account_id for p in report.problems})
        lines.append(
            f"ledger verify: FAILED ({len(report.problems)} problems in {accounts} accounts)"
        )
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    report = run_with_database(settings, lambda db: db.credits.verify_ledger())
    print(format_report(report))
    return 0 if report.ok else 1


def cmd_expire_holds(args: argparse.Namespace, settings: Settings) -> int:
    expired = run_with_database(settings, lambda db: db.credits.expire_holds(limit=args.limit))
    print(f"expired {expired} holds")
    return 0


def cmd_markup(args: argparse.Namespace, settings: Settings) -> int:
    markup = run_with_database(settings, lambda db: db.billing.get_markup())
    print(f"markup: {markup} credits per dollar of provider cost")
    return 0


def cmd_set_markup(args: argparse.Namespace, settings: Settings) -> int:
    email = args.admin_email or settings.admin_email

    async def set_markup(db: KeenDatabase) -> Decimal:
        # Who answers for the change (the database checks again that they are an active admin).
        admin = await db.users.admin_by_email(email)
        return await db.billing.set_markup(args.markup, reason=args.reason, actor_id=admin.id)

    print(f"markup is now {run_with_database(settings, set_markup)} (set by {email})")
    return 0
