"""``keen-stream users ...`` and ``keen-stream tokens ...``: accounts and tokens, for operators.

Everything but ``users create`` acts as an admin (``--admin-email``, default KEEN_ADMIN_EMAIL,
made by ``keen-stream create-admin``) through the data layer, under the same row-level security
and database checks as any admin tool: the command line has no back door. ``users create`` is a
registration, which the DAL runs in its system context as it does for a sign-up.

A USER argument is a user id (UUID) or an email. ``--json`` prints stable keys for scripts
(UUIDs, times and money as strings); without it, tables for people. Exit codes: clikit.
Picked up by ``keen_stream.cli`` through :func:`register`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from keen_stream.clikit import print_json, print_table, prompt_password, run_with_database
from keen_stream.dal.models.users import USERNAME_PATTERN
from keen_stream.dal.validation import parse_uuid
from keen_stream.errors import InvalidIdentifier, InvalidInput, NotFound
from keen_stream.settings import Settings

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase
    from keen_stream.dal.models.users import AuthToken, User

USER_FIELDS = (
    "id",
    "email",
    "username",
    "display_name",
    "role",
    "is_admin",
    "account_status",
    "email_verified",
    "created_at",
    "last_login_at",
)
TOKEN_FIELDS = (
    "id",
    "user_id",
    "token_type",
    "token_name",
    "scopes",
    "is_active",
    "expires_at",
    "revoked_at",
    "last_used_at",
    "usage_count",
    "created_at",
)
T = TypeVar("T")

BALANCE_FIELDS = ("current", "held", "available", "lifetime_purchased", "lifetime_spent")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="machine-readable output")
    common = argparse.ArgumentParser(add_help=False, parents=[output])
    common.add_argument(
        "--admin-email", default=None, help="the admin to act as (default: KEEN_ADMIN_EMAIL)"
    )

    users = sub.add_parser("users", help="create, list, show, suspend and activate users")
    commands = users.add_subparsers(dest="users_command", required=True)
    p = commands.add_parser(
        "create",
        parents=[output],
        help="register a user (and their empty credit account)",
        description="The password is asked for on the terminal (twice), or read from the first"
        " line of stdin with --password-stdin; never from the command line, where it would land"
        " in the shell history and in every process listing.",
    )
    p.add_argument("email")
    p.add_argument("--username", default=None, help="default: the part of the email before @")
    p.add_argument("--display-name", default=None)
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=cmd_users_create)

    p = commands.add_parser("list", parents=[common], help="users, oldest first")
    p.add_argument(
        "--status", default=None, help="only active, suspended, deactivated or pending_verification"
    )
    p.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    p.set_defaults(func=cmd_users_list)

    p = commands.add_parser("show", parents=[common], help="one user, with their credit balance")
    p.add_argument("user", help="user id or email")
    p.set_defaults(func=cmd_users_show)

    for name, status, text in (
        ("suspend", "suspended", "suspend a user: their tokens stop working, open streams close"),
        ("activate", "active", "make a user active again: tokens not revoked work again"),
    ):
        p = commands.add_parser(name, parents=[common], help=text)
        p.add_argument("user", help="user id or email")
        p.set_defaults(func=cmd_users_set_status, status=status)

    tokens = sub.add_parser("tokens", help="issue, list and revoke a user's auth tokens")
    commands = tokens.add_subparsers(dest="tokens_command", required=True)
    p = commands.add_parser(
        "issue",
        parents=[common],
        help="issue a token; its plaintext is printed once, on stdout, and never again",
    )
    p.add_argument("user", help="user id or email")
    p.add_argument(
        "--type",
        dest="token_type",
        default="api_key",
        choices=("api_key", "session", "jwt_refresh"),
        help="default api_key",
    )
    p.add_argument("--name", default=None, help="a label, e.g. where it is used")
    p.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        default=None,
        help="repeatable; default: stream (what the hub asks for)",
    )
    p.add_argument(
        "--expires-in-days",
        type=float,
        default=None,
        help="default: per type (api_key never, session 1, jwt_refresh 30)",
    )
    p.set_defaults(func=cmd_tokens_issue)

    p = commands.add_parser("list", parents=[common], help="a user's usable tokens, newest first")
    p.add_argument("user", help="user id or email")
    p.add_argument("--all", action="store_true", help="revoked and expired ones too")
    p.set_defaults(func=cmd_tokens_list)

    p = commands.add_parser(
        "revoke", parents=[common], help="revoke a token (idempotent); open streams on it close"
    )
    p.add_argument("user", help="user id or email")
    p.add_argument("token_id")
    p.set_defaults(func=cmd_tokens_revoke)


# --- output --------------------------------------------------------------------------------
def user_json(user: User) -> dict[str, Any]:
    data = user.model_dump(mode="json")
    return {key: data[key] for key in USER_FIELDS}


def token_json(token: AuthToken) -> dict[str, Any]:
    data = token.model_dump(mode="json")
    return {key: data[key] for key in TOKEN_FIELDS}


def _when(value: Any) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%d %H:%M:%S%z")


def _print_users(users: list[User]) -> None:
    print_table(
        ("ID", "EMAIL", "USERNAME", "ROLE", "STATUS", "CREATED"),
        [(u.id, u.email, u.username, u.role, u.account_status, _when(u.created_at)) for u in users],
    )


def _print_tokens(tokens: list[AuthToken]) -> None:
    print_table(
        ("ID", "TYPE", "NAME", "SCOPES", "ACTIVE", "EXPIRES", "LAST USED", "USES"),
        [
            (
                t.id,
                t.token_type,
                t.token_name,
                ",".join(t.scopes),
                "yes" if t.is_active else "no",
                _when(t.expires_at) or "never",
                _when(t.last_used_at),
                t.usage_count,
            )
            for t in tokens
        ],
    )


# --- helpers -------------------------------------------------------------------------------
async def _admin(db: KeenDatabase, args: argparse.Namespace) -> User:
    return await db.users.admin_by_email(args.admin_email or db.settings.admin_email)


async def _find(db: KeenDatabase, user: str, admin: User) -> User:
    """USER on the command line: an email if it has an @, else a user id."""
    try:
        if "@" in user:
            return await db.users.get_by_email(user, actor_id=admin.id)
        return await db.users.get(parse_uuid(user, "user"), actor_id=admin.id)
    except InvalidIdentifier:
        raise InvalidIdentifier(f"{user!r} is neither an email nor a user id (UUID)") from None
    except NotFound:
        raise NotFound(f"no user {user}") from None


def _on_user(
    settings: Settings,
    args: argparse.Namespace,
    action: Callable[[KeenDatabase, User, User], Awaitable[T]],
) -> T:
    """Run ``action(db, user, admin)`` for the USER argument, acting as the admin."""

    async def run(db: KeenDatabase) -> T:
        admin = await _admin(db, args)
        return await action(db, await _find(db, args.user, admin), admin)

    return run_with_database(settings, run)


def _password(from_stdin: bool) -> str:
    if from_stdin:
        # One line; the newline a pipe or here-string adds is not part of the password.
        return sys.stdin.readline().rstrip("\r\n")
    return prompt_password("Password", otherwise="pass --password-stdin")


# --- users ---------------------------------------------------------------------------------
def cmd_users_create(args: argparse.Namespace, settings: Settings) -> int:
    username = args.username or args.email.partition("@")[0]
    if args.username is None and not re.fullmatch(USERNAME_PATTERN, username):
        raise InvalidInput(
            f"{username!r}, the email's part before @, is not a valid username (3 to 64 letters,"
            " digits, _ . -): pass --username"
        )
    password = _password(args.password_stdin)

    async def create(db: KeenDatabase) -> User:
        return await db.users.create(
            email=args.email,
            username=username,
            password=password,
            display_name=args.display_name,
        )

    user = run_with_database(settings, create)
    if args.json:
        print_json(user_json(user))
    else:
        print(f"created user {user.email} ({user.id}), username {user.username}")
    return 0


def cmd_users_list(args: argparse.Namespace, settings: Settings) -> int:
    async def list_users(db: KeenDatabase) -> list[User]:
        admin = await _admin(db, args)
        return await db.users.list(actor_id=admin.id, status=args.status, limit=args.limit)

    users = run_with_database(settings, list_users)
    if args.json:
        print_json([user_json(u) for u in users])
    else:
        _print_users(users)
    return 0


def cmd_users_show(args: argparse.Namespace, settings: Settings) -> int:
    async def show(db: KeenDatabase, user: User, admin: User) -> dict[str, Any]:
        balance = await db.credits.get_balance(user.id, actor_id=admin.id)
        tokens = await db.tokens.list(user.id, actor_id=admin.id)
        money = balance.model_dump(mode="json")
        return {
            **user_json(user),
            "credits": {key: money[key] for key in BALANCE_FIELDS},
            "active_tokens": len(tokens),
        }

    shown = _on_user(settings, args, show)
    if args.json:
        print_json(shown)
        return 0
    credits = shown.pop("credits")
    width = max(map(len, shown))
    for key, value in shown.items():
        print(f"{key.ljust(width)}  {'-' if value is None else value}")
    print("credits".ljust(width) + "  " + ", ".join(f"{k} {v}" for k, v in credits.items()))
    return 0


def cmd_users_set_status(args: argparse.Namespace, settings: Settings) -> int:
    async def set_status(db: KeenDatabase, user: User, admin: User) -> User:
        return await db.users.set_account_status(user.id, args.status, actor_id=admin.id)

    user = _on_user(settings, args, set_status)
    if args.json:
        print_json(user_json(user))
    else:
        print(f"user {user.email} ({user.id}) is {user.account_status}")
    return 0


# --- tokens --------------------------------------------------------------------------------
def cmd_tokens_issue(args: argparse.Namespace, settings: Settings) -> int:
    days = args.expires_in_days
    if days is not None and not 0 < days <= 3650:
        raise InvalidInput("--expires-in-days must be more than 0 and at most 3650")
    extra: dict[str, Any] = {} if days is None else {"expires_in": timedelta(days=days)}

    async def issue(db: KeenDatabase, user: User, admin: User) -> tuple[str, AuthToken]:
        issued = await db.tokens.issue(
            user.id,
            args.token_type,
            name=args.name,
            scopes=args.scopes or ["stream"],
            actor_id=admin.id,
            **extra,
        )
        return issued.token.get_secret_value(), issued.record

    token, record = _on_user(settings, args, issue)
    if args.json:
        print_json({"token": token, **token_json(record)})
        return 0
    # The token alone on stdout (TOKEN=$(keen-stream tokens issue ...)); the rest for people.
    print(
        f"issued {record.token_type} {record.id} for user {record.user_id}, scopes "
        f"{','.join(record.scopes)}, expires {_when(record.expires_at) or 'never'}; "
        "the token below is shown only this once:",
        file=sys.stderr,
    )
    print(token)
    return 0


def cmd_tokens_list(args: argparse.Namespace, settings: Settings) -> int:
    async def list_tokens(db: KeenDatabase, user: User, admin: User) -> list[AuthToken]:
        return await db.tokens.list(user.id, include_inactive=args.all, actor_id=admin.id)

    tokens = _on_user(settings, args, list_tokens)
    if args.json:
        print_json([token_json(t) for t in tokens])
    else:
        _print_tokens(tokens)
    return 0


def cmd_tokens_revoke(args: argparse.Namespace, settings: Settings) -> int:
    async def revoke(db: KeenDatabase, user: User, admin: User) -> AuthToken:
        return await db.tokens.revoke(user.id, args.token_id, actor_id=admin.id)

    token = _on_user(settings, args, revoke)
    if args.json:
        print_json(token_json(token))
    else:
        print(f"token {token.id} of user {token.user_id} is revoked")
    return 0
