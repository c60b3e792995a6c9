"""Hostile and broken clients at the socket level: strangers that never finish a handshake, too
many sockets from one address or overall, and authenticated clients that stop reading.

Real hub, real sockets. Strangers connect from other loopback addresses (all of 127.0.0.0/8 is
loopback on Linux) so the per-address cap can tell them from the legitimate 127.0.0.1 clients.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from keen_stream.dal.database import KeenDatabase
from tests.integration.hubkit import Hub, open_client, running_hub, stream_token, wait_for


def port_of(hub: Hub) -> int:
    return int(hub.url.rsplit(":", 1)[1].split("/")[0])


async def raw_socket(
    hub: Hub, source: str = "127.0.0.2", payload: bytes = b"", rcvbuf: int | None = None
) -> socket.socket:
    """A TCP connection to the hub from ``source``, after sending ``payload`` (maybe nothing)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port_of(hub)))
    if payload:
        await loop.sock_sendall(sock, payload)
    return sock


def is_closed(sock: socket.socket) -> bool:
    """True once the hub closed or cut the connection (whatever it sent before is discarded)."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


async def wait_closed(socks: list[socket.socket], within: float, what: str) -> float:
    """Wait until every socket is closed by the hub; returns how long that took."""
    start = time.monotonic()
    open_ = list(socks)
    while open_:
        open_ = [s for s in open_ if not is_closed(s)]
        if open_ and time.monotonic() - start > within:
            raise AssertionError(f"{len(open_)} of {len(socks)} {what} still open after {within}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def upgrade_request(path: str = "/ws") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def metrics_text(hub: Hub) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(hub.http + "/metrics")).text


async def new_session(db: KeenDatabase, user: Any, key: str) -> Any:
    return await db.sessions.create_session(
        user.id, session_handle=key, vision="v", working_directory="/w", git_branch="main"
    )


# --- 4: timeouts and caps ----------------------------------------------------------------------
async def test_silent_and_half_sent_connections_are_cut_after_the_handshake_timeout(
    db, fresh_dsn, alice
):
    async with running_hub(fresh_dsn, hub_handshake_timeout=1.0) as hub:
        silent = [await raw_socket(hub) for _ in range(60)]
        half_upgrade = [
            await raw_socket(hub, payload=upgrade_request()[:-2]) for _ in range(30)
        ]  # all headers but the final empty line
        half_get = [
            await raw_socket(hub, payload=b"GET /healthz HTTP/1.1\r\nHost: h") for _ in range(30)
        ]
        strangers = silent + half_upgrade + half_get
        assert not any(is_closed(s) for s in strangers[-5:])  # not before the timeout
        # Meanwhile a client that completes its handshake is served.
        c = await open_client(hub.url, await stream_token(db, alice.id))
        await wait_closed(strangers, within=6.0, what="half-open connections")
        guard = hub.app.guard
        assert guard is not None
        await wait_for(lambda: guard.open == 1, "only the authenticated client left")
        assert guard.stats.handshake_timeouts == len(strangers)
        await c.send({"type": "ping", "id": 1})
        assert (await c.expect("pong"))["id"] == 1
        assert "keen_hub_handshake_timeouts_total 120.0" in await metrics_text(hub)
        await c.close()
        close_all(strangers)


async def test_a_request_the_hub_is_slow_to_answer_is_not_cut(fresh_dsn):
    async with running_hub(fresh_dsn, hub_handshake_timeout=0.3) as hub:
        pool = hub.db.pool
        held = [await pool.acquire() for _ in range(pool.get_max_size())]
        async with httpx.AsyncClient() as http:
            asking = asyncio.create_task(http.get(hub.http + "/healthz"))
            await asyncio.sleep(1.0)  # /healthz waits for a pooled connection meanwhile
            for conn in held:
                await pool.release(conn)
            health = await asking
        assert health.status_code == 200
        assert hub.app.guard is not None and hub.app.guard.stats.handshake_timeouts == 0


async def test_a_websocket_that_never_authenticates_nor_reads_is_closed_in_bounded_time(
    fresh_dsn,
):
    async with running_hub(
        fresh_dsn, hub_auth_timeout=0.5, hub_close_timeout=0.5, hub_handshake_timeout=5.0
    ) as hub:
        # Handshake complete, then silence: no auth frame, and it never reads the hub's close.
        socks = [await raw_socket(hub, payload=upgrade_request(), rcvbuf=4096) for _ in range(20)]
        # Bounded by the auth timeout plus the close grace (twice: the close frame waits for
        # the peer's echo, then an unflushed socket is cut), not uvicorn's fixed 10 s.
        took = await wait_closed(socks, within=3.5, what="unauthenticated WebSockets")
        assert took >= 0.4  # not before the auth timeout (0.5 s after each upgrade)
        guard = hub.app.guard
        assert guard is not None
        await wait_for(lambda: guard.open == 0, "every socket released")
        assert hub.service.stats.auth_failures == 20
        close_all(socks)


async def test_a_stranger_at_the_per_address_cap_cannot_keep_a_legitimate_client_out(
    db, fresh_dsn, alice
):
    async with running_hub(
        fresh_dsn,
        hub_handshake_timeout=60.0,
        hub_max_connections_per_address=20,
        hub_max_unauthenticated=100,
    ) as hub:
        held = [await raw_socket(hub, "127.0.0.2") for _ in range(20)]
        over = [await raw_socket(hub, "127.0.0.2") for _ in range(15)]
        await wait_closed(over, within=5.0, what="connections over the per-address cap")
        assert not any(is_closed(s) for s in held)

        # The legitimate client from 127.0.0.1 connects, authenticates and gets its events.
        session = await new_session(db, alice, "s")
        c = await open_client(hub.url, await stream_token(db, alice.id))
        await c.subscribe(sessions=[str(session.id)])
        await db.sessions.update_progress(alice.id, "s", iterations=1)
        got = await c.events(1)
        assert got[0]["session_id"] == str(session.id)
        assert not any(is_closed(s) for s in held)  # the stranger's sockets are still held

        guard = hub.app.guard
        assert guard is not None
        assert guard.open == 21 and guard.unauthenticated == 20
        assert guard.stats.refused["address"] == 15
        async with httpx.AsyncClient() as http:
            health = (await http.get(hub.http + "/healthz")).json()
        assert health["sockets"]["open"] >= 21
        assert health["sockets"]["refused"]["address"] == 15
        text = await metrics_text(hub)
        assert 'keen_hub_sockets_refused_total{cap="address"} 15.0' in text
        close_all(held + over)
        await wait_for(lambda: guard.open == 1, "the stranger's sockets released")
        await c.close()


async def test_connections_over_the_caps_are_refused_and_connected_clients_keep_their_service(
    db, fresh_dsn, alice
):
    async with running_hub(
        fresh_dsn,
        hub_handshake_timeout=60.0,
        hub_max_connections=6,
        hub_max_unauthenticated=3,
        hub_max_connections_per_address=0,  # off: only the overall caps here
    ) as hub:
        token = await stream_token(db, alice.id)
        clients = [await open_client(hub.url, token) for _ in range(4)]
        for c in clients:
            await c.subscribe()
        # 4 clients + 2 strangers fill the overall cap.
        first = [await raw_socket(hub, "127.0.0.3") for _ in range(4)]
        await wait_closed(first[2:], within=5.0, what="connections over the overall cap")
        assert not any(is_closed(s) for s in first[:2])
        guard = hub.app.guard
        assert guard is not None
        assert guard.open == 6 and guard.unauthenticated == 2
        # Clients leave; strangers may still hold no more than 3 unauthenticated sockets.
        await clients.pop().close()
        await wait_for(lambda: guard.open == 5, "a client's slot freed")
        second = [await raw_socket(hub, "127.0.0.4")]
        await clients.pop().close()
        await wait_for(lambda: guard.open == 5, "another client's slot freed")
        second += [await raw_socket(hub, "127.0.0.4") for _ in range(2)]
        await wait_closed(second[1:], within=5.0, what="connections over the stranger cap")
        assert not any(is_closed(s) for s in first[:2] + second[:1])
        assert guard.open == 5 and guard.unauthenticated == 3
        assert guard.stats.refused == {"address": 0, "total": 2, "unauthenticated": 2}

        # The authenticated clients are undisturbed: they get every event.
        await new_session(db, alice, "s")
        for _ in range(5):
            await db.sessions.update_progress(alice.id, "s", iterations=1)
        for c in clients:
            got = await c.events(6)
            assert [e["data"]["iteration_count"] for e in got] == [0, 1, 2, 3, 4, 5]

        # Once strangers go, a legitimate client connects again.
        close_all(first + second)
        await wait_for(lambda: guard.open == 2, "strangers released")
        late = await open_client(hub.url, token)
        await late.send({"type": "ping", "id": "late"})
        assert (await late.expect("pong"))["id"] == "late"
        for c in [*clients, late]:
            await c.close()


# --- 10: a client that stops reading --------------------------------------------------------
#: Events per burst for the big backlog (~0.8 KB each: a few bursts pass the kernel's ~4 MB).
BURST = 1500


async def paused_client(hub: Hub, token: str, subscription: dict[str, Any], rcvbuf: int) -> Any:
    """A websockets client that authenticates and subscribes, then never reads again: its
    library queue holds one message and the kernel's receive buffer is small."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port_of(hub)))
    ws = await connect(hub.url, sock=sock, max_queue=1, max_size=2**22, ping_interval=None)
    await ws.send(json.dumps({"type": "auth", "token": token}))
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready"
    await ws.send(json.dumps({"type": "subscribe", **subscription}))
    assert json.loads(await ws.recv())["type"] == "subscribed"
    return ws, ready["connection_id"]


async def read_until_closed(ws: Any) -> tuple[list[dict[str, Any]], int | None, str | None]:
    """Everything the client still gets, then how it ended (code and reason of the hub's close
    frame, or None when the socket was cut before one arrived)."""
    frames: list[dict[str, Any]] = []
    try:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        return frames, (rcvd.code if rcvd else None), (rcvd.reason if rcvd else None)


async def test_a_client_that_stops_reading_is_closed_as_too_slow_and_its_socket_released(
    db, fresh_dsn, owner_conn, alice
):
    ping = 2.0
    async with running_hub(
        fresh_dsn,
        hub_ws_ping_interval=ping,
        hub_close_timeout=0.5,
        # Far above what this test queues: the close must come from the keepalive, the way a
        # backlog that kernel buffers absorb reaches no send-buffer limit.
        hub_send_buffer_limit=256 * 1024 * 1024,
    ) as hub:
        token = await stream_token(db, alice.id)
        few = await new_session(db, alice, "few")
        many = await new_session(db, alice, "many")
        fast = await open_client(hub.url, token)
        await fast.subscribe(sessions=[str(few.id), str(many.id)])
        # Small backlog: it fits in the kernel's buffers, so the close frame follows it there.
        small, small_id = await paused_client(hub, token, {"sessions": [str(few.id)]}, 65536)
        # Big backlog: more than the kernel's buffers hold (about 4 MB on loopback); the rest
        # waits in the hub's buffer for this socket.
        big, big_id = await paused_client(hub, token, {"sessions": [str(many.id)]}, 4096)
        clients = hub.service.fanout.clients

        async def burst(session_id: Any, n: int) -> None:
            await owner_conn.execute(
                f"DO $$ BEGIN FOR i IN 1..{n} LOOP UPDATE agent_sessions SET iteration_count ="
                f" iteration_count + 1 WHERE id = '{session_id}'; END LOOP; END $$"
            )

        # Events keep flowing while the two do not read; the reading client gets every burst
        # promptly all along, through both keepalive timeouts.
        lags = []
        bursts = 0
        deadline = time.monotonic() + 4 * ping + 5
        while small_id in clients or big_id in clients or bursts < 3:
            assert time.monotonic() < deadline, "the non-reading clients were not closed"
            await burst(few.id, 1)
            await burst(many.id, BURST)
            bursts += 1
            start = time.monotonic()
            await fast.events(BURST + 1, within=10)
            lags.append(time.monotonic() - start)
        assert max(lags) < 2.0, lags

        # Both were closed by the keepalive as too slow, and their sockets let go of although
        # neither has read anything since: the hub does not wait for a backlog to drain.
        guard = hub.app.guard
        assert guard is not None
        await wait_for(lambda: guard.open == 1, "their sockets released")
        assert guard.stats.keepalive_timeouts == 2
        assert hub.service.stats.slow_consumers_closed == 2
        await hub.service.recorder.flush()
        for cid in (small_id, big_id):
            row = await db.connections.get(cid)
            assert row.close_code == 4008, (row.close_code, row.close_reason)
            assert row.close_reason.startswith("too slow; resume with since=")
            assert row.connection_status == "timed_out"

        # Reading again: the small one gets its backlog, then the 4008 naming its last event.
        frames, code, reason = await read_until_closed(small)
        events = [f for f in frames if f["type"] == "event"]
        assert events and code == 4008
        assert reason == f"too slow; resume with since={events[-1]['cursor']}"

        # The big one gets what the kernel held (in order), then the cut; resuming from the
        # last event it saw brings exactly the rest.
        total = bursts * BURST
        frames, code, reason = await read_until_closed(big)
        events = [f for f in frames if f["type"] == "event"]
        counts = [e["data"]["iteration_count"] for e in events]
        assert 0 < len(counts) < total
        assert counts == list(range(1, len(counts) + 1))
        if code is not None:
            assert code == 4008 and reason is not None
            assert reason.endswith(f"since={events[-1]['cursor']}")
        resumed = await open_client(hub.url, token)
        sub = await resumed.subscribe(sessions=[str(many.id)], since=events[-1]["cursor"])
        assert sub["recovered"] is True
        rest = await resumed.events(total - len(counts), within=30)
        assert [e["data"]["iteration_count"] for e in rest] == list(
            range(len(counts) + 1, total + 1)
        )
        await resumed.close()
        await fast.close()
