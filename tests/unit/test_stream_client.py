"""keen_stream.client against a scripted WebSocket server: what a real hub rarely does on cue
(``error unavailable``, a 4008, repeated or older cursors, a token expiring while connected)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from keen_stream.client import (
    Event,
    LatestByEntity,
    StreamClient,
    TokenExpired,
    UnexpectedFrame,
    parse_cursor,
)
from keen_stream.protocol import ErrorFrame, ReadyFrame, SubscribedFrame, dump_frame

USER = uuid.uuid4()
Script = Callable[[ServerConnection], Awaitable[None]]


def event(cursor: str) -> str:
    return json.dumps(
        {
            "type": "event",
            "cursor": cursor,
            "version": 1,
            "event_type": "session.progress",
            "user_id": str(USER),
            "session_id": None,
            "root_session_id": None,
            "time": "2026-01-01T00:00:00+00:00",
            "data": {"n": cursor},
        }
    )


def subscribed(cursor: str, recovered: bool = True) -> str:
    """Built with the hub's own model (keen_stream.protocol), as the hub builds it."""
    return dump_frame(
        SubscribedFrame(
            id="keen-client",
            scope="mine",
            cursor=cursor,
            recovered=recovered,
            reason=None if recovered else "since_expired",
        )
    )


class Fake:
    def __init__(self, scripts: list[Script]) -> None:
        self.scripts = scripts
        self.subscribes: list[dict[str, Any]] = []
        self.tokens: list[str | None] = []

    async def ready(self, ws: ServerConnection) -> None:
        frame = ReadyFrame(connection_id="ws-1", user_id=USER, admin=False, cursor="1-0")
        await ws.send(dump_frame(frame))

    async def subscribe(self, ws: ServerConnection) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await ws.recv())
        assert frame["type"] == "subscribe"
        self.subscribes.append(frame)
        return frame

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.tokens.append(ws.request.headers.get("Authorization"))
        script = self.scripts[len(self.tokens) - 1]
        await script(ws)


@asynccontextmanager
async def fake_hub(fake: Fake) -> AsyncIterator[str]:
    async with serve(fake.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws"


async def take(stream: StreamClient, n: int) -> list[str]:
    got: list[str] = []
    sub = stream.subscribe()
    async for e in sub:
        got.append(e.cursor)
        if len(got) == n:
            break
    await sub.aclose()
    return got


async def test_unavailable_a_4008_and_a_restart_resume_without_repeats_or_reordering():
    fake = Fake([])

    async def first(ws: ServerConnection) -> None:
        await fake.ready(ws)
        await fake.subscribe(ws)
        await ws.send(dump_frame(ErrorFrame(id="keen-client", code="unavailable")))
        await fake.subscribe(ws)
        await ws.send(subscribed("10-1"))
        await ws.send(event("10-2"))
        await ws.send(event("10-3"))
        await ws.close(4008, "too slow; resume with since=10-3")

    async def second(ws: ServerConnection) -> None:
        await fake.ready(ws)
        await fake.subscribe(ws)
        await ws.send(subscribed("11-0"))
        for cursor in ("10-2", "10-3", "11-9", "11-10"):  # two repeats, then 9 < 10 as numbers
            await ws.send(event(cursor))
        await ws.close(1012)

    async def third(ws: ServerConnection) -> None:
        await fake.ready(ws)
        await fake.subscribe(ws)
        await ws.send(subscribed("11-10"))
        await ws.send(event("9-99"))  # older: dropped
        await ws.send(event("12-1"))
        await ws.wait_closed()

    fake.scripts = [first, second, third]
    async with fake_hub(fake) as url, StreamClient(url, token="t", backoff_initial=0.01) as stream:
        got = await asyncio.wait_for(take(stream, 5), 10)
    assert got == ["10-2", "10-3", "11-9", "11-10", "12-1"]
    assert [f.get("since") for f in fake.subscribes] == [None, None, "10-3", "11-10"]
    assert fake.tokens == ["Bearer t"] * 3


async def test_a_token_expiring_while_connected_is_refreshed_once_from_the_provider():
    fake = Fake([])
    tokens = iter(["a", "b", "c"])

    async def expires(ws: ServerConnection) -> None:
        await fake.ready(ws)
        await fake.subscribe(ws)
        await ws.send(subscribed("5-0"))
        await ws.send(event("5-1"))
        await ws.close(4004, "token expired")

    async def works(ws: ServerConnection) -> None:
        await fake.ready(ws)
        await fake.subscribe(ws)
        await ws.send(subscribed("5-1"))
        await ws.send(event("5-2"))
        await ws.wait_closed()

    fake.scripts = [expires, works]
    async with (
        fake_hub(fake) as url,
        StreamClient(url, token_provider=lambda: next(tokens), backoff_initial=0.01) as stream,
    ):
        assert await asyncio.wait_for(take(stream, 2), 10) == ["5-1", "5-2"]
    assert fake.tokens == ["Bearer a", "Bearer b"]

    # With a fixed token there is nothing to refresh: TokenExpired.
    fake2 = Fake([expires])
    async with fake_hub(fake2) as url, StreamClient(url, token="t") as stream:
        with pytest.raises(TokenExpired):
            await asyncio.wait_for(take(stream, 2), 10)
    assert len(fake2.tokens) == 1


def test_cursors_compare_as_integer_pairs():
    assert parse_cursor("11-10") > parse_cursor("11-9") > parse_cursor("9-99")
    with pytest.raises(ValueError):
        parse_cursor("11_10")
    with pytest.raises(ValueError):
        StreamClient("ws://x/ws", token="t").subscribe(since="nope")


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_the_token_provider_may_be_plain_or_async_and_is_asked_at_every_connection(
    kind: str,
):
    fake = Fake([])
    issued = iter(["a", "b"])

    async def closes(ws: ServerConnection) -> None:
        await fake.ready(ws)
        await fake.subscribe(ws)
        await ws.send(subscribed("3-0"))
        await ws.send(event("3-1"))
        await ws.close(1012)

    async def stays(ws: ServerConnection) -> None:
        await fake.ready(ws)
        await fake.subscribe(ws)
        await ws.send(subscribed("3-1"))
        await ws.send(event("3-2"))
        await ws.wait_closed()

    def plain() -> str:
        return next(issued)

    async def coroutine() -> str:
        return next(issued)

    fake.scripts = [closes, stays]
    provider = plain if kind == "sync" else coroutine
    async with (
        fake_hub(fake) as url,
        StreamClient(url, token_provider=provider, backoff_initial=0.01) as stream,
    ):
        assert await asyncio.wait_for(take(stream, 2), 10) == ["3-1", "3-2"]
    assert fake.tokens == ["Bearer a", "Bearer b"]


async def test_a_frame_that_is_not_the_protocol_is_a_typed_error_not_a_retry():
    fake = Fake([])

    async def garbled(ws: ServerConnection) -> None:
        await fake.ready(ws)
        await fake.subscribe(ws)
        await ws.send(subscribed("3-0"))
        await ws.send(json.dumps({"type": "event", "cursor": "3-1", "version": "new"}))
        await ws.wait_closed()

    fake.scripts = [garbled]
    async with fake_hub(fake) as url, StreamClient(url, token="t") as stream:
        with pytest.raises(UnexpectedFrame):
            await asyncio.wait_for(take(stream, 1), 10)
    assert len(fake.tokens) == 1


def _typed(cursor: str, event_type: str, version: int, **fields: Any) -> Event:
    frame = json.loads(event(cursor))
    return Event.model_validate({**frame, "event_type": event_type, "version": version, **fields})


def test_latest_by_entity_keeps_the_highest_version_of_each_session_and_account():
    s1, s2, account = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    latest = LatestByEntity()
    newer = _typed("9-12", "session.progress", 12, session_id=str(s1))
    older = _typed("10-11", "session.progress", 11, session_id=str(s1))  # overlapping tx
    other = _typed("10-13", "session.created", 13, session_id=str(s2))
    charge = _typed(
        "10-14", "credit.usage", 14, session_id=str(s1), data={"account_id": str(account)}
    )
    assert latest.update(newer)
    assert not latest.update(older)  # a later cursor, an older state: ignored
    assert not latest.update(newer)  # the same version again
    assert latest.update(other) and latest.update(charge)
    assert latest.session(s1) == newer
    assert latest.session(str(s2)) == other
    assert latest.account(account) == charge  # a charge is its account's, not its session's
    assert latest.session(uuid.uuid4()) is None
    assert list(latest) == [newer, other, charge]
    assert not latest.update(_typed("11-1", "session.progress", 1))  # no session id
    latest.clear()
    assert len(latest) == 0 and latest.update(older)
