"""``keen-stream ledger ...``: prove the credit ledger, sweep expired holds.

Picked up by ``keen_stream.cli`` through :func:`register`.
"""

from __future__ import annotations

import argparse
import asyncio

from keen_stream.dal.models.credits import LedgerReport
from keen_stream.settings import Settings


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
    from keen_stream.dal.database import KeenDatabase

    async def run() -> LedgerReport:
        db = await KeenDatabase.connect(settings=settings)
        try:
            return await db.credits.verify_ledger()
        finally:
            await db.close()

    report = asyncio.run(run())
    print(format_report(report))
    return 0 if report.ok else 1


def cmd_expire_holds(args: argparse.Namespace, settings: Settings) -> int:
    from keen_stream.dal.database import KeenDatabase

    async def run() -> int:
        db = await KeenDatabase.connect(settings=settings)
        try:
            return await db.credits.expire_holds(limit=args.limit)
        finally:
            await db.close()

    print(f"expired {asyncio.run(run())} holds")
    return 0
