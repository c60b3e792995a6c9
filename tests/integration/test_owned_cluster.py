"""The private-server fixture works: a test can crash and restart its own PostgreSQL."""

from __future__ import annotations

import asyncpg

from tests.pgcluster import OwnedPostgres


async def test_an_owned_server_survives_an_immediate_restart_with_its_data(
    owned_pg: OwnedPostgres, owned_dsn: str
) -> None:
    conn = await asyncpg.connect(owned_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await conn.close()
    owned_pg.restart("immediate")
    conn = await asyncpg.connect(owned_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('public.users') IS NOT NULL")
    finally:
        await conn.close()
