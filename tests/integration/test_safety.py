"""The DAL refuses tenant work when RLS could be bypassed."""

from __future__ import annotations

import os

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.errors import DatabaseUnavailable, UnsafeRoleError


async def test_unforced_tenant_table_stops_startup(
    settings, owner_conn: asyncpg.Connection
) -> None:
    await owner_conn.execute("ALTER TABLE agent_sessions NO FORCE ROW LEVEL SECURITY")
    with pytest.raises(UnsafeRoleError, match="agent_sessions"):
        await KeenDatabase.connect(settings=settings, migrate=False)


async def test_a_role_that_can_bypass_rls_is_refused(db: KeenDatabase, pg_admin_dsn: str) -> None:
    role = f"keen_probe_{os.getpid()}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f"CREATE ROLE {role} NOLOGIN BYPASSRLS")
        with pytest.raises(UnsafeRoleError, match="BYPASSRLS"):
            await db.check_role_safety(role)
        await admin.execute(f"ALTER ROLE {role} NOBYPASSRLS SUPERUSER")
        with pytest.raises(UnsafeRoleError, match="superuser"):
            await db.check_role_safety(role)
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
    with pytest.raises(UnsafeRoleError, match="does not exist"):
        await db.check_role_safety(role)
    await db.check_role_safety()  # keen_app itself is fine


async def test_unmigrated_database_is_refused(pg_admin_dsn: str, settings) -> None:
    from keen_stream.settings import with_database
    from tests.conftest import make_settings

    name = f"keen_empty_{os.getpid()}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = with_database(pg_admin_dsn, name)
        with pytest.raises(UnsafeRoleError, match="run migrations"):
            # keen_app exists cluster-wide, but this database has no tenant tables at all
            db = await KeenDatabase.connect(settings=make_settings(dsn), migrate=False)
            await db.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_unreachable_database_is_a_typed_error() -> None:
    from tests.conftest import make_settings

    settings = make_settings("postgresql://nobody@127.0.0.1:1/none", connect_timeout=2)
    with pytest.raises(DatabaseUnavailable):
        await KeenDatabase.connect(settings=settings, migrate=False)


async def test_health_reports_the_server(db: KeenDatabase) -> None:
    health = await db.health()
    assert health["ok"] is True
    assert int(str(health["server_version"]).split(".")[0]) >= 15
