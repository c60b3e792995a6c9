"""A ``since`` replay goes out at the client's pace (docs/architecture.md, "Fan-out").

Found while building the fault scenario (tests/faults): a replay was written in 1,000-event
pages and waits for the client only between pages, once more than half of the send buffer is
queued; a page bigger than half the buffer then passes the limit, and the hub closes a client
that merely paused reading as too slow.
"""

from __future__ import annotations

import asyncio
import socket
from decimal import Decimal

from websockets.asyncio.client import connect

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.hub.fanout import TransportSender
from tests.integration.credits_support import fund
from tests.integration.hubkit import running_hub, stream_token, wait_for

LIMIT = 256 * 1024
#: More than two pages, so the replay has to wait for the client at least once.
EVENTS = 2500


async def test_a_client_that_pauses_during_its_replay_is_waited_for_not_closed_as_too_slow(
    db: KeenDatabase, fresh_dsn: str, alice: User
) -> None:
    await fund(db, alice, "100")
    async with running_hub(fresh_dsn, hub_send_buffer_limit=LIMIT) as hub:
        since = await db.events.head()
        description = "call " + "x" * 195  # full-size payloads: ~740-byte frames, ~1.8 MB
        await asyncio.gather(
            *(
                db.credits.deduct_credits(alice.id, Decimal("0.001"), None, description)
                for _ in range(EVENTS)
            )
        )
        head = await db.events.head()
        await wait_for(lambda: hub.service.fanout.cursor >= head, "the node published them")
        port = int(hub.url.rsplit(":", 1)[1].split("/")[0])
        sock = socket.create_connection(("127.0.0.1", port))
        # Small kernel buffers on both ends (a slow network path holds little in flight), so
        # what the client does not read stays in the hub's own send buffer.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        token = await stream_token(db, alice.id)
        ws = await connect(
            hub.url,
            sock=sock,
            max_queue=4,
            proxy=None,
            compression=None,
            additional_headers={"Authorization": f"Bearer {token}"},
        )
        await wait_for(lambda: len(hub.service.fanout.clients) == 1, "the hub's client")
        client = next(iter(hub.service.fanout.clients.values()))
        assert isinstance(client.sender, TransportSender)
        server_socket = client.sender._proto.transport.get_extra_info("socket")
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        await ws.recv()  # ready
        await ws.send(f'{{"type": "subscribe", "since": "{since}"}}')
        # The client reads nothing for a second: far less than the replay's patience (30 s).
        await asyncio.sleep(1.0)
        assert not client.closing, (client.close_code, client.close_reason)

        async def count_events() -> int:
            received = 0
            async for message in ws:
                if '"type":"event"' in str(message):
                    received += 1
                    if received == EVENTS:
                        break
            return received

        assert await asyncio.wait_for(count_events(), 30) == EVENTS
        await ws.close()
