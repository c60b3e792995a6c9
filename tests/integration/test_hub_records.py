"""Connection records, node heartbeats and the reaper, retention pruning, and the migration."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from datetime import timedelta

import asyncpg
import httpx
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models.events import ORIGIN, Cursor
from keen_stream.errors import InvalidInput, NotFound
from keen_stream.migrate import downgrade, upgrade
from tests.integration.hubkit import open_client, running_hub, stream_token, wait_for


async def new_session(db: KeenDatabase, user, key: str):
    return await db.sessions.create_session(
        user.id, session_handle=key, vision="v", working_directory="/w", git_branch="main"
    )


async def test_connection_rows_are_written_in_batches_and_closed_with_their_code(
    db, fresh_dsn, owner_conn, alice
):
    async with running_hub(fresh_dsn, hub_flush_interval=3600) as hub:
        session = await new_session(db, alice, "s")
        token = await db.tokens.issue(alice.id, "session", scopes=["stream"])
        c = await open_client(
            hub.url,
            token.token.get_secret_value(),
            user_agent_header="keen-test/1.0",
        )
        cid = c.ready["connection_id"]
        # Nothing is written per connect or per ping: only the batch writes.
        for i in range(20):
            await c.send({"type": "ping", "id": i})
            await c.expect("pong")
        assert (
            await owner_conn.fetchval(
                "SELECT count(*) FROM websocket_connections WHERE connection_id = $1", cid
            )
            == 0
        )
        await hub.service.recorder.flush()
        row = await db.connections.get(cid)
        assert row.user_id == alice.id and row.token_id == token.record.id
        assert str(row.client_ip) == "127.0.0.1" and row.user_agent == "keen-test/1.0"
        assert row.hub_node_id == hub.service.node_id and row.connection_status == "active"
        assert row.admin_connection is False and row.subscription_scope == "none"
        assert row.last_ping_at > row.connected_at
        first_ping = row.last_ping_at

        await c.subscribe(sessions=[str(session.id)], events=["session.progress", "credit.*"])
        await hub.service.recorder.flush()
        row = await db.connections.get(cid)
        assert row.subscription_scope == "sessions" and row.session_filters == [session.id]
        assert row.session_id == session.id
        assert set(row.subscribed_events) == {
            "session.progress",
            "credit.purchase",
            "credit.usage",
            "credit.refund",
            "credit.adjustment",
            "credit.admin_bypass",
        }
        assert row.last_ping_at >= first_ping
        assert await db.connections.open_for_session(alice.id, session.id) == [cid]

        await c.close()
        await wait_for(lambda: cid not in hub.service.fanout.clients, "connection gone")
        await hub.service.recorder.flush()
        row = await db.connections.get(cid)
        assert row.disconnected_at is not None and row.connection_status == "disconnected"
        assert row.close_code == 1000
        assert await db.connections.open_for_session(alice.id, session.id) == []
        mine = await db.connections.list_for_user(alice.id, include_closed=True)
        assert [r.connection_id for r in mine] == [cid]


async def test_a_hub_that_stops_closes_its_clients_and_rows(db, fresh_dsn, alice):
    async with running_hub(fresh_dsn) as hub:
        c = await open_client(hub.url, await stream_token(db, alice.id))
        node_id = hub.service.node_id
        cid = c.ready["connection_id"]
        await wait_for(lambda: hub.service.recorder.flushes > 1, "a flush")
        closing = asyncio.create_task(c.closed())
    code, _ = await closing
    assert code == 1012  # uvicorn's "service restart": reconnect (to any node) and resume
    node = await db.connections.get_node(node_id)
    assert node.status == "stopped" and node.stopped_at is not None
    row = await db.connections.get(cid)
    assert row.connection_status == "disconnected" and row.close_code in (1001, 1012)


async def test_nodes_heartbeat_and_a_dead_nodes_rows_are_reaped(db, fresh_dsn, owner_conn, alice):
    dead = uuid.uuid4()
    await owner_conn.execute(
        "INSERT INTO hub_nodes (id, hostname, pid, last_heartbeat_at)"
        " VALUES ($1, 'gone', 1, now() - interval '1 hour')",
        dead,
    )
    await owner_conn.execute(
        "INSERT INTO websocket_connections (user_id, connection_id, client_ip, client_type,"
        " hub_node_id) VALUES ($1, 'ws-dead', '10.0.0.1', 'websocket', $2)",
        alice.id,
        dead,
    )
    async with running_hub(fresh_dsn) as hub:
        node_id = hub.service.node_id
        started = (await db.connections.get_node(node_id)).last_heartbeat_at
        await wait_for(lambda: hub.service.recorder.flushes > 0, "a flush")

        async def reaped() -> bool:
            status: str = (await db.connections.get("ws-dead")).connection_status
            return status == "reaped"

        for _ in range(200):
            if await reaped():
                break
            await asyncio.sleep(0.05)
        row = await db.connections.get("ws-dead")
        assert row.connection_status == "reaped" and row.disconnected_at is not None
        assert (await db.connections.get_node(dead)).status == "dead"
        assert (await db.connections.get_node(node_id)).last_heartbeat_at > started
        # A node never reaps itself, however late its heartbeat looks to it.
        assert await db.connections.reap(timedelta(microseconds=1), reaper=node_id) == (0, 0)
    with pytest.raises(InvalidInput):
        await db.connections.reap(timedelta(0))
    with pytest.raises(NotFound):
        await db.connections.get("ws-nope")


async def test_a_node_declared_dead_while_alive_revives_itself_and_its_rows(
    db, fresh_dsn, owner_conn, alice
):
    async with running_hub(fresh_dsn) as hub:
        c = await open_client(hub.url, await stream_token(db, alice.id))
        cid = c.ready["connection_id"]
        await hub.service.recorder.flush()
        node_id = hub.service.node_id
        await owner_conn.execute(
            "UPDATE hub_nodes SET last_heartbeat_at = now() - interval '1 hour' WHERE id = $1",
            node_id,
        )
        # The reap closed the node and its one connection row. (Not re-read here: the live
        # node's next heartbeat, every 0.2 s, may already be reviving it.)
        assert await db.connections.reap(timedelta(seconds=1)) == (1, 1)
        for _ in range(200):
            if (await db.connections.get_node(node_id)).status == "running":
                break
            await asyncio.sleep(0.05)
        assert (await db.connections.get(cid)).connection_status == "active"
        await c.close()


async def test_pruning_removes_the_oldest_prefix_and_moves_the_watermark(db, owner_conn, alice):
    for i in range(6):
        await new_session(db, alice, f"s{i}")
    rows = await owner_conn.fetch("SELECT xid, id FROM stream_events ORDER BY xid, id")
    assert len(rows) == 6
    # The first four are old; the fifth is young; the sixth is old but after a young one.
    await owner_conn.execute(
        "UPDATE stream_events SET created_at = now() - interval '2 days'"
        " WHERE id IN ($1, $2, $3, $4, $5)",
        *[r["id"] for r in rows[:4]],
        rows[5]["id"],
    )
    assert await db.events.pruned_through() == ORIGIN
    deleted = await db.events.prune(timedelta(days=1), batch=3)
    assert deleted == 4
    left = await owner_conn.fetch("SELECT xid, id FROM stream_events ORDER BY xid, id")
    assert [r["id"] for r in left] == [rows[4]["id"], rows[5]["id"]]
    assert await db.events.pruned_through() == Cursor(rows[3]["xid"], rows[3]["id"])
    assert await db.events.head() == Cursor(rows[5]["xid"], rows[5]["id"])
    assert await db.events.prune(timedelta(days=1)) == 0
    with pytest.raises(InvalidInput):
        await db.events.prune(timedelta(days=-1))


async def test_tenants_can_read_only_their_own_events_and_cannot_write_any(
    db, owner_conn, alice, bob, admin
):
    assert await owner_conn.fetchval(
        "SELECT relrowsecurity AND relforcerowsecurity FROM pg_class"
        " WHERE oid = 'stream_events'::regclass"
    )
    await new_session(db, alice, "a")
    await new_session(db, bob, "b")
    async with db.user_transaction(alice.id) as conn:
        assert {r["user_id"] for r in await conn.fetch("SELECT user_id FROM stream_events")} == {
            alice.id
        }
    async with db.user_transaction(admin.id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM stream_events") == 2
    with pytest.raises(Exception):  # no INSERT privilege: events cannot be forged
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(
                "INSERT INTO stream_events (user_id, event_type, payload)"
                " VALUES ($1, 'session.created', '{}')",
                alice.id,
            )
    replayed = await db.events.replay(alice.id, ORIGIN, Cursor(2**62, 0), scope="all")
    assert {e.user_id for e in replayed} == {alice.id}
    assert len(await db.events.replay(admin.id, ORIGIN, Cursor(2**62, 0), scope="all")) == 2


async def test_tail_waits_for_the_oldest_running_transaction(db, fresh_dsn, owner_conn, alice):
    a = await new_session(db, alice, "a")
    await new_session(db, alice, "b")
    reader = await db.events.connect_reader("test_reader")
    try:
        batch = await reader.read(ORIGIN, 100)
        assert len(batch.events) == 2 and not batch.pending
        cursor = batch.events[-1].cursor
        tx = owner_conn.transaction()
        await tx.start()
        await owner_conn.execute(
            "UPDATE agent_sessions SET tool_calls_count = 7 WHERE id = $1", a.id
        )
        await db.sessions.update_progress(alice.id, "b", iterations=1)
        batch = await reader.read(cursor, 100)
        assert batch.events == [] and batch.pending  # committed, but held behind the open one
        await tx.commit()
        batch = await reader.read(cursor, 100)
        assert [e.event_type for e in batch.events] == ["session.progress"] * 2
        assert batch.events[0].session_id == a.id and not batch.pending
    finally:
        await reader.close()


async def test_a_transaction_in_another_database_does_not_hold_the_stream(db, pg_admin_dsn, alice):
    other = await asyncpg.connect(pg_admin_dsn)
    tx = other.transaction()
    await tx.start()
    try:
        await other.execute("CREATE TEMP TABLE t (x int)")
        await other.execute("INSERT INTO t VALUES (1)")
        await new_session(db, alice, "a")
        reader = await db.events.connect_reader("test_reader")
        try:
            batch = await reader.read(ORIGIN, 100)
        finally:
            await reader.close()
        assert len(batch.events) == 1
    finally:
        await tx.rollback()
        await other.close()


async def test_the_migration_downgrades_and_upgrades_cleanly(fresh_dsn, owner_conn):
    await asyncio.to_thread(downgrade, fresh_dsn, "0003_sessions")
    for name in ("stream_events", "hub_nodes", "stream_retention"):
        assert await owner_conn.fetchval("SELECT to_regclass($1)", name) is None
    assert (
        await owner_conn.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE table_name ="
            " 'websocket_connections' AND column_name = 'hub_node_id'"
        )
        == 0
    )
    await asyncio.to_thread(upgrade, fresh_dsn, "head")
    assert await owner_conn.fetchval("SELECT to_regclass('stream_events')") is not None


async def test_keen_stream_serve_runs_a_hub_node_and_stops_cleanly(fresh_dsn, owner_conn):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keen_stream",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env={**os.environ, "KEEN_DATABASE_URL": fresh_dsn},
    )
    try:
        health = None
        async with httpx.AsyncClient() as http:
            for _ in range(300):
                try:
                    health = await http.get(f"http://127.0.0.1:{port}/healthz")
                    if health.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        assert health is not None and health.json()["status"] == "ok"
        node_id = uuid.UUID(health.json()["node_id"])
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code in (0, -signal.SIGTERM)
    status = await owner_conn.fetchval("SELECT status FROM hub_nodes WHERE id = $1", node_id)
    assert status == "stopped"
