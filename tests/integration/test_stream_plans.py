"""A tail read costs the same whatever the size of the outbox (migration 0006).

The listener reads the outbox hundreds of times a second, on a long-lived connection where
PL/pgSQL switches to cached generic plans. 0004's position check got a generic plan that read
the whole table whenever nothing waited; with 20,000 events that was thousands of buffers per
read (and each read grew with the retention window). Here the same read, with generic plans
forced and with custom plans, must touch a handful of buffers, whether committed rows wait
behind an open transaction or not.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.events import SQL, StreamReader
from keen_stream.dal.models.events import Cursor

EVENTS = 20_000
#: A read walks the primary key near its ends: a few pages. The table has over 200.
MAX_BUFFERS = 100

INSERT_EVENT = (
    "INSERT INTO stream_events (user_id, event_type, payload)"
    " VALUES ($1, 'session.progress', '{}'::jsonb) RETURNING xid, id"
)


async def fill(owner: asyncpg.Connection) -> None:
    await owner.execute(
        """INSERT INTO stream_events (user_id, event_type, payload)
           SELECT gen_random_uuid(), 'session.progress', jsonb_build_object('n', g)
             FROM generate_series(1, $1) g""",
        EVENTS,
    )
    await owner.execute("VACUUM (ANALYZE) stream_events")
    assert await owner.fetchval("SELECT pg_relation_size('stream_events') / 8192") > 2 * MAX_BUFFERS


def buffers(plan: dict[str, Any]) -> int:
    return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])


async def tail_cost(reader: asyncpg.Connection, after: Cursor) -> tuple[int, bool]:
    """Buffers one tail read touches (the position function included), and its pending flag."""
    text = await reader.fetchval(
        f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {SQL['tail']}", after.xid, after.id, 1000
    )
    [doc] = json.loads(text)
    batch = await StreamReader(reader, 10.0).read(after, 1000)
    return buffers(doc["Plan"]), batch.pending


@pytest.mark.parametrize("plans", ["force_generic_plan", "force_custom_plan"])
async def test_a_tail_read_does_not_scan_the_outbox(
    db: KeenDatabase, owner_conn: asyncpg.Connection, fresh_dsn: str, plans: str
) -> None:
    await fill(owner_conn)
    # A raw connection as the listener's role (EXPLAIN and plan settings on it).
    reader = await asyncpg.connect(fresh_dsn)
    try:
        await reader.execute("SET ROLE keen_system")
        await reader.execute(f"SET plan_cache_mode = {plans}")
        head = await reader.fetchrow(SQL["head"])
        at_head = Cursor(head["xid"], head["id"])
        for _ in range(6):  # past PL/pgSQL's five custom plans, in case the mode is "auto"
            cost, pending = await tail_cost(reader, at_head)
        assert not pending
        assert cost <= MAX_BUFFERS, f"{cost} buffers for a read with nothing to deliver"

        # An open transaction holds an early event; a later one commits: rows now wait.
        holder = await asyncpg.connect(fresh_dsn)
        try:
            await holder.execute("BEGIN")
            await holder.fetchrow(INSERT_EVENT, uuid.uuid4())
            await owner_conn.fetchrow(INSERT_EVENT, uuid.uuid4())
            cost, pending = await tail_cost(reader, at_head)
            assert pending
            assert cost <= MAX_BUFFERS, f"{cost} buffers for a read with rows waiting"
            batch = await StreamReader(reader, 10.0).read(at_head, 1000)
            assert batch.events == []  # the committed row waits for the older transaction
        finally:
            await holder.execute("ROLLBACK")
            await holder.close()
        batch = await StreamReader(reader, 10.0).read(at_head, 1000)
        assert len(batch.events) == 1 and not batch.pending
    finally:
        await reader.close()
