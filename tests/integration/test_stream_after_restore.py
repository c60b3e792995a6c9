"""The stream after the documented backup path: ``pg_dump -Fc`` restored on a new cluster.

``stream_events.xid`` used to be a transaction id of the *old* cluster (``pg_current_xact_id()``),
while the new cluster counts its transaction ids from where its ``initdb`` left them: on a new
cluster every new event's xid was far below the restored ones and below the restored retention
watermark, and the hub delivered nothing new. Since 0009 the column holds a position (xid plus
an offset the new cluster raises; docs/architecture.md, "Positions across clusters"). This test
needs the source cluster's ids ahead of a new one's and skips otherwise;
tests/integration/test_backup.py pushes a private source cluster's ids ahead
(``pg_resetwal -e``) so its drills always run.
"""

from __future__ import annotations

import asyncio
import subprocess
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.migrate import upgrade_async
from tests.conftest import _database_grants, make_settings
from tests.integration.hubkit import open_client, running_hub, stream_token
from tests.integration.test_hub_stream import new_session, step
from tests.pgcluster import OwnedPostgres


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{command[0]} failed: {result.stdout}{result.stderr}")


async def _restore(source_dsn: str, target: OwnedPostgres, dump: Path) -> str:
    """The documented full restore: roles first (here: by migrating a scratch database, which
    runs the ROLES statements), then ``pg_restore --create``."""
    admin = await asyncpg.connect(target.dsn("postgres"))
    try:
        login = await asyncpg.connect(source_dsn)
        try:
            owner = await login.fetchval("SELECT current_user")
        finally:
            await login.close()
        if owner != "postgres":
            await admin.execute(f'CREATE ROLE "{owner}" SUPERUSER LOGIN')
        await admin.execute("CREATE DATABASE roles_only")
    finally:
        await admin.close()
    await upgrade_async(target.dsn("roles_only"))
    _run("pg_dump", "-Fc", "-f", str(dump), source_dsn)
    database = source_dsn.rsplit("/", 1)[1]
    _run("pg_restore", "--create", "-d", target.dsn("postgres"), str(dump))
    restored = target.dsn(database)
    conn = await asyncpg.connect(restored)
    try:
        for statement in _database_grants():  # as --create restores them; idempotent
            await conn.execute(statement)
    finally:
        await conn.close()
    return restored


async def test_live_events_reach_subscribers_after_a_restore_on_a_new_cluster(
    db: KeenDatabase, fresh_dsn: str, alice: User, owned_pg: OwnedPostgres, tmp_path: Path
) -> None:
    await new_session(db, alice, "s")
    for _ in range(3):
        await step(db, alice, "s", 1)
    # Retention runs every few minutes in production: the watermark is set.
    assert await db.events.prune(timedelta(0)) > 0
    source_xid = await db.system_call("SELECT pg_current_xact_id()::text::bigint AS x")
    restored = await _restore(fresh_dsn, owned_pg, tmp_path / "keen.dump")
    target = await asyncpg.connect(restored)
    try:
        target_xid = await target.fetchval("SELECT pg_current_xact_id()::text::bigint")
    finally:
        await target.close()
    if target_xid >= source_xid[0]["x"]:
        pytest.skip("the source cluster's transaction ids are not ahead of a new cluster's")

    new_db = await KeenDatabase.connect(settings=make_settings(restored), migrate=False)
    try:
        token = await stream_token(new_db, alice.id)
        async with running_hub(restored) as hub:
            c = await open_client(hub.url, token)
            await c.subscribe()
            await step(new_db, alice, "s", 1)
            events = await c.events(1, within=5)  # TimeoutError on the current code
            assert events[0]["data"]["iteration_count"] == 4
            await c.close()
    finally:
        await new_db.close()
        await asyncio.sleep(0)
