"""Replies to a ``subscribe`` that the database could not serve (error ``unavailable``).

Found with the fault scenario (test_fault_scenario.py, fault 7); each test pins one behaviour on
one in-process hub whose private PostgreSQL the test stops.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models.events import Cursor
from tests.conftest import PASSWORD, make_settings
from tests.integration.hubkit import Hub, open_client, running_hub, stream_token, wait_for
from tests.pgcluster import OwnedPostgres, requires_owned_postgres

pytestmark = requires_owned_postgres

#: Short enough that a stopped database is reported in a moment, not after 10 s.
FAST_FAILURE = {"connect_timeout": 2.0, "pool_acquire_timeout": 2.0}


@asynccontextmanager
async def hub_with_user(dsn: str) -> AsyncIterator[tuple[KeenDatabase, Hub, uuid.UUID]]:
    db = await KeenDatabase.connect(settings=make_settings(dsn, **FAST_FAILURE), migrate=False)
    try:
        user = await db.users.create(
            email="outage@example.com", username="outage", password=PASSWORD
        )
        await db.sessions.create_session(
            user.id, session_handle="s1", vision="v", working_directory="/w", git_branch="main"
        )
        async with running_hub(dsn, **FAST_FAILURE) as hub:
            yield db, hub, user.id
    finally:
        await db.close()


async def progress(db: KeenDatabase, user_id: uuid.UUID) -> Cursor:
    """Report progress (one event), retrying while the database comes back; its cursor."""
    for _ in range(100):
        try:
            await db.sessions.update_progress(user_id, "s1", iterations=1)
        except Exception:  # the database is still starting
            await asyncio.sleep(0.1)
            continue
        return await db.events.head()
    raise AssertionError("the database did not come back")


async def frames_until(client: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` frames."""
    return [await client.recv(10) for _ in range(count)]


async def test_an_unavailable_reply_carries_the_id_of_the_subscribe_it_answers(
    owned_pg: OwnedPostgres, owned_dsn: str
) -> None:
    async with hub_with_user(owned_dsn) as (db, hub, user_id):
        since = await progress(db, user_id)
        missed = await progress(db, user_id)  # so the resume has to read the database
        client = await open_client(hub.url, await stream_token(db, user_id))
        await wait_for(lambda: hub.service.fanout.cursor >= missed, "the node published it")
        await asyncio.to_thread(owned_pg.stop, "fast")
        try:
            await client.send({"type": "subscribe", "id": "r1", "since": str(since)})
            reply = await client.recv(10)
        finally:
            await asyncio.to_thread(owned_pg.start)
        assert (reply["type"], reply["code"]) == ("error", "unavailable")
        assert reply["id"] == "r1"
        await client.close()


async def test_a_subscribe_refused_as_unavailable_starts_nothing_and_its_retry_gets_every_event(
    owned_pg: OwnedPostgres, owned_dsn: str
) -> None:
    async with hub_with_user(owned_dsn) as (db, hub, user_id):
        since = await progress(db, user_id)
        missed = await progress(db, user_id)
        client = await open_client(hub.url, await stream_token(db, user_id))
        await wait_for(lambda: hub.service.fanout.cursor >= missed, "the node published it")
        await asyncio.to_thread(owned_pg.stop, "fast")
        subscribe = {"type": "subscribe", "id": "r1", "since": str(since)}
        try:
            await client.send(subscribe)
            refused = await client.recv(10)
        finally:
            await asyncio.to_thread(owned_pg.start)
        assert (refused["type"], refused["code"]) == ("error", "unavailable")
        await wait_for(lambda: hub.service.listener.connected, "listener back", within=30)
        live = await progress(db, user_id)
        await wait_for(lambda: hub.service.fanout.cursor >= live, "the node published it")

        await client.send(subscribe)  # what a client does after `unavailable`
        got = await frames_until(client, 3)
        assert [(f["type"], f.get("cursor")) for f in got] == [
            ("subscribed", got[0].get("cursor")),
            ("event", str(missed)),
            ("event", str(live)),
        ]
        await client.no_event(0.5)
        await client.close()
