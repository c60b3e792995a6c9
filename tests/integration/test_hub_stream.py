"""The hub end to end: real PostgreSQL, a real uvicorn server, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import timedelta

import asyncpg
from websockets.asyncio.client import connect

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.events import SQL as EVENT_SQL
from keen_stream.dal.models import User
from keen_stream.dal.models.events import ORIGIN
from tests.integration.hubkit import (
    late_close_proxy,
    open_client,
    running_hub,
    stream_token,
    wait_for,
)


async def new_session(db: KeenDatabase, user: User, key: str, parent: str | None = None):
    return await db.sessions.create_session(
        user.id,
        session_handle=key,
        vision="v",
        working_directory="/w",
        git_branch="main",
        parent_session_handle=parent,
    )


async def step(db: KeenDatabase, user: User, key: str, n: int = 1):
    return await db.sessions.update_progress(user.id, key, iterations=n)


def cursors(events):
    out = []
    for e in events:
        xid, _, i = e["cursor"].partition("-")
        out.append((int(xid), int(i)))
    return out


async def test_each_tenant_gets_exactly_its_own_events_in_order_and_the_admin_gets_all(
    db, fresh_dsn, alice, bob, admin
):
    async with running_hub(fresh_dsn) as hub:
        ca = await open_client(hub.url, await stream_token(db, alice.id))
        cb = await open_client(hub.url, await stream_token(db, bob.id), header=True)
        cadmin = await open_client(hub.url, await stream_token(db, admin.id))
        cadmin_own = await open_client(hub.url, await stream_token(db, admin.id))
        assert ca.ready["admin"] is False and cadmin.ready["admin"] is True
        await ca.subscribe()
        await cb.subscribe()
        await cadmin.subscribe(scope="all")
        await cadmin_own.subscribe(scope="mine")

        a = await new_session(db, alice, "a-1")
        b = await new_session(db, bob, "b-1")
        for i in range(1, 6):
            await step(db, alice, "a-1", i)
            await step(db, bob, "b-1", i)

        got_a = await ca.events(6)
        got_b = await cb.events(6)
        got_admin = await cadmin.events(12)

        assert {e["user_id"] for e in got_a} == {str(alice.id)}
        assert {e["session_id"] for e in got_a} == {str(a.id)}
        assert {e["user_id"] for e in got_b} == {str(bob.id)}
        assert [e["event_type"] for e in got_a] == ["session.created"] + ["session.progress"] * 5
        # in order: counters only grow, cursors strictly increase
        totals = [e["data"]["iteration_count"] for e in got_a]
        assert totals == [0, 1, 3, 6, 10, 15]
        for got in (got_a, got_b, got_admin):
            assert cursors(got) == sorted(set(cursors(got)))
        assert {e["session_id"] for e in got_admin} == {str(a.id), str(b.id)}
        assert sorted(cursors(got_admin)) == sorted(cursors(got_a) + cursors(got_b))
        # nothing else arrives: not the other tenant's, not twice
        await ca.no_event()
        await cb.no_event()
        await cadmin_own.no_event(0.1)
        for c in (ca, cb, cadmin, cadmin_own):
            await c.close()


async def test_session_subscription_follows_the_session_and_its_sub_agents_only(
    db, fresh_dsn, alice, admin
):
    async with running_hub(fresh_dsn) as hub:
        root = await new_session(db, alice, "root-1")
        await new_session(db, alice, "other-1")
        c = await open_client(hub.url, await stream_token(db, alice.id))
        sub = await c.subscribe(sessions=[str(root.id)], events=["session.*"])
        assert sub["scope"] == "sessions" and sub["sessions"] == [str(root.id)]
        child = await new_session(db, alice, "child-1", parent="root-1")
        await step(db, alice, "other-1")
        await step(db, alice, "child-1")
        await step(db, alice, "root-1")
        got = await c.events(3)
        assert [(e["session_id"], e["event_type"]) for e in got] == [
            (str(child.id), "session.created"),
            (str(child.id), "session.progress"),
            (str(root.id), "session.progress"),
        ]
        assert all(e["root_session_id"] == str(root.id) for e in got)
        await c.no_event()
        # An admin may watch any user's session.
        ca = await open_client(hub.url, await stream_token(db, admin.id))
        await ca.subscribe(sessions=[str(root.id)])
        await step(db, alice, "root-1")
        assert (await ca.events(1))[0]["session_id"] == str(root.id)
        await c.close()
        await ca.close()


async def test_a_transaction_that_commits_late_is_waited_for_not_skipped(
    db, fresh_dsn, owner_conn, alice
):
    async with running_hub(fresh_dsn) as hub:
        c = await open_client(hub.url, await stream_token(db, alice.id))
        await c.subscribe()
        early = await new_session(db, alice, "early")
        await new_session(db, alice, "later")
        await c.events(2)

        # This transaction gets its xid (and its event id) first, and commits last.
        tx = owner_conn.transaction()
        await tx.start()
        await owner_conn.execute(
            "UPDATE agent_sessions SET iteration_count = 100 WHERE id = $1", early.id
        )
        held_id = await owner_conn.fetchval("SELECT max(id) FROM stream_events")
        for i in range(1, 4):
            await step(db, alice, "later", i)
        committed_ids = await db.pool.fetchval(
            "SELECT count(*) FROM stream_events WHERE id > $1", held_id
        )
        assert committed_ids == 3
        # The later commits are held back while the early transaction runs...
        await c.no_event(0.5)
        assert hub.service.listener.horizon is not None
        await tx.commit()
        got = await c.events(4)
        # ...and then everything goes out, the early one first: nothing skipped.
        assert got[0]["session_id"] == str(early.id)
        assert got[0]["data"]["iteration_count"] == 100
        assert [e["data"]["iteration_count"] for e in got[1:]] == [1, 3, 6]
        assert cursors(got) == sorted(cursors(got))
        await c.no_event(0.2)
        await c.close()


async def test_resume_with_since_gets_exactly_the_missed_events(db, fresh_dsn, alice, bob):
    async with running_hub(fresh_dsn) as hub:
        await new_session(db, alice, "s")
        await new_session(db, bob, "bob-s")
        # Subscribe after the node has read both creations: otherwise alice's can still arrive
        # live (it follows the head the node had read) and be taken for a step below.
        await wait_for(lambda: hub.service.stats.events_received >= 2, "creations read")
        token = await stream_token(db, alice.id)
        c1 = await open_client(hub.url, token)
        await c1.subscribe()
        for _ in range(3):
            await step(db, alice, "s", 1)
        seen = await c1.events(3)
        last = seen[-1]["cursor"]
        await c1.close()

        for _ in range(4):
            await step(db, alice, "s", 10)
            await step(db, bob, "bob-s", 1)  # interleaved: never replayed to alice
        await wait_for(lambda: hub.service.stats.events_received >= 13, "events read")

        c2 = await open_client(hub.url, token)
        sub = await c2.subscribe(since=last)
        assert sub["recovered"] is True
        missed = await c2.events(4)
        assert [e["data"]["iteration_count"] for e in missed] == [13, 23, 33, 43]
        assert {e["user_id"] for e in missed} == {str(alice.id)}
        assert cursors(missed)[0] > cursors(seen)[-1]
        # then live, without a gap or a repeat
        await step(db, alice, "s", 100)
        live = await c2.events(1)
        assert live[0]["data"]["iteration_count"] == 143
        await c2.no_event(0.2)

        # A cursor from before the retention window: the client is told to reload.
        await db.events.prune(timedelta(0))
        c3 = await open_client(hub.url, token)
        sub = await c3.subscribe(since=last)
        assert sub["recovered"] is False and sub["reason"] == "since_expired"
        await c3.no_event(0.2)
        # A cursor this hub never issued (ahead of the stream) is not trusted either.
        sub = await c3.subscribe(since="999999999999-1")
        assert sub["recovered"] is False and sub["reason"] == "since_unknown"
        for c in (c2, c3):
            await c.close()


async def test_killing_the_listener_while_events_are_written_loses_and_skips_nothing(
    db, fresh_dsn, owner_conn, alice
):
    async with running_hub(fresh_dsn) as hub:
        await new_session(db, alice, "s")
        c = await open_client(hub.url, await stream_token(db, alice.id))
        await c.subscribe(events=["session.progress"])
        total = 60

        async def writer() -> None:
            for _ in range(total):
                await step(db, alice, "s", 1)
                await asyncio.sleep(0.005)

        task = asyncio.create_task(writer())
        killed = 0
        while not task.done() and killed < 3:
            await asyncio.sleep(0.08)
            pid = hub.service.listener.backend_pid
            if pid is not None:
                killed += bool(await owner_conn.fetchval("SELECT pg_terminate_backend($1)", pid))
        await task
        got = await c.events(total, within=20)
        assert [e["data"]["iteration_count"] for e in got] == list(range(1, total + 1))
        await c.no_event(0.3)
        assert killed >= 1
        assert hub.service.listener.reconnects >= killed
        await c.close()


async def test_a_killed_listener_whose_close_arrives_late_reconnects_and_loses_nothing(
    db, fresh_dsn, owner_conn, alice
):
    # A terminated backend sends its FATAL message, then exits and closes the socket; on a
    # loaded machine the close can come much later. asyncpg reads the FATAL while idle as a
    # protocol error, and a read in the gap failed with InternalClientError, which the listener
    # did not expect: its task ended and the node delivered nothing more.
    async with (
        late_close_proxy(fresh_dsn, owner_conn, delay=1.0) as dsn,
        running_hub(dsn) as hub,
    ):
        await new_session(db, alice, "s")
        c = await open_client(hub.url, await stream_token(db, alice.id))
        await c.subscribe(events=["session.progress"])
        await step(db, alice, "s", 1)
        assert (await c.events(1))[0]["data"]["iteration_count"] == 1
        listener = hub.service.listener
        pid = listener.backend_pid
        assert await owner_conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        # The listener polls every 0.2 s, so it reads inside the 1 s before the close arrives.
        await wait_for(lambda: listener.backend_pid not in (None, pid), "listener reconnected")
        for _ in range(3):
            await step(db, alice, "s", 1)
        got = await c.events(3)
        assert [e["data"]["iteration_count"] for e in got] == [2, 3, 4]
        await c.no_event(0.3)
        assert listener.reconnects >= 1
        await c.close()


async def test_a_listener_connection_that_goes_silent_after_login_is_replaced(
    db, fresh_dsn, owner_conn, alice
):
    # The listener's first connection logs in, then nothing it sends arrives and nothing comes
    # back (a connection that died silently). Its next steps (SET ROLE, LISTEN) run under
    # timeouts, so it gives up on that connection and connects again instead of hanging.
    async with (
        late_close_proxy(
            fresh_dsn, owner_conn, delay=0, stall_first=b"keen_stream_listener"
        ) as dsn,
        running_hub(dsn, connect_timeout=1.0, listener_probe_timeout=1.0) as hub,
    ):
        listener = hub.service.listener
        await wait_for(lambda: listener.connected, "listener connected")
        assert listener.reconnects >= 1  # the silent connection was dropped
        await new_session(db, alice, "s")
        c = await open_client(hub.url, await stream_token(db, alice.id))
        await c.subscribe(events=["session.progress"])
        for _ in range(3):
            await step(db, alice, "s", 1)
        got = await c.events(3)
        assert [e["data"]["iteration_count"] for e in got] == [1, 2, 3]
        await c.close()


async def test_a_slow_consumer_is_closed_and_resumes_while_others_get_everything(
    db, fresh_dsn, owner_conn, alice
):
    async with running_hub(fresh_dsn, hub_send_buffer_limit=16_384, hub_close_timeout=60) as hub:
        session = await new_session(db, alice, "s")
        token = await stream_token(db, alice.id)
        fast = await open_client(hub.url, token)
        await fast.subscribe()
        # A client that stops reading: small receive buffer, tiny library queue, never recv().
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(hub.url.rsplit(":", 1)[1].split("/")[0])))
        slow_ws = await connect(hub.url, sock=sock, max_queue=1, max_size=2**22)
        await slow_ws.send(json.dumps({"type": "auth", "token": token}))
        assert json.loads(await slow_ws.recv())["type"] == "ready"
        await slow_ws.send(json.dumps({"type": "subscribe"}))
        assert json.loads(await slow_ws.recv())["type"] == "subscribed"

        total = 4000
        await owner_conn.execute(
            f"DO $$ BEGIN FOR i IN 1..{total} LOOP UPDATE agent_sessions SET iteration_count ="
            f" iteration_count + 1 WHERE id = '{session.id}'; END LOOP; END $$"
        )
        got = await fast.events(total, within=30)
        assert [e["data"]["iteration_count"] for e in got] == list(range(1, total + 1))
        assert hub.service.stats.slow_consumers_closed == 1

        # The slow client reads what was queued, then the close with its resume point.
        received = []
        try:
            while True:
                received.append(json.loads(await asyncio.wait_for(slow_ws.recv(), 30)))
        except Exception:  # ConnectionClosed
            pass
        assert slow_ws.close_code == 4008 and slow_ws.close_reason is not None
        since = slow_ws.close_reason.rpartition("since=")[2]
        events = [f for f in received if f["type"] == "event"]
        assert events and events[-1]["cursor"] == since
        resumed = await open_client(hub.url, token)
        sub = await resumed.subscribe(since=since)
        assert sub["recovered"] is True
        rest = await resumed.events(total - len(events), within=30)
        counts = [e["data"]["iteration_count"] for e in events + rest]
        assert counts == list(range(1, total + 1))
        await fast.close()
        await resumed.close()


async def test_events_written_outside_the_dal_arrive_by_the_fallback_poll(
    db, fresh_dsn, owner_conn, alice
):
    async with running_hub(fresh_dsn, listener_fallback_poll=0.3) as hub:
        session = await new_session(db, alice, "s")
        # Its event and its NOTIFY must be behind us before we subscribe and count (under load
        # either could otherwise arrive after).
        listener = hub.service.listener
        await wait_for(
            lambda: hub.service.stats.events_received >= 1 and listener.notifications >= 1,
            "session.created read and its NOTIFY received",
        )
        c = await open_client(hub.url, await stream_token(db, alice.id))
        await c.subscribe()
        before = listener.notifications
        await owner_conn.execute(
            "UPDATE agent_sessions SET current_phase = 'PLAN' WHERE id = $1", session.id
        )
        got = await c.events(1)
        assert got[0]["event_type"] == "session.phase_changed"
        assert got[0]["data"]["previous_phase"] == "EXPLORE"
        assert hub.service.listener.notifications == before  # no NOTIFY came: the poll found it
        await c.close()


async def test_health_and_metrics_report_the_listener_and_counts(db, fresh_dsn, alice):
    import httpx

    async with running_hub(fresh_dsn) as hub:
        c = await open_client(hub.url, await stream_token(db, alice.id))
        await c.subscribe()
        await new_session(db, alice, "s")
        await c.events(1)
        async with httpx.AsyncClient() as http:
            health = await http.get(hub.http + "/healthz")
            metrics = await http.get(hub.http + "/metrics")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ok" and body["listener"]["connected"] is True
        assert body["database"]["ok"] is True and body["connections"] == 1
        text = metrics.text
        assert "keen_hub_connections 1.0" in text
        assert "keen_hub_subscriptions 1.0" in text
        assert "keen_hub_events_delivered_total 1.0" in text
        assert "keen_hub_listener_connected 1.0" in text
        assert "keen_hub_listener_lag_seconds" in text
        await c.close()


async def test_tail_query_stays_on_the_primary_key(
    db: KeenDatabase, owner_conn: asyncpg.Connection
):
    await owner_conn.execute("SET enable_seqscan = off")
    rows = await owner_conn.fetch("EXPLAIN " + EVENT_SQL["tail"], 1, 1, 100)
    plan = "\n".join(r[0] for r in rows)
    assert "stream_events_pkey" in plan


async def test_resuming_on_a_node_that_lags_behind_skips_what_the_client_already_has(
    db, fresh_dsn, alice
):
    async with running_hub(fresh_dsn) as hub:
        await new_session(db, alice, "s")
        await step(db, alice, "s")
        await wait_for(lambda: hub.service.stats.events_received >= 2, "events read")
        head = await db.events.head()
        reader = await db.events.connect_reader("test_reader")
        try:
            old = (await reader.read(ORIGIN, 10)).events
        finally:
            await reader.close()
        # As if this node had not yet published the last two events (another node had).
        hub.service.fanout.cursor = ORIGIN
        c = await open_client(hub.url, await stream_token(db, alice.id))
        sub = await c.subscribe(since=str(head))
        assert sub["recovered"] is True and sub["cursor"] == str(head)
        hub.service.fanout.publish(old)  # the lagging node catches up: nothing is sent twice
        await step(db, alice, "s", 5)
        got = await c.events(1)
        assert got[0]["data"]["iteration_count"] == 6
        await c.no_event(0.2)
        await c.close()


async def test_a_listener_failing_the_same_way_after_every_connect_backs_off(db, fresh_dsn, alice):
    # A delivery that raises on every read (a bug, a poisoned event) must not turn into a
    # reconnect loop: the backoff starts over only after a read was delivered.
    from keen_stream.hub.listener import EventListener
    from tests.conftest import make_settings

    await new_session(db, alice, "s")
    settings = make_settings(fresh_dsn, listener_backoff_max=1.0, listener_fallback_poll=0.05)

    def deliver(_events: object) -> None:
        raise RuntimeError("delivery keeps failing")

    listener = EventListener(db.events, deliver, settings, start_after=ORIGIN)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.sleep(1.5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # 25-50 ms, 50-100, 100-200, 200-400, 400-800 ms...: a handful, not dozens
    assert 1 <= listener.reconnects <= 7
