"""Alembic: one head, idempotent upgrade, full downgrade, concurrent migrators."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from keen_stream import migrate
from keen_stream.dal.database import TENANT_TABLES


async def _schema(dsn: str) -> dict[str, object]:
    conn = await asyncpg.connect(dsn)
    try:
        tables = {
            r["relname"]
            for r in await conn.fetch(
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                "AND relkind IN ('r', 'm', 'v')"
            )
        }
        functions = {
            r["proname"]
            for r in await conn.fetch(
                "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
            )
        }
        version = None
        if "alembic_version" in tables:
            version = await conn.fetchval("SELECT version_num FROM alembic_version")
        policies = await conn.fetchval("SELECT count(*) FROM pg_policies")
        return {"tables": tables, "functions": functions, "version": version, "policies": policies}
    finally:
        await conn.close()


def test_there_is_exactly_one_head() -> None:
    assert len(migrate.heads()) == 1


async def test_upgrade_downgrade_upgrade_round_trip(empty_dsn: str) -> None:
    await migrate.upgrade_async(empty_dsn)
    first = await _schema(empty_dsn)
    assert first["version"] == migrate.heads()[0]
    assert set(TENANT_TABLES) <= first["tables"]  # type: ignore[operator]
    assert "admin_dashboard_metrics" in first["tables"]  # type: ignore[operator]

    await asyncio.to_thread(migrate.downgrade, empty_dsn, "base")
    empty = await _schema(empty_dsn)
    assert empty["tables"] == {"alembic_version"}
    assert empty["functions"] == set()
    assert empty["policies"] == 0
    assert empty["version"] is None

    await migrate.upgrade_async(empty_dsn)
    assert await _schema(empty_dsn) == first


async def test_second_upgrade_is_a_no_op(empty_dsn: str) -> None:
    await migrate.upgrade_async(empty_dsn)
    before = await _schema(empty_dsn)
    await migrate.upgrade_async(empty_dsn)
    assert await _schema(empty_dsn) == before


async def test_concurrent_migrators_do_not_collide(empty_dsn: str) -> None:
    """Three `keen-stream migrate` processes at once: without the advisory lock two would race
    on CREATE TABLE and fail."""
    env = {**os.environ, "KEEN_DATABASE_URL": empty_dsn}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "keen_stream",
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    results = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    schema = await _schema(empty_dsn)
    assert schema["version"] == migrate.heads()[0]


async def test_roles_are_safe_after_migration(empty_dsn: str) -> None:
    await migrate.upgrade_async(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        app = await conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = 'keen_app'")
        assert not app["rolsuper"] and not app["rolbypassrls"] and not app["rolcanlogin"]
        owned = await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relowner = 'keen_app'::regrole"
        )
        assert owned == 0
        system = await conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = 'keen_system'")
        assert system["rolbypassrls"] and not system["rolcanlogin"] and not system["rolsuper"]
        billing = await conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = 'keen_billing'")
        assert not (billing["rolbypassrls"] or billing["rolcanlogin"] or billing["rolsuper"])
        # 0007: no temporary objects for tenants (they would be searched first); the system
        # role keeps TEMP for the dashboard's concurrent refresh.
        temp = await conn.fetchrow(
            "SELECT has_database_privilege('keen_app', current_database(), 'TEMP') AS app,"
            "       has_database_privilege('keen_system', current_database(), 'TEMP') AS system"
        )
        assert (temp["app"], temp["system"]) == (False, True)
        # no SECURITY DEFINER function is left executable by PUBLIC
        public_definers = await conn.fetch(
            """SELECT p.proname FROM pg_proc p
                WHERE p.pronamespace = 'public'::regnamespace AND p.prosecdef
                  AND has_function_privilege('public', p.oid, 'EXECUTE')"""
        )
        assert public_definers == []
    finally:
        await conn.close()


async def test_a_downgrade_below_0009_refuses_moved_stream_positions(empty_dsn: str) -> None:
    """After a restore on another cluster the positions carry an offset; 0009's downgrade puts
    the column's default back to plain transaction ids, far below them, and the stream would
    deliver nothing new, silently. The downgrade refuses instead, and changes nothing."""
    await migrate.upgrade_async(empty_dsn)
    conn = await asyncpg.connect(empty_dsn)
    try:
        await conn.execute("UPDATE stream_state SET xid_offset = 4294967296")
        try:
            await asyncio.to_thread(migrate.downgrade, empty_dsn, "0008_session_handle")
        except Exception as exc:  # alembic passes the database's error through
            assert "stream positions" in str(exc)
        else:
            raise AssertionError("the downgrade went through")
        # Each migration commits on its own: the later ones went down, 0009 stayed whole.
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == (
            "0009_stream_epoch"
        )
        assert await conn.fetchval(
            "SELECT column_default FROM information_schema.columns"
            " WHERE table_name = 'stream_events' AND column_name = 'xid'"
        ) == ("keen_stream_next_position()")
    finally:
        await conn.close()
