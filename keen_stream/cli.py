"""``keen-stream`` command line: migrate, create-admin, serve, ledger, users, tokens, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from keen_stream import accounts_cli, analytics_cli, demo, ledger_cli, logs
from keen_stream import backup as backup_cli
from keen_stream.clikit import EXIT_ERROR, EXIT_NOT_FOUND, database_dsn, prompt_password
from keen_stream.errors import KeenError, NotFound
from keen_stream.hub import cli as hub_cli
from keen_stream.settings import Settings, get_settings


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from keen_stream import migrate
    from keen_stream.dal.pgerrors import connect_error

    with database_dsn(settings) as dsn:
        try:
            migrate.upgrade(dsn, args.revision, credit_markup=args.markup)
        except Exception as exc:
            # The database unreachable or refusing: one line and exit 2 like every command (the
            # driver's error, found inside SQLAlchemy's), not the migration tool's traceback.
            error = connect_error(exc)
            if error is None:
                raise
            raise error from exc
    print(f"database is at {args.revision}")
    return 0


def _admin_password(settings: Settings) -> str:
    if settings.admin_password is not None:
        return settings.admin_password.get_secret_value()
    return prompt_password("Admin password", otherwise="set KEEN_ADMIN_PASSWORD")


def cmd_create_admin(args: argparse.Namespace, settings: Settings) -> int:
    from keen_stream.dal.database import KeenDatabase
    from keen_stream.dal.users import upsert_super_admin

    password = _admin_password(settings)
    email = args.email or settings.admin_email

    async def run() -> None:
        db = await KeenDatabase.connect(settings=settings)
        try:
            user = await upsert_super_admin(db, email, password)
        finally:
            await db.close()
        print(f"super_admin {user.email} ({user.id}) is ready, with unlimited credits")

    asyncio.run(run())
    return 0


def settings_problems(exc: ValidationError) -> str:
    """What is wrong with the ``KEEN_*`` environment, on one line: each variable and why, never
    its value (it may be a secret)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        variable = "KEEN_" + "_".join(str(part) for part in error["loc"]).upper()
        message = error["msg"].removeprefix("Value error, ")
        problems.append(message if variable in message else f"{variable}: {message}")
    return "; ".join(problems)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keen-stream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="bring the schema to the newest revision (idempotent)")
    p.add_argument("--revision", default="head")
    p.add_argument(
        "--markup",
        default=None,
        help="upgrading past migration 0007: the markup the deployment charged until now (its"
        " KEEN_CREDIT_MARKUP; default 5.00), which becomes the price in the database",
    )
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("create-admin", help="create or update the super-admin (idempotent)")
    p.add_argument("--email", default=None, help="default: KEEN_ADMIN_EMAIL")
    p.set_defaults(func=cmd_create_admin)

    hub_cli.register(sub)
    ledger_cli.register(sub)
    accounts_cli.register(sub)
    demo.register(sub)
    backup_cli.register(sub)
    analytics_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, settings: Settings | None = None) -> int:
    args = build_parser().parse_args(argv)
    if settings is None:
        try:
            settings = get_settings()
        except ValidationError as exc:
            print(f"keen-stream: invalid settings: {settings_problems(exc)}", file=sys.stderr)
            return EXIT_ERROR
    logs.configure(logging.INFO if args.verbose else logging.WARNING, settings.log_format)
    # Diagnostics: KEEN_DEBUG_LOGGERS=keen_stream.hub.connection,... logs those at DEBUG.
    for name in filter(
        None, (n.strip() for n in os.environ.get("KEEN_DEBUG_LOGGERS", "").split(","))
    ):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        return int(args.func(args, settings))
    except NotFound as exc:
        print(f"keen-stream: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except KeenError as exc:
        print(f"keen-stream: {exc}", file=sys.stderr)
        return EXIT_ERROR
