"""Which time zones the database accepts, and what the spend windows then promise.

The DAL accepts IANA zone names only (``UserCreate`` / ``UserProfileUpdate``: ``ZoneInfo``).
``keen_app`` may UPDATE ``users.timezone`` itself, so the database's own check
(``keen_users_check_timezone``) must refuse what the DAL refuses. ``AT TIME ZONE`` accepts POSIX
specs too: ``'AAA0BBB-23,J335/1,J365/0'`` is UTC that jumps 23 hours ahead on 1 December at
01:00, and since the window rule adds "a day" in local time, across such a jump a new window
would end an hour after the previous one (docs/ledger.md: "windows are never closer together
than a day"). Since 0007 the check accepts only names in ``pg_timezone_names`` (KS400,
``InvalidInput``).
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
import pytest

from keen_stream import migrate
from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import InvalidInput

JUMPING = "AAA0BBB-23,J335/1,J365/0"


async def test_the_database_refuses_a_time_zone_the_dal_refuses(
    db: KeenDatabase, alice: User, owner_conn
) -> None:
    # What the rule gives in that zone: the window after one that ended at midnight UTC is
    # one hour long.
    end = await owner_conn.fetchval(
        "SELECT keen_spend_window_end('day', $1, $2, $3)",
        datetime.fromisoformat("2026-12-01T00:00Z"),
        JUMPING,
        datetime.fromisoformat("2026-12-01T00:30Z"),
    )
    assert end == datetime.fromisoformat("2026-12-01T01:00Z")
    with pytest.raises(InvalidInput):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute("UPDATE users SET timezone = $2 WHERE id = $1", alice.id, JUMPING)


async def test_zone_names_pass_and_rows_from_before_0007_that_are_not_one_become_utc(
    empty_dsn: str,
) -> None:
    await migrate.upgrade_async(empty_dsn, "0006_stream_latency")
    conn = await asyncpg.connect(empty_dsn)
    try:
        users = {}
        for name, zone in (("posix", JUMPING), ("named", "Pacific/Kiritimati"), ("utc", "UTC")):
            users[name] = await conn.fetchval(
                "INSERT INTO users (email, username, password_hash, timezone)"
                " VALUES ($1, $2, 'x', $3) RETURNING id",
                f"{name}@example.com",
                name,
                zone,
            )
        await migrate.upgrade_async(empty_dsn)
        zones = {r["id"]: r["timezone"] for r in await conn.fetch("SELECT id, timezone FROM users")}
        assert zones == {
            users["posix"]: "UTC",
            users["named"]: "Pacific/Kiritimati",
            users["utc"]: "UTC",
        }
        await conn.execute(
            "UPDATE users SET timezone = 'Asia/Jerusalem' WHERE id = $1", users["utc"]
        )
        with pytest.raises(asyncpg.PostgresError, match="unknown time zone"):
            await conn.execute(
                "UPDATE users SET timezone = $2 WHERE id = $1", users["utc"], JUMPING
            )
    finally:
        await conn.close()
