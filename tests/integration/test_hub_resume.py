"""Resume with ``since`` when things go wrong: a fresh node, an outage before or during a replay.

The rule (docs/protocol.md): a client is told ``recovered: true`` only when every event after
``since`` that it is entitled to will reach it, and a subscription that failed is not
installed. Whatever happens, the cursor of the last event a client received stays a safe
resume point: nothing after a gap is ever sent before the gap is filled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.models.events import ORIGIN, Cursor
from tests.conftest import PASSWORD, make_settings
from tests.integration.hubkit import Hub, WsClient, open_client, running_hub, stream_token, wait_for
from tests.integration.test_hub_stream import new_session, step
from tests.pgcluster import OwnedPostgres


def cursor_of(frame: dict[str, Any]) -> Cursor:
    return Cursor.parse(frame["cursor"])


async def iterations_after(client: WsClient, count: int, within: float = 20.0) -> list[int]:
    return [e["data"]["iteration_count"] for e in await client.events(count, within)]


async def test_a_fresh_node_replays_what_was_written_while_no_node_ran(
    db: KeenDatabase, fresh_dsn: str, alice: User
) -> None:
    await new_session(db, alice, "s")
    token = await stream_token(db, alice.id)
    async with running_hub(fresh_dsn) as hub:
        c = await open_client(hub.url, token)
        await c.subscribe()
        await step(db, alice, "s", 1)
        last = (await c.events(1))[0]["cursor"]
        await c.close()
    # The only node is gone (a deploy); events are written meanwhile.
    for n in (10, 100, 1000):
        await step(db, alice, "s", n)
    head = await db.events.head()
    async with running_hub(fresh_dsn) as fresh:
        c = await open_client(fresh.url, token)
        # A new node knows where the stream is before it publishes anything.
        assert Cursor.parse(c.ready["cursor"]) == head
        await c.send({"type": "ping", "id": 1})
        assert Cursor.parse((await c.expect("pong"))["cursor"]) == head
        sub = await c.subscribe(since=last)
        assert sub["recovered"] is True
        assert await iterations_after(c, 3) == [11, 111, 1111]
        await step(db, alice, "s", 1)
        assert await iterations_after(c, 1) == [1112]
        await c.no_event(0.3)
        await c.close()


# --- outages: a PostgreSQL the test owns --------------------------------------------------------
async def bulk_progress(dsn: str, handle: str, count: int) -> None:
    """``count`` progress events for one session, written in one transaction outside the DAL."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"""DO $$ BEGIN FOR i IN 1..{int(count)} LOOP
                    UPDATE agent_sessions SET iteration_count = iteration_count + 1
                     WHERE session_id = '{handle}';
                END LOOP; END $$"""
        )
    finally:
        await conn.close()


ReplayHook = Callable[[int], Awaitable[None]]


def hook_replay(hub: Hub, monkeypatch: pytest.MonkeyPatch, before_call: ReplayHook) -> None:
    """Run ``before_call(n)`` before the hub's n-th replay read (1-based): the fault goes in
    exactly there. The read itself is the real one, against the real (maybe stopped) server."""
    events = hub.service.db.events
    real = events.replay
    calls = 0

    async def replay(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        await before_call(calls)
        return await real(*args, **kwargs)

    monkeypatch.setattr(events, "replay", replay)


async def write_and_publish(hub: Hub, db: KeenDatabase, user: User, steps: int) -> None:
    """``steps`` progress reports, returning once the hub has published them."""
    target = hub.service.stats.events_received + steps
    for _ in range(steps):
        await step(db, user, "s", 1)
    await wait_for(lambda: hub.service.stats.events_received >= target, f"{steps} published")


async def outage_db(owned_dsn: str) -> tuple[KeenDatabase, User]:
    db = await KeenDatabase.connect(settings=make_settings(owned_dsn), migrate=False)
    alice = await db.users.create(email="alice@example.com", username="alice", password=PASSWORD)
    await new_session(db, alice, "s")
    return db, alice


async def test_a_resume_interrupted_by_an_outage_leaves_no_gap(
    owned_pg: OwnedPostgres, owned_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, alice = await outage_db(owned_dsn)
    try:
        token = await stream_token(db, alice.id)
        since = await db.events.head()
        await bulk_progress(owned_dsn, "s", 2500)  # three pages of replay
        async with running_hub(owned_dsn) as hub:
            c = await open_client(hub.url, token)

            async def fault(call: int) -> None:
                if call == 2:
                    # Live events while the replay runs (held for after it)...
                    await write_and_publish(hub, db, alice, 3)
                    # ...then the database goes away before the second page is read.
                    owned_pg.stop("fast")

            hook_replay(hub, monkeypatch, fault)
            sub = await c.subscribe(since=str(since))
            assert sub["recovered"] is True
            first = await iterations_after(c, 1000)
            assert first == list(range(1, 1001))
            error = await c.expect("error")
            assert error["code"] == "unavailable"
            # Nothing beyond the gap may follow: the held live events are not sent.
            await c.no_event(0.5)

            owned_pg.start()
            monkeypatch.undo()
            await wait_for(lambda: hub.service.listener.connected, "listener back", 30)
            last = [f for f in c.received if f["type"] == "event"][-1]
            assert last["data"]["iteration_count"] == 1000
            again = await c.subscribe(since=last["cursor"])
            assert again["recovered"] is True
            rest = await iterations_after(c, 1503)
            assert rest == list(range(1001, 2504))
            await c.no_event(0.3)
            await c.close()
    finally:
        await db.close()


async def test_a_subscribe_that_fails_while_the_database_is_down_installs_nothing(
    owned_pg: OwnedPostgres, owned_dsn: str
) -> None:
    db, alice = await outage_db(owned_dsn)
    try:
        token = await stream_token(db, alice.id)
        since = await db.events.head()
        async with running_hub(owned_dsn) as hub:
            await write_and_publish(hub, db, alice, 1)  # so the resume has something to read
            c = await open_client(hub.url, token)
            owned_pg.stop("fast")
            await c.send({"type": "subscribe", "id": "r1", "since": str(since)})
            error = await c.expect("error")
            assert error["code"] == "unavailable" and error["id"] == "r1"
            owned_pg.start()
            await wait_for(lambda: hub.service.listener.connected, "listener back", 30)
            await write_and_publish(hub, db, alice, 1)
            await c.no_event(0.5)  # the failed subscription was not installed
            sub = await c.subscribe(since=str(since))
            assert sub["recovered"] is True
            assert await iterations_after(c, 2) == [1, 2]
            await c.close()
    finally:
        await db.close()


async def test_a_resume_that_fails_before_replaying_keeps_the_previous_subscription_whole(
    owned_pg: OwnedPostgres, owned_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db, alice = await outage_db(owned_dsn)
    try:
        token = await stream_token(db, alice.id)
        async with running_hub(owned_dsn) as hub:
            c = await open_client(hub.url, token)
            await c.subscribe()  # live, scope mine

            async def fault(call: int) -> None:
                if call == 1:
                    await write_and_publish(hub, db, alice, 2)
                    owned_pg.stop("fast")

            hook_replay(hub, monkeypatch, fault)
            await c.send({"type": "subscribe", "id": "r2", "since": str(ORIGIN)})
            error = await c.expect("error")
            assert error["code"] == "unavailable"
            # The events that arrived while the resume was being tried belong to the previous
            # subscription, which is unchanged: they are delivered, not dropped.
            delivered = [f for f in c.received if f["type"] == "event"]
            delivered += await c.events(2 - len(delivered), within=5)
            assert [e["data"]["iteration_count"] for e in delivered] == [1, 2]
            owned_pg.start()
            monkeypatch.undo()
            await wait_for(lambda: hub.service.listener.connected, "listener back", 30)
            await step(db, alice, "s", 1)
            assert await iterations_after(c, 1) == [3]
            await c.close()
    finally:
        await db.close()
