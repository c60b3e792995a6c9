"""The current schema as plain SQL: ``keen_stream/sql/*.sql``, applied in :data:`SQL_FILES` order.

The ``.sql`` files are where a reader learns what the database does now: every table, index,
constraint, function, trigger, policy, view and grant, grouped by area, top to bottom. The
Alembic migrations stay the history and the way a deployment upgrades (``keen-stream migrate``).
``tests/integration/test_schema_files.py`` builds one database from each and fails until their
catalogs agree, so a schema change is an edit of the ``.sql`` file and a new migration.
"""

from __future__ import annotations

from importlib import resources

import asyncpg

#: Applied in this order: each file may use what the files before it define. The sessions come
#: before the ledger because credit rows and holds reference agent_sessions.
SQL_FILES = (
    "foundation.sql",
    "sessions.sql",
    "ledger.sql",
    "events.sql",
    "analytics.sql",
    "tickets.sql",
)


def sql_text(name: str) -> str:
    """The text of ``keen_stream/sql/<name>``."""
    return (resources.files("keen_stream") / "sql" / name).read_text(encoding="utf-8")


async def apply_schema(conn: asyncpg.Connection) -> None:
    """Create the whole schema in the (empty) database ``conn`` is connected to, in one
    transaction. Roles are created if missing (they are cluster-wide).

    A failing statement's error gets a note naming the file and, when PostgreSQL reports a
    position, the line.
    """
    async with conn.transaction():
        for name in SQL_FILES:
            text = sql_text(name)
            try:
                # No arguments: the simple query protocol, which runs a whole script.
                await conn.execute(text)
            except asyncpg.PostgresError as exc:
                where = f"keen_stream/sql/{name}"
                position = getattr(exc, "position", None)
                if position:
                    where += f", line {text.count(chr(10), 0, int(position) - 1) + 1}"
                exc.add_note(f"while applying {where}")
                raise
