"""keen_stream.client against a real hub and real PostgreSQL: typed events in order, resuming
across a hub restart and across URLs, a revoked token, a gap the hub cannot fill."""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import timedelta
from typing import Any

import pytest

from keen_stream.client import (
    Event,
    StreamClient,
    StreamGap,
    Subscription,
    SubscriptionRejected,
    TokenRevoked,
    parse_cursor,
)
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
            follower = Follower(stream.subscribe())
            await follower.subscribed()
            await new_session(db, alice, "s")
            await follower.count(1)
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
