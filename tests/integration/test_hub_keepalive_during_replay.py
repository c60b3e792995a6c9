"""A client that reads is never closed as "too slow" because the hub itself was busy.

uvicorn stops reading a WebSocket's socket while a received frame waits for the application
(flow control), and the hub handles a client's frames one at a time, a resume's whole replay
inside its ``subscribe``. A frame the client sends meanwhile (the ``ping`` docs/protocol.md
asks for every 30 s) therefore stops the reading of the protocol pongs that follow it, and the
keepalive rule (transport.py: no pong within ``KEEN_HUB_WS_PING_INTERVAL`` -> 4008) fires on a
client that answered every ping in time.
"""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.models.events import ORIGIN
from tests.integration.hubkit import open_client, running_hub, stream_token
from tests.integration.test_hub_resume import hook_replay
from tests.integration.test_hub_stream import new_session, step

PING = 0.5  # protocol ping interval and timeout of this hub
SLOW_REPLAY = 6 * PING  # a replay page that takes a while (a big page, a busy database)


async def test_a_client_that_pings_during_a_slow_replay_is_not_closed_as_too_slow(
    db: KeenDatabase, fresh_dsn: str, alice: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    await new_session(db, alice, "s")
    for _ in range(3):
        await step(db, alice, "s", 1)
    token = await stream_token(db, alice.id)
    async with running_hub(fresh_dsn, hub_ws_ping_interval=PING) as hub:
        c = await open_client(hub.url, token)  # websockets answers protocol pings as it reads

        async def slow(call: int) -> None:
            if call == 1:
                await asyncio.sleep(SLOW_REPLAY)

        hook_replay(hub, monkeypatch, slow)
        await c.send({"type": "subscribe", "id": "r", "since": str(ORIGIN)})
        await asyncio.sleep(PING / 5)
        await c.send({"type": "ping", "id": "keepalive"})  # what the protocol asks clients for
        try:
            sub = await c.expect("subscribed", within=SLOW_REPLAY + 5)
            events = await c.events(4)  # session.created + three progress reports
            pong = await c.expect("pong")
        except ConnectionClosed as closed:
            raise AssertionError(f"closed: {closed.rcvd}") from None
        assert sub["recovered"] is True
        assert [e["event_type"] for e in events[:1]] == ["session.created"]
        assert pong["id"] == "keepalive"
        assert hub.app.guard is not None and hub.app.guard.stats.keepalive_timeouts == 0
        await c.close()
