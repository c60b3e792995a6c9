"""Fan-out: who receives an event, and writing it to many sockets cheaply.

Hot path (``FanOut.publish``): for each released event, find the candidate clients through three
indexes (by user for ``mine``, by session for ``sessions``, the ``all`` set for admins), check
the authorization rule again (the event's user is the client's user, or the client is an admin:
the same rule as RLS), check the event-type filter, and hand the client the frame. The frame is
encoded once per event, as the complete WebSocket frame bytes; on uvicorn's sans-I/O protocol
those bytes go straight to each client's transport (``TransportSender``), skipping the ASGI
message dict and per-client re-encoding (that is where per-client ``send_text`` loses 57-68%
against ``websockets.broadcast``; docs/performance.md).

Backpressure: a client's queue is its transport write buffer, bounded by
``hub_send_buffer_limit`` bytes. A client over it is closed (4008) with its last delivered cursor
in the close reason, so it can resume with ``since``; nothing waits on it, so one slow client
never delays the others.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import h11

from keen_stream.dal.models.events import ORIGIN, Cursor, StreamEvent
from keen_stream.hub.protocol import (
    CloseCode,
    close_frame,
    event_frame,
    sse_message,
    too_slow_reason,
    ws_text_frame,
)
from keen_stream.hub.sockinfo import tcp_state

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class HubStats:
    """Plain counters (read by the Prometheus collector at scrape time, not on the hot path)."""

    connections_total: int = 0
    events_received: int = 0
    events_delivered: int = 0
    events_dropped: int = 0
    slow_consumers_closed: int = 0
    frames_refused: int = 0
    replayed: int = 0
    auth_failures: int = 0


class Frame:
    """One server frame, encoded once: ``wire`` is the whole WebSocket frame; ``sse()`` the
    server-sent event (encoded on first use, once for every ``/events`` client).

    ``resume``: for a frame that is not an event, the SSE ``id`` it sets (the position a
    browser's EventSource resumes from after it; keen_stream/hub/sse.py)."""

    __slots__ = ("_sse", "cursor", "resume", "text", "wire")

    def __init__(self, text: str, cursor: Cursor | None = None, resume: Cursor | None = None):
        self.text = text
        self.wire = ws_text_frame(text.encode())
        self.cursor = cursor
        self.resume = resume
        self._sse: bytes | None = None

    def sse(self) -> bytes:
        data = self._sse
        if data is None:
            if self.cursor is not None:  # an event: a plain message, its cursor the SSE id
                data = sse_message(self.text, event_id=str(self.cursor))
            else:
                kind = json.loads(self.text)["type"]
                resume = None if self.resume is None else str(self.resume)
                data = sse_message(self.text, event=kind, event_id=resume)
            self._sse = data
        return data


# --- senders: how bytes reach one client ---------------------------------------------------
class TransportSender:
    """Writes pre-encoded frames to uvicorn's websockets-sansio protocol's transport.

    Safe beside uvicorn's own writes: both write whole frames from the event loop thread, and we
    stop writing once uvicorn has sent (or received) a close frame.
    """

    fast = True
    __slots__ = ("_proto", "_send")

    def __init__(self, proto: Any, send: Callable[..., Any]) -> None:
        self._proto = proto
        self._send = send

    @staticmethod
    def usable(proto: Any) -> bool:
        return all(hasattr(proto, a) for a in ("transport", "conn", "close_sent"))

    def write(self, frame: Frame) -> bool:
        proto = self._proto
        transport = proto.transport
        if proto.close_sent or transport is None or transport.is_closing():
            return False
        transport.write(frame.wire)
        return True

    def write_many(self, frames: list[Frame]) -> bool:
        """Several frames in one write (one system call instead of one per frame)."""
        proto = self._proto
        transport = proto.transport
        if proto.close_sent or transport is None or transport.is_closing():
            return False
        transport.write(b"".join([frame.wire for frame in frames]))
        return True

    def buffered(self) -> int:
        transport = self._proto.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def diagnostics(self) -> dict[str, Any]:
        """The socket's state, for debug logs: who is not moving when a replay waits."""
        proto = self._proto
        transport = proto.transport
        info: dict[str, Any] = {
            "buffered": self.buffered(),
            "closing": transport is None or transport.is_closing(),
            "close_sent": proto.close_sent,
            "read_paused": getattr(proto, "read_paused", None),
            "writable": getattr(getattr(proto, "writable", None), "is_set", lambda: None)(),
            "queued": getattr(getattr(proto, "queue", None), "qsize", lambda: None)(),
        }
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            info.update(tcp_state(sock))
        return info

    async def close(self, code: int, reason: str, grace: float) -> None:
        try:
            await asyncio.wait_for(
                self._send({"type": "websocket.close", "code": code, "reason": reason}), grace
            )
        except Exception:  # a stuck or vanished peer: cut it
            self.abort()

    def abort(self) -> None:
        transport = self._proto.transport
        if transport is not None:
            transport.abort()


class AsgiSender:
    """Portable path for ASGI servers other than uvicorn's sans-I/O one: a bounded queue and a
    writer task per client, each frame a ``websocket.send`` message."""

    fast = False
    __slots__ = ("_buffered", "_queue", "_send", "_task", "_wake")

    def __init__(self, send: Callable[..., Any]) -> None:
        self._send = send
        self._queue: collections.deque[tuple[str, int]] = collections.deque()
        self._buffered = 0
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._writer())

    def write(self, frame: Frame) -> bool:
        self._queue.append((frame.text, len(frame.wire)))
        self._buffered += len(frame.wire)
        self._wake.set()
        return True

    def write_many(self, frames: list[Frame]) -> bool:
        for frame in frames:
            self.write(frame)
        return True

    def buffered(self) -> int:
        return self._buffered

    def diagnostics(self) -> dict[str, Any]:
        return {"buffered": self._buffered, "queued": len(self._queue)}

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                text, size = self._queue.popleft()
                self._buffered -= size
                await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str, grace: float) -> None:
        self._task.cancel()
        try:
            await asyncio.wait_for(
                self._send({"type": "websocket.close", "code": code, "reason": reason}), grace
            )
        except Exception:  # the peer is gone or stuck; nothing more to do
            logger.debug("close of a stuck ASGI client timed out")

    def abort(self) -> None:
        self._task.cancel()


class SseSender:
    """Server-sent events (``/events``): the stream's body chunks go out through the ASGI
    ``send`` from a writer task, several frames per chunk when they queue up.

    ``buffered()`` counts what is queued here plus what the transport holds, so the fan-out's
    send-buffer limit bounds an SSE client as it bounds a WebSocket one; uvicorn's ``send``
    waits while the transport is over its high-water mark, so a client that stops reading
    leaves the chunks here, where the limit sees them."""

    fast = False
    __slots__ = (
        "_buffered",
        "_chunks",
        "_end",
        "_send",
        "_sending_since",
        "_task",
        "_transport",
        "_wake",
        "finished",
    )

    def __init__(self, send: Callable[..., Any], transport: Any) -> None:
        self._send = send
        self._transport = transport
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._end = False
        #: When the chunk being sent started waiting (None: not sending).
        self._sending_since: float | None = None
        self._wake = asyncio.Event()
        #: Set when the response has ended (closed by the hub, or cut).
        self.finished = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._writer())

    def write(self, frame: Frame) -> bool:
        return self.write_raw(frame.sse())

    def write_many(self, frames: list[Frame]) -> bool:
        return self.write_raw(b"".join([frame.sse() for frame in frames]))

    def write_raw(self, data: bytes) -> bool:
        """Queue bytes of the event stream (a frame, a comment, a ``retry`` field)."""
        if self._end:
            return False
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake.set()
        return True

    def buffered(self) -> int:
        transport = self._transport
        held = transport.get_write_buffer_size() if transport is not None else 0
        return self._buffered + held

    def stalled_for(self) -> float:
        """How long the current chunk has waited for the client to read (0: not waiting)."""
        since = self._sending_since
        return 0.0 if since is None else time.monotonic() - since

    def diagnostics(self) -> dict[str, Any]:
        return {"buffered": self.buffered(), "queued": len(self._chunks)}

    async def _writer(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._chunks:
                    data = b"".join(self._chunks)
                    self._chunks.clear()
                    self._sending_since = time.monotonic()
                    await self._send(
                        {"type": "http.response.body", "body": data, "more_body": True}
                    )
                    self._sending_since = None
                    self._buffered -= len(data)
                if self._end:
                    await self._send(
                        {"type": "http.response.body", "body": b"", "more_body": False}
                    )
                    return
        except Exception as exc:  # the peer went away mid-write: nothing more to send
            logger.debug("event stream writer ended: %r", exc)
        finally:
            self.finished.set()

    async def close(self, code: int, reason: str, grace: float) -> None:
        """End the stream with a ``close`` event (queued behind what is already queued, like a
        WebSocket close frame); a client that does not take it all within ``grace`` is cut."""
        if not self._end:
            self.write_raw(sse_message(close_frame(code, reason), event="close"))
            self._end = True
            self._wake.set()
        try:
            await asyncio.wait_for(self.finished.wait(), grace)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        self._end = True
        self._task.cancel()
        self.finished.set()
        transport = self._transport
        if transport is not None:
            transport.abort()


class SseTransportSender:
    """Server-sent events on uvicorn's h11 protocol: each write is framed by the response's own
    h11 connection (its chunked encoding) and goes straight to the transport, from the event
    loop thread, as ``TransportSender`` writes WebSocket frames: no task wake-up or ASGI message
    per client per event (``SseSender`` costs about twice the hub CPU per delivery:
    docs/performance.md). The response's start and end still go through the ASGI ``send``.

    ``buffered()`` is the transport's write buffer, as for a WebSocket."""

    fast = True
    __slots__ = ("_cycle", "_end", "_paused_since", "_send", "finished")

    def __init__(self, cycle: Any, send: Callable[..., Any]) -> None:
        self._cycle = cycle
        self._send = send
        self._end = False
        self._paused_since: float | None = None
        self.finished = asyncio.Event()

    @staticmethod
    def usable(cycle: Any) -> bool:
        return isinstance(getattr(cycle, "conn", None), h11.Connection) and all(
            hasattr(cycle, a) for a in ("transport", "flow", "disconnected", "response_complete")
        )

    def write(self, frame: Frame) -> bool:
        return self.write_raw(frame.sse())

    def write_many(self, frames: list[Frame]) -> bool:
        return self.write_raw(b"".join([frame.sse() for frame in frames]))

    def write_raw(self, data: bytes) -> bool:
        cycle = self._cycle
        transport = cycle.transport
        if self._end or cycle.disconnected or cycle.response_complete or transport.is_closing():
            return False
        transport.write(cycle.conn.send(h11.Data(data=data)))
        return True

    def buffered(self) -> int:
        return int(self._cycle.transport.get_write_buffer_size())

    def stalled_for(self) -> float:
        """How long the transport has been over its high-water mark (the client not reading),
        as seen by successive calls (the heartbeats); 0 when it is not."""
        if not self._cycle.flow.write_paused:
            self._paused_since = None
            return 0.0
        now = time.monotonic()
        if self._paused_since is None:
            self._paused_since = now
        return now - self._paused_since

    def diagnostics(self) -> dict[str, Any]:
        cycle = self._cycle
        info: dict[str, Any] = {
            "buffered": self.buffered(),
            "paused": cycle.flow.write_paused,
            "disconnected": cycle.disconnected,
        }
        sock = cycle.transport.get_extra_info("socket")
        if sock is not None:
            info.update(tcp_state(sock))
        return info

    async def close(self, code: int, reason: str, grace: float) -> None:
        """The ``close`` event behind what was sent, then the response's end; a client that
        does not take them within ``grace`` is cut."""
        if self._end:
            return
        self.write_raw(sse_message(close_frame(code, reason), event="close"))
        self._end = True
        try:
            end = {"type": "http.response.body", "body": b"", "more_body": False}
            await asyncio.wait_for(self._send(end), grace)
        except Exception:  # a stuck or vanished peer: cut it
            self.abort()
        self.finished.set()

    def abort(self) -> None:
        self._end = True
        self._cycle.transport.abort()
        self.finished.set()


Sender = TransportSender | AsgiSender | SseSender | SseTransportSender
EventStreamSender = SseSender | SseTransportSender


def make_sse_sender(send: Callable[..., Any]) -> EventStreamSender:
    """The fastest way to write an event stream's body through this ``send``."""
    cycle = getattr(send, "__self__", None)
    if cycle is not None and SseTransportSender.usable(cycle):
        return SseTransportSender(cycle, send)
    transport = getattr(cycle, "transport", None)
    return SseSender(send, transport)


def make_sender(send: Callable[..., Any]) -> Sender:
    proto = getattr(send, "__self__", None)
    if proto is not None and TransportSender.usable(proto):
        return TransportSender(proto, send)
    return AsgiSender(send)


# --- clients and subscriptions -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Subscription:
    scope: str  # 'none', 'mine', 'sessions', 'all'
    sessions: frozenset[uuid.UUID] = frozenset()
    event_types: frozenset[str] | None = None  # None: every type

    def allows(self, event_type: str) -> bool:
        return self.event_types is None or event_type in self.event_types


NO_SUBSCRIPTION = Subscription("none")


class Client:
    """One authenticated connection as the fan-out sees it."""

    __slots__ = (
        "close_code",
        "close_reason",
        "closing",
        "connection_id",
        "is_admin",
        "last_cursor",
        "on_close",
        "pending",
        "sender",
        "subscription",
        "token_hash",
        "user_id",
    )

    def __init__(
        self,
        connection_id: str,
        user_id: uuid.UUID,
        is_admin: bool,
        sender: Sender,
        on_close: Callable[[Client, int, str], None],
        token_hash: str | None = None,
    ) -> None:
        self.connection_id = connection_id
        self.token_hash = token_hash
        self.user_id = user_id
        self.is_admin = is_admin
        self.sender = sender
        self.on_close = on_close
        self.subscription = NO_SUBSCRIPTION
        self.last_cursor: Cursor = ORIGIN
        # While a replay runs, live frames wait here (in order) instead of going out.
        self.pending: list[Frame] | None = None
        self.closing = False
        #: Set when the hub ends the connection (None: the peer closed it).
        self.close_code: int | None = None
        self.close_reason: str | None = None

    def may_see(self, event: StreamEvent) -> bool:
        """Authorization, re-checked at fan-out: the same rule as the RLS policies."""
        return self.is_admin or event.user_id == self.user_id

    def send(self, frame: Frame, limit: int) -> bool:
        """Queue ``frame``; a client over ``limit`` buffered bytes is closed as too slow."""
        if self.closing:
            return False
        cursor = frame.cursor
        if cursor is not None and cursor <= self.last_cursor:
            return True  # already sent (or covered by the client's resume point)
        if self.sender.buffered() > limit:
            self.close(CloseCode.TOO_SLOW, too_slow_reason(self.last_cursor))
            return False
        if not self.sender.write(frame):
            return False
        if cursor is not None:
            self.last_cursor = cursor
        return True

    def send_many(self, frames: list[Frame], limit: int) -> int:
        """``send`` for frames in cursor order, written together. Returns how many went out
        (or were already covered by the client's resume point)."""
        if self.closing:
            return 0
        last = self.last_cursor
        fresh = [f for f in frames if f.cursor is None or f.cursor > last]
        if not fresh:
            return len(frames)
        if self.sender.buffered() + sum(len(f.wire) for f in fresh) > limit:
            # Near the limit: frame by frame, so the client is closed exactly where one
            # frame at a time would close it (the limit stays a bound, not a bound plus a batch).
            sent = 0
            for frame in frames:
                if not self.send(frame, limit):
                    break
                sent += 1
            return sent
        if not self.sender.write_many(fresh):
            return len(frames) - len(fresh)  # those the resume point covered count as sent
        for frame in reversed(fresh):
            if frame.cursor is not None:
                self.last_cursor = frame.cursor
                break
        return len(frames)

    def close(self, code: int, reason: str) -> None:
        """Ask for this connection to end (idempotent); the connection task does the I/O."""
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        self.close_reason = _truncate_utf8(reason, 123)
        self.on_close(self, code, self.close_reason)


class FanOut:
    """The subscription indexes and the publish loop."""

    def __init__(self, stats: HubStats, *, send_buffer_limit: int, pending_limit: int) -> None:
        self.stats = stats
        self.limit = send_buffer_limit
        self.pending_limit = pending_limit
        self.clients: dict[str, Client] = {}
        self._by_user: dict[uuid.UUID, set[Client]] = {}
        self._by_session: dict[uuid.UUID, set[Client]] = {}
        self._all: set[Client] = set()
        #: The last published cursor: replays for new subscriptions end here.
        self.cursor: Cursor = ORIGIN

    # --- registry ---------------------------------------------------------------------------
    def add(self, client: Client) -> None:
        self.clients[client.connection_id] = client
        self.stats.connections_total += 1

    def remove(self, client: Client) -> None:
        self._unindex(client)
        self.clients.pop(client.connection_id, None)

    def subscribe(self, client: Client, subscription: Subscription) -> None:
        """Replace ``client``'s subscription. Authorization (admins only for ``all``, own or
        visible sessions) is the caller's job before this; fan-out re-checks per event."""
        self._unindex(client)
        client.subscription = subscription
        if subscription.scope == "mine":
            self._by_user.setdefault(client.user_id, set()).add(client)
        elif subscription.scope == "all":
            self._all.add(client)
        elif subscription.scope == "sessions":
            for sid in subscription.sessions:
                self._by_session.setdefault(sid, set()).add(client)

    def _unindex(self, client: Client) -> None:
        sub = client.subscription
        if sub.scope == "mine":
            _discard(self._by_user, client.user_id, client)
        elif sub.scope == "all":
            self._all.discard(client)
        elif sub.scope == "sessions":
            for sid in sub.sessions:
                _discard(self._by_session, sid, client)
        client.subscription = NO_SUBSCRIPTION

    @property
    def subscription_count(self) -> int:
        return sum(1 for c in self.clients.values() if c.subscription.scope != "none")

    # --- publishing -------------------------------------------------------------------------
    def publish(self, events: Sequence[StreamEvent]) -> None:
        """Deliver released events, in order, to every matching client.

        When one read released several events, each client gets all of its frames in one
        write: one system call per client per read instead of per event, for the clients that
        receive several events of a read (admin monitors, bursts of one session tree).
        """
        stats = self.stats
        limit = self.limit
        # Per client, its frames of this batch in order (dicts keep insertion order).
        batch: dict[Client, list[Frame]] | None = {} if len(events) > 1 else None
        for event in events:
            stats.events_received += 1
            targets = self._targets(event)
            frame: Frame | None = None
            for client in targets:
                if not client.subscription.allows(event.event_type) or not client.may_see(event):
                    continue
                if frame is None:
                    frame = Frame(event_frame(event), event.cursor)
                if client.pending is not None:
                    self._hold(client, frame)
                elif batch is not None:
                    queued = batch.get(client)
                    if queued is None:
                        batch[client] = [frame]
                    else:
                        queued.append(frame)
                elif client.send(frame, limit):
                    stats.events_delivered += 1
                else:
                    stats.events_dropped += 1
            self.cursor = event.cursor
        if batch:
            for client, frames in batch.items():
                if len(frames) == 1:
                    sent = 1 if client.send(frames[0], limit) else 0
                else:
                    sent = client.send_many(frames, limit)
                stats.events_delivered += sent
                stats.events_dropped += len(frames) - sent

    def _targets(self, event: StreamEvent) -> Iterable[Client]:
        mine = self._by_user.get(event.user_id)
        sessions: set[Client] | None = None
        if event.session_id is not None:
            sessions = self._by_session.get(event.session_id)
            if event.root_session_id is not None and event.root_session_id != event.session_id:
                roots = self._by_session.get(event.root_session_id)
                if roots:
                    sessions = sessions | roots if sessions else roots
        # A client sits in exactly one index (its scope), so the groups never overlap. No copy:
        # nothing changes the indexes while this synchronous loop runs (closing only flags).
        groups = [g for g in (mine, sessions, self._all) if g]
        if len(groups) == 1:
            return groups[0]
        return itertools.chain.from_iterable(groups)

    def _hold(self, client: Client, frame: Frame) -> None:
        pending = client.pending
        if pending is None:
            return
        if len(pending) >= self.pending_limit:
            self.stats.events_dropped += 1
            client.close(CloseCode.TOO_SLOW, too_slow_reason(client.last_cursor))
            return
        pending.append(frame)

    def hold(self, client: Client) -> Cursor:
        """Hold ``client``'s live frames from now on (in order, bounded by ``pending_limit``)
        instead of sending them; returns the cursor everything before them has reached."""
        client.pending = []
        return self.cursor

    def release(self, client: Client) -> None:
        """Send the frames held since :meth:`hold` (all newer than it), then go live."""
        held, client.pending = client.pending or [], None
        for frame in held:
            if frame.cursor is not None and frame.cursor <= client.last_cursor:
                continue
            if client.send(frame, self.limit):
                self.stats.events_delivered += 1

    def discard_held(self, client: Client) -> None:
        """Drop the frames held since :meth:`hold` (keep holding). For a resume: what was held
        matched the subscription being replaced, or lies beyond a replay that failed; sending
        it would move the client's cursor over events it has not received."""
        if client.pending is not None:
            self.stats.events_dropped += len(client.pending)
            client.pending = []


def _discard(index: dict[uuid.UUID, set[Client]], key: uuid.UUID, client: Client) -> None:
    group = index.get(key)
    if group is not None:
        group.discard(client)
        if not group:
            del index[key]


def _truncate_utf8(text: str, limit: int) -> str:
    """A close reason may hold at most 123 bytes of UTF-8 (RFC 6455 section 5.5)."""
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode(errors="ignore")
