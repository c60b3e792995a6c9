"""keen_stream.client against a real hub and real PostgreSQL: typed events in order, resuming
across a hub restart and across URLs, a hub that stops answering, revoked and expired tokens, a
suspended user, a gap the hub cannot fill. (The client under the fault harness, with hub
processes and a database that fail: tests/faults/test_client_faults.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import pytest

from keen_stream.client import (
    AccountInactive,
    Event,
    StreamClient,
    StreamGap,
    Subscription,
    SubscriptionRejected,
    TokenExpired,
    TokenRevoked,
    parse_cursor,
)
from keen_stream.protocol import CreditTransaction, SessionState
from tests.integration.credits_support import fund
from tests.integration.hubkit import running_hub, stream_token, wait_for
from tests.integration.test_hub_stream import new_session, step


def client(urls: str | list[str], **kwargs: Any) -> StreamClient:
    """A client with a short backoff, so reconnecting takes little of a test's time."""
    return StreamClient(urls, backoff_initial=0.05, backoff_max=0.3, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Follower:
    """Iterates a subscription in a task of its own, keeping what it got."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.events: list[Event] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.sub:
            self.events.append(event)

    async def subscribed(self) -> None:
        await wait_for(lambda: self.sub.cursor is not None or self.task.done(), "subscribed")
        if self.task.done():
            self.task.result()

    async def count(self, n: int) -> list[Event]:
        await wait_for(lambda: len(self.events) >= n or self.task.done(), f"{n} events")
        if self.task.done():
            self.task.result()
        return self.events

    async def stop(self) -> None:
        await self.sub.aclose()
        await asyncio.wait_for(self.task, 5)


async def following(stream: StreamClient, db: Any, user: Any) -> Follower:
    """A subscription that has handed out its first event: session "s", created after it."""
    follower = Follower(stream.subscribe())
    await follower.subscribed()
    await new_session(db, user, "s")
    await follower.count(1)
    return follower


def assert_in_order(events: list[Event]) -> None:
    positions = [e.position for e in events]
    assert positions == sorted(set(positions)), "repeated or out of order"


async def test_events_arrive_typed_and_in_order(db, fresh_dsn, alice):
    async with running_hub(fresh_dsn) as hub:
        token = await stream_token(db, alice.id)
        async with client(hub.url, token=token) as stream:
            follower = Follower(stream.subscribe(events=["session.*"]))
            await follower.subscribed()
            assert follower.sub.ready is not None
            assert follower.sub.ready.user_id == alice.id
            session = await new_session(db, alice, "s")
            for i in range(1, 5):
                await step(db, alice, "s", i)
            got = await follower.count(5)
            assert all(isinstance(e, Event) for e in got)
            assert [e.event_type for e in got] == ["session.created"] + ["session.progress"] * 4
            assert [e.data["iteration_count"] for e in got] == [0, 1, 3, 6, 10]
            assert {e.user_id for e in got} == {alice.id}
            assert {e.session_id for e in got} == {session.id}
            assert {e.root_session_id for e in got} == {session.id}
            assert_in_order(got)
            assert follower.sub.cursor == got[-1].cursor
            await follower.stop()
        assert follower.sub.reconnects == 0


async def test_a_hub_restart_mid_stream_loses_and_repeats_nothing(db, fresh_dsn, alice):
    port = free_port()
    token = await stream_token(db, alice.id)
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        return token

    async with client(f"ws://127.0.0.1:{port}/ws", token_provider=provider) as stream:
        async with running_hub(fresh_dsn, port=port):
            follower = Follower(stream.subscribe())
            await follower.subscribed()
            await new_session(db, alice, "s")
            await step(db, alice, "s", 1)
            await step(db, alice, "s", 1)
            await follower.count(3)
        # The hub closed with 1012 and is gone: what is written now waits in the database.
        for _ in range(4):
            await step(db, alice, "s", 10)
        async with running_hub(fresh_dsn, port=port):
            got = await follower.count(7)
            await step(db, alice, "s", 100)
            got = await follower.count(8)
            await asyncio.sleep(0.2)  # nothing more comes
            assert [e.data["iteration_count"] for e in got] == [0, 1, 2, 12, 22, 32, 42, 142]
            assert_in_order(got)
            await follower.stop()
    assert follower.sub.reconnects >= 1
    assert calls >= 2  # authenticated again on the new connection


async def test_the_client_moves_on_to_the_next_url_when_one_is_down(db, fresh_dsn, alice):
    async with running_hub(fresh_dsn) as hub:
        token = await stream_token(db, alice.id)
        dead = f"ws://127.0.0.1:{free_port()}/ws"
        async with client([dead, hub.url], token=token, max_attempts=5) as stream:
            follower = Follower(stream.subscribe())
            await follower.subscribed()
            await new_session(db, alice, "s")
            got = await follower.count(1)
            assert got[0].event_type == "session.created"
            assert follower.sub.reconnects == 1
            await follower.stop()


async def test_a_revoked_token_ends_the_stream_with_a_typed_error_and_no_retry(
    db, fresh_dsn, alice
):
    async with running_hub(fresh_dsn) as hub:
        issued = await db.tokens.issue(alice.id, "session", scopes=["stream"])
        token = issued.token.get_secret_value()
        async with client(hub.url, token=token) as stream:
            follower = await following(stream, db, alice)
            failures = hub.service.stats.auth_failures
            await db.tokens.revoke(alice.id, issued.record.id)  # closed with 4005 while connected
            with pytest.raises(TokenRevoked) as info:
                await asyncio.wait_for(follower.task, 10)
            assert info.value.close_code == 4005
            assert follower.sub.reconnects == 0

            # At connect: refused once, raised, not retried.
            with pytest.raises(TokenRevoked):
                await asyncio.wait_for(anext(stream.subscribe()), 10)
            assert hub.service.stats.auth_failures == failures + 1


async def test_a_refused_subscription_is_a_typed_error(db, fresh_dsn, alice):
    async with running_hub(fresh_dsn) as hub:
        token = await stream_token(db, alice.id)
        async with client(hub.url, token=token) as stream:
            with pytest.raises(SubscriptionRejected) as info:
                await asyncio.wait_for(anext(stream.subscribe(sessions=[uuid.uuid4()])), 10)
            assert info.value.error_code == "session_not_found"


async def test_a_resume_point_past_retention_raises_stream_gap_or_calls_on_gap(
    db, fresh_dsn, alice
):
    async with running_hub(fresh_dsn) as hub:
        token = await stream_token(db, alice.id)
        async with client(hub.url, token=token) as stream:
            first = Follower(stream.subscribe())
            await first.subscribed()
            await new_session(db, alice, "s")
            await step(db, alice, "s", 1)
            old = (await first.count(2))[0].cursor
            await first.stop()
            await db.events.prune(timedelta(0))

            with pytest.raises(StreamGap) as info:
                await asyncio.wait_for(anext(stream.subscribe(since=old)), 10)
            gap = info.value
            assert gap.reason == "since_expired" and gap.since == old
            assert parse_cursor(gap.cursor) > parse_cursor(old)

            gaps: list[StreamGap] = []
            follower = Follower(stream.subscribe(since=old, on_gap=gaps.append))
            await follower.subscribed()
            await wait_for(lambda: gaps, "on_gap called")
            assert gaps[0].reason == "since_expired"
            await step(db, alice, "s", 5)
            got = await follower.count(1)
            assert got[0].data["iteration_count"] == 6
            assert got[0].position > parse_cursor(gaps[0].cursor)
            await follower.stop()


class Blackhole:
    """A TCP proxy in front of a hub that can stop passing bytes, both ways, without closing
    anything: a network path that drops everything, or a hub that hangs. No RST, no FIN; only
    a ping going unanswered can tell the client."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.holes = False
        self.url = ""
        self._tasks: set[asyncio.Task[None]] = set()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if not self.holes:
                    dst.write(data)
                    await dst.drain()
        dst.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        for pipe in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws"
        try:
            yield self.url
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()


async def test_a_hub_that_stops_answering_is_detected_by_a_ping_and_left_for_the_next_url(
    db, fresh_dsn, alice
):
    async with running_hub(fresh_dsn) as hub:
        proxy = Blackhole(hub.url)
        async with proxy.serving() as via_proxy:
            token = await stream_token(db, alice.id)
            # The proxy first, then the hub directly (another route to a healthy node).
            stream = client([via_proxy, hub.url], token=token, ping_interval=0.3, ping_timeout=0.3)
            async with stream:
                follower = Follower(stream.subscribe())
                await follower.subscribed()
                assert follower.sub.url == via_proxy
                await new_session(db, alice, "s")
                await follower.count(1)
                await asyncio.sleep(1.0)  # quiet but alive: pings are answered
                assert follower.sub.dead_connections == 0 and follower.sub.reconnects == 0

                proxy.holes = True
                await step(db, alice, "s", 1)  # written while the path is dead
                await step(db, alice, "s", 2)
                got = await follower.count(3)
                assert follower.sub.dead_connections == 1
                assert follower.sub.url == hub.url
                await step(db, alice, "s", 3)
                got = await follower.count(4)
                assert [e.data["iteration_count"] for e in got] == [0, 1, 3, 6]
                assert_in_order(got)
                await follower.stop()


async def test_a_caller_slower_than_the_ping_interval_does_not_make_a_live_hub_look_dead(
    db, fresh_dsn, alice
):
    async with running_hub(fresh_dsn) as hub:
        token = await stream_token(db, alice.id)
        async with client(hub.url, token=token, ping_interval=0.2, ping_timeout=0.2) as stream:
            sub = stream.subscribe()
            first = asyncio.ensure_future(anext(sub))
            await wait_for(lambda: sub.cursor is not None, "subscribed")
            await new_session(db, alice, "s")
            got = [await asyncio.wait_for(first, 10)]
            for _ in range(2):
                # More than websockets queues (16 frames) arrive while the caller is busy, so
                # the socket is not read: a pong would sit unread, as would the events.
                for _ in range(30):
                    await step(db, alice, "s", 1)
                await asyncio.sleep(1.0)  # the caller's own work, longer than both timeouts
                for _ in range(30):
                    got.append(await asyncio.wait_for(anext(sub), 10))
            assert [e.data["iteration_count"] for e in got] == list(range(61))
            assert sub.dead_connections == 0 and sub.reconnects == 0
            await sub.aclose()


async def test_an_expired_token_is_a_typed_error_unless_the_provider_has_a_fresh_one(
    db, fresh_dsn, alice
):
    async with running_hub(fresh_dsn) as hub:
        # Expired before connecting: refused once, raised, not retried.
        stale = await stream_token(db, alice.id, expires_in=timedelta(milliseconds=50))
        await asyncio.sleep(0.1)
        failures = hub.service.stats.auth_failures
        async with client(hub.url, token=stale) as stream:
            with pytest.raises(TokenExpired) as info:
                await asyncio.wait_for(anext(stream.subscribe()), 10)
        assert info.value.close_code == 4004
        assert hub.service.stats.auth_failures == failures + 1

        # Expiring while connected, with a fixed token: the hub closes 4004 at the expiry.
        short = await stream_token(db, alice.id, expires_in=timedelta(seconds=1))
        async with client(hub.url, token=short) as stream:
            follower = await following(stream, db, alice)
            with pytest.raises(TokenExpired):
                await asyncio.wait_for(follower.task, 10)
            assert follower.sub.reconnects == 0

        # With a provider (a plain function here; async in the restart test) the client
        # reconnects with the next token and resumes: nothing lost, nothing twice.
        tokens = [
            await stream_token(db, alice.id, expires_in=timedelta(seconds=1)),
            await stream_token(db, alice.id),
        ]
        issued = iter(tokens)
        async with client(hub.url, token_provider=lambda: next(issued)) as stream:
            follower = Follower(stream.subscribe(sessions=[]))
            await follower.subscribed()
            await step(db, alice, "s", 1)
            await follower.count(1)
            await wait_for(lambda: follower.sub.closes[4004] == 1, "closed 4004", within=10)
            await step(db, alice, "s", 2)
            got = await follower.count(2)
            assert [e.data["iteration_count"] for e in got] == [1, 3]
            assert follower.sub.reconnects == 1
            await follower.stop()


async def test_a_suspended_user_ends_the_stream_with_account_inactive_and_no_retry(
    db, fresh_dsn, alice, admin
):
    async with running_hub(fresh_dsn) as hub:
        token = await stream_token(db, alice.id)
        async with client(hub.url, token=token) as stream:
            follower = await following(stream, db, alice)
            await db.users.set_account_status(alice.id, "suspended", actor_id=admin.id)
            with pytest.raises(AccountInactive) as info:
                await asyncio.wait_for(follower.task, 10)
            assert info.value.close_code == 4006
            assert follower.sub.reconnects == 0

            failures = hub.service.stats.auth_failures
            with pytest.raises(AccountInactive):
                await asyncio.wait_for(anext(stream.subscribe()), 10)
            assert hub.service.stats.auth_failures == failures + 1


async def test_every_payload_the_triggers_write_parses_as_its_typed_model(db, fresh_dsn, alice):
    """The payloads come from SQL (keen_stream/sql/events.sql): each kind, from the real
    triggers, parses into the shared model, and the model knows every key it carries."""
    await fund(db, alice, "50")
    async with running_hub(fresh_dsn) as hub:
        token = await stream_token(db, alice.id)
        async with client(hub.url, token=token) as stream:
            follower = await following(stream, db, alice)  # session.created
            await db.sessions.update_progress(alice.id, "s", phase="PLAN", iterations=2)
            await new_session(db, alice, "child", parent="s")
            await db.credits.deduct_credits(alice.id, Decimal("0.25"), "s", "model call")
            await db.sessions.complete_session(
                alice.id, "child", success=False, claude_cost_usd=Decimal("0.5")
            )
            # created, phase_changed, created (child), usage, usage (the child's cost),
            # completed (child)
            got = await follower.count(6)
            await follower.stop()
    kinds = {e.event_type for e in got}
    assert kinds == {
        "session.created",
        "session.phase_changed",
        "credit.usage",
        "session.completed",
    }
    for event in got:
        typed = event.session or event.credit
        assert typed is not None, event.event_type
        model = SessionState if event.session is not None else CreditTransaction
        assert set(event.data) <= set(model.model_fields), event.data.keys() - model.model_fields
    created = next(e.session for e in got if e.event_type == "session.created")
    assert created is not None and created.git_branch == "main" and created.depth == 0
    assert created.claude_cost_usd == Decimal(0) and created.credit_budget is None
    phase = next(e.session for e in got if e.event_type == "session.phase_changed")
    assert phase is not None and (phase.previous_phase, phase.phase) == ("EXPLORE", "PLAN")
    usage = next(e.credit for e in got if e.event_type == "credit.usage")
    assert usage is not None and usage.amount < 0 and usage.description == "model call"
    assert isinstance(usage.balance_after, Decimal) and usage.balance_after < Decimal(50)
    ended = [e.session for e in got if e.session is not None and e.session.status == "failed"]
    assert ended and ended[0].success is False and ended[0].end_time is not None
    assert ended[0].parent_session_id == created.root_session_id
