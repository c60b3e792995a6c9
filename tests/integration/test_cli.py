"""`keen-stream migrate` and `keen-stream create-admin`, run in-process."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from keen_stream import cli
from keen_stream.dal.database import KeenDatabase
from tests.conftest import make_settings

ADMIN_EMAIL = "ahiya.butman@gmail.com"


async def _run(*argv: str, settings) -> int:
    # cli.main runs its own event loop, so it gets a thread of its own.
    return await asyncio.to_thread(cli.main, list(argv), settings=settings)


async def test_create_admin_is_idempotent_and_takes_the_password_from_settings(
    fresh_dsn: str, owner_conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(fresh_dsn, admin_password="first-secret-password")
    assert await _run("create-admin", settings=settings) == 0
    first = await owner_conn.fetchrow("SELECT * FROM users WHERE email = $1", ADMIN_EMAIL)
    assert (first["role"], first["is_admin"], first["email_verified"], first["account_status"]) == (
        "super_admin",
        True,
        True,
        "active",
    )
    assert first["username"] == "ahiya_admin"
    assert first["admin_privileges"]["unlimited_credits"] is True
    assert len(first["admin_privileges"]) == 8
    account = await owner_conn.fetchrow(
        "SELECT * FROM credit_accounts WHERE user_id = $1", first["id"]
    )
    assert account["unlimited_credits"] and account["bypass_billing"]
    assert account["current_balance"] == 0  # no fake display balance

    # again, with a new password: same row, one account, the new password works
    settings2 = make_settings(fresh_dsn, admin_password="second-secret-password")
    assert await _run("create-admin", settings=settings2) == 0
    assert await owner_conn.fetchval("SELECT count(*) FROM users") == 1
    assert await owner_conn.fetchval("SELECT count(*) FROM credit_accounts") == 1
    second = await owner_conn.fetchrow("SELECT * FROM users WHERE email = $1", ADMIN_EMAIL)
    assert second["id"] == first["id"]
    db = await KeenDatabase.connect(settings=settings2, migrate=False)
    try:
        user = await db.users.authenticate(ADMIN_EMAIL, "second-secret-password")
        assert user.is_admin
    finally:
        await db.close()
    assert "super_admin" in capsys.readouterr().out


async def test_create_admin_without_a_password_refuses(
    fresh_dsn: str, owner_conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _run("create-admin", settings=make_settings(fresh_dsn)) == 2
    assert "KEEN_ADMIN_PASSWORD" in capsys.readouterr().err
    assert await owner_conn.fetchval("SELECT count(*) FROM users") == 0


async def test_create_admin_refuses_a_weak_password(
    fresh_dsn: str, owner_conn: asyncpg.Connection
) -> None:
    assert (
        await _run("create-admin", settings=make_settings(fresh_dsn, admin_password="short")) == 2
    )
    assert await owner_conn.fetchval("SELECT count(*) FROM users") == 0


async def test_migrate_command_is_a_no_op_on_a_migrated_database(
    fresh_dsn: str, owner_conn: asyncpg.Connection
) -> None:
    before = await owner_conn.fetchval("SELECT version_num FROM alembic_version")
    assert await _run("migrate", settings=make_settings(fresh_dsn)) == 0
    assert await owner_conn.fetchval("SELECT version_num FROM alembic_version") == before


async def test_migrate_on_an_unreachable_database_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # docs/operations.md, "Exit codes": the database unreachable is a one-line refusal (2), as
    # for every command, not the migration tool's traceback.
    dsn = "postgresql://keen:s3cret@127.0.0.1:1/keen"
    assert await _run("migrate", settings=make_settings(dsn)) == 2
    err = capsys.readouterr().err
    assert err.startswith("keen-stream: ") and err.count("\n") == 1, err
    assert "Connection refused" in err or "Connect call failed" in err, err
    assert "s3cret" not in err


async def test_an_admin_sets_the_markup_from_the_command_line(
    fresh_dsn: str, owner_conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(fresh_dsn, admin_password="first-secret-password")
    assert await _run("create-admin", settings=settings) == 0
    assert (
        await _run("ledger", "set-markup", "4.25", "--reason", "new prices", settings=settings) == 0
    )
    assert await _run("ledger", "markup", settings=settings) == 0
    assert "markup: 4.25 credits" in capsys.readouterr().out
    audit = await owner_conn.fetchrow(
        "SELECT a.actor_user_id, u.email FROM audit_log a JOIN users u ON u.id = a.actor_user_id"
        " WHERE a.table_name = 'credit_pricing' AND a.action = 'UPDATE'"
    )
    assert audit["email"] == ADMIN_EMAIL


async def test_set_markup_refuses_an_unknown_or_ordinary_user(
    fresh_dsn: str, owner_conn: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(fresh_dsn)
    assert (
        await _run(
            "ledger",
            "set-markup",
            "1",
            "--reason",
            "x",
            "--admin-email",
            "nobody@example.com",
            settings=settings,
        )
        == 2
    )
    db = await KeenDatabase.connect(settings=settings, migrate=False)
    try:
        await db.users.create(
            email="plain@example.com", username="plain", password="a long enough password"
        )
    finally:
        await db.close()
    assert (
        await _run(
            "ledger",
            "set-markup",
            "1",
            "--reason",
            "x",
            "--admin-email",
            "plain@example.com",
            settings=settings,
        )
        == 2
    )
    assert "admin" in capsys.readouterr().err
    assert await owner_conn.fetchval("SELECT markup FROM credit_pricing") == 5
