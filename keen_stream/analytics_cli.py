"""``keen-stream analytics ...``: roll the analytics rollups, refresh the dashboard view.

Both are what the hub runs on its timers (``analytics_rollup_interval``,
``dashboard_refresh_interval``); from the command line they backfill a fresh or restored
database, or catch up after the hubs were down. Picked up by ``keen_stream.cli`` through
:func:`register`.
"""

from __future__ import annotations

import argparse
from datetime import date

from keen_stream.clikit import run_with_database
from keen_stream.errors import InvalidInput
from keen_stream.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    analytics = sub.add_parser("analytics", help="analytics rollups and the dashboard view")
    commands = analytics.add_subparsers(dest="analytics_command", required=True)

    p = commands.add_parser(
        "rollup",
        help="roll ended hours into analytics_hourly and rewrite their days (idempotent)",
        description=(
            "Without options: every ended hour never rolled and every hour written to after its "
            "roll (what the hub runs). --date D: that UTC day again. --since D: every ended "
            "hour from UTC day D on, again (a backfill). Rolling again gives the same figures."
        ),
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument("--date", help="one UTC day, YYYY-MM-DD")
    when.add_argument("--since", help="every day from this UTC day on, YYYY-MM-DD")
    p.set_defaults(func=cmd_rollup)

    p = commands.add_parser(
        "refresh",
        help="refresh the admin dashboard view (CONCURRENTLY: readers are not blocked)",
    )
    p.set_defaults(func=cmd_refresh)


def _day(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{option} must be a date, YYYY-MM-DD (got {value!r})") from None


def cmd_rollup(args: argparse.Namespace, settings: Settings) -> int:
    day, since = _day(args.date, "--date"), _day(args.since, "--since")
    report = run_with_database(settings, lambda db: db.analytics.rollup(since=since, day=day))
    days = ", ".join(d.isoformat() for d in report.days) or "none"
    print(f"analytics rollup: {report.hours} hours rolled; days rewritten: {days}")
    return 0


def cmd_refresh(args: argparse.Namespace, settings: Settings) -> int:
    run_with_database(settings, lambda db: db.analytics.refresh_dashboard())
    print("analytics refresh: dashboard view refreshed")
    return 0
