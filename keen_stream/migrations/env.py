"""Alembic environment: asyncpg underneath, one advisory lock around every run.

The DSN comes from ``config.attributes["dsn"]`` (set by ``keen_stream.migrate``), from
``-x dsn=...`` or from ``KEEN_DATABASE_URL``. The connection is made by asyncpg itself
(``async_creator``), so any DSN asyncpg accepts works, Unix sockets included.

Two migrators must not interleave: each takes a session-level advisory lock before Alembic reads
the version table, so the second one waits, then finds the database at head and does nothing.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg
from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

# Any fixed 64-bit number; keen_stream uses it only for migrations.
MIGRATION_LOCK_KEY = 7_246_815_530_011_001

config = context.config


def _dsn() -> str:
    dsn = config.attributes.get("dsn") or context.get_x_argument(as_dictionary=True).get("dsn")
    dsn = dsn or os.environ.get("KEEN_DATABASE_URL")
    if not dsn:
        raise RuntimeError("no database: set KEEN_DATABASE_URL or pass -x dsn=...")
    return str(dsn)


def _run(connection: Connection) -> None:
    connection.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
    connection.commit()
    try:
        context.configure(
            connection=connection, target_metadata=None, transaction_per_migration=True
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        connection.rollback()
        connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")
        connection.commit()


async def _run_async() -> None:
    dsn = _dsn()

    async def creator() -> asyncpg.Connection:
        return await asyncpg.connect(dsn)

    engine = create_async_engine("postgresql+asyncpg://", async_creator=creator, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported; run against a database")
asyncio.run(_run_async())
