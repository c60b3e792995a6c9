"""Migration 0008: the database names the caller's handle ``session_handle`` too."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from keen_stream import migrate
from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import NotFound


async def _session_event_keys(conn: asyncpg.Connection) -> list[set[str]]:
    rows = await conn.fetch(
        "SELECT payload FROM stream_events WHERE event_type LIKE 'session.%' ORDER BY xid, id"
    )
    return [set(json.loads(r["payload"])) for r in rows]


async def _new_session(conn: asyncpg.Connection, user: object, handle: str) -> None:
    await conn.execute(
        "INSERT INTO agent_sessions (user_id, session_id, git_branch, vision, working_directory)"
        " VALUES ($1, $2, 'main', 'v', '/w')",
        user,
        handle,
    )


async def test_events_before_and_after_the_upgrade_say_session_handle(empty_dsn: str) -> None:
    await migrate.upgrade_async(empty_dsn, "0007_guarantees")
    conn = await asyncpg.connect(empty_dsn)
    try:
        user = await conn.fetchval(
            "INSERT INTO users (email, username, password_hash)"
            " VALUES ('h@example.com', 'handles', 'x') RETURNING id"
        )
        await _new_session(conn, user, "before")
        assert ["session_key" in keys for keys in await _session_event_keys(conn)] == [True]

        await migrate.upgrade_async(empty_dsn, "0008_session_handle")
        await _new_session(conn, user, "after")
        events = await _session_event_keys(conn)
        assert [("session_handle" in k, "session_key" in k) for k in events] == [(True, False)] * 2
        assert (
            await conn.fetchval(
                "SELECT payload ->> 'session_handle' FROM stream_events ORDER BY xid, id LIMIT 1"
            )
            == "before"
        )

        await asyncio.to_thread(migrate.downgrade, empty_dsn, "0007_guarantees")
        events = await _session_event_keys(conn)
        assert [("session_key" in k, "session_handle" in k) for k in events] == [(True, False)] * 2
    finally:
        await conn.close()


async def test_an_unknown_parent_handle_is_named_as_the_caller_passed_it(
    db: KeenDatabase, alice: User
) -> None:
    with pytest.raises(NotFound) as raised:
        await db.sessions.create_session(
            alice.id,
            session_handle="orphan",
            vision="v",
            working_directory="/w",
            git_branch="main",
            parent_session_handle="no-such-parent",
        )
    assert raised.value.details["field"] == "parent_session_handle"
