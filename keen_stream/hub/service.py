"""One hub node: the fan-out, the listener, connection bookkeeping and the maintenance loops.

``HubService.start()`` registers the node, starts the listener and the loops; ``stop()`` closes
every client with 1001 (going away), writes the last batch and marks the node stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models.connections import (
    ConnectionBatch,
    ConnectionClosed,
    ConnectionOpened,
    ConnectionStatus,
    SubscriptionChanged,
)
from keen_stream.errors import KeenError
from keen_stream.hub.fanout import Client, FanOut, HubStats
from keen_stream.hub.listener import EventListener
from keen_stream.hub.protocol import STATUS_CLOSE, CloseCode, too_slow_reason
from keen_stream.hub.transport import guarded_protocol
from keen_stream.settings import Settings

logger = logging.getLogger(__name__)


class ConnectionRecorder:
    """Collects connection-row changes in memory; ``flush()`` writes them in one transaction.

    A failed flush keeps its changes (merged with newer ones) for the next attempt.
    """

    def __init__(self, db: KeenDatabase) -> None:
        self._db = db
        self._opened: dict[str, ConnectionOpened] = {}
        self._subs: dict[str, SubscriptionChanged] = {}
        self._pings: dict[str, datetime] = {}
        self._closed: dict[str, ConnectionClosed] = {}
        self.flushes = 0

    def opened(self, record: ConnectionOpened) -> None:
        self._opened[record.connection_id] = record

    def subscription(self, record: SubscriptionChanged) -> None:
        self._subs[record.connection_id] = record

    def ping(self, connection_id: str, at: datetime) -> None:
        self._pings[connection_id] = at

    def closed(self, record: ConnectionClosed) -> None:
        self._closed[record.connection_id] = record

    @property
    def pending(self) -> int:
        return len(self._opened) + len(self._subs) + len(self._pings) + len(self._closed)

    async def flush(self) -> None:
        opened, subs, pings, closed = self._opened, self._subs, self._pings, self._closed
        self._opened, self._subs, self._pings, self._closed = {}, {}, {}, {}
        batch = ConnectionBatch(
            opened=tuple(opened.values()),
            subscriptions=tuple(subs.values()),
            pings=tuple(pings.items()),
            closed=tuple(closed.values()),
        )
        try:
            await self._db.connections.flush(batch)
        except KeenError as exc:
            if not exc.retryable:
                # Writing it again would fail the same way, every interval, with everyone's
                # newer records queued behind it: drop this batch (it is only bookkeeping).
                count = len(opened) + len(subs) + len(pings) + len(closed)
                logger.error("dropped %d connection records that cannot be written: %s", count, exc)
                raise
            # Keep what failed, without overwriting anything newer.
            self._opened = {**opened, **self._opened}
            self._subs = {**subs, **self._subs}
            self._pings = {**pings, **self._pings}
            self._closed = {**closed, **self._closed}
            raise
        self.flushes += 1


class HubService:
    """Everything one hub node runs besides the HTTP server itself."""

    def __init__(self, db: KeenDatabase, settings: Settings, *, listen_address: str | None = None):
        self.db = db
        self.settings = settings
        self.listen_address = listen_address
        self.stats = HubStats()
        self.fanout = FanOut(
            self.stats,
            send_buffer_limit=settings.hub_send_buffer_limit,
            pending_limit=settings.hub_pending_limit,
        )
        self.listener = EventListener(db.events, self.fanout.publish, settings)
        self.recorder = ConnectionRecorder(db)
        self.node_id: uuid.UUID | None = None
        self.started_at = time.time()
        self._tasks: list[asyncio.Task[Any]] = []
        self._closing: set[asyncio.Task[Any]] = set()
        #: Connections closed because they stopped answering keepalive pings.
        self._unresponsive: set[str] = set()
        self.stopping = False
        self.maintenance_errors = 0

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        # The fan-out's cursor and the listener's start at the same place, the head of the
        # stream, before any client connects: `ready` and `pong` report a real position, and a
        # resume from before it is replayed (a fan-out cursor left at the origin took every
        # `since` for one from a node further ahead, and replayed nothing).
        head = await self.db.events.head()
        self.fanout.cursor = head
        self.listener.cursor = head
        node = await self.db.connections.register_node(self.listen_address)
        self.node_id = node.id
        s = self.settings
        self._tasks = [
            asyncio.create_task(self.listener.run(), name="hub-listener"),
            self._every(s.hub_flush_interval, self.recorder.flush, "flush"),
            self._every(s.hub_heartbeat_interval, self._heartbeat, "heartbeat"),
            self._every(s.hub_node_stale_after / 2, self._reap, "reap"),
            self._every(s.hub_token_recheck_interval, self.recheck_tokens, "token recheck"),
            self._every(s.event_prune_interval, self._prune, "prune"),
            self._every(s.session_sweep_interval, self._sweep_sessions, "session sweep"),
            self._every(s.hold_sweep_interval, self._expire_holds, "hold sweep"),
            self._every(
                s.dashboard_refresh_interval, self.db.analytics.refresh_dashboard, "dashboard"
            ),
            self._every(s.analytics_rollup_interval, self.db.analytics.rollup, "analytics rollup"),
        ]

    async def stop(self) -> None:
        self.stopping = True
        for client in list(self.fanout.clients.values()):
            client.close(CloseCode.GOING_AWAY, "hub node stopping; reconnect and resume")
        if self._closing:
            await asyncio.wait(self._closing, timeout=self.settings.hub_close_timeout + 1)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            await self.recorder.flush()
            if self.node_id is not None:
                await self.db.connections.stop_node(self.node_id)
        except Exception as exc:  # the reaper of another node will finish it
            logger.warning("could not record the hub node's shutdown: %s", exc)

    def _every(
        self, interval: float, job: Callable[[], Awaitable[Any]], name: str
    ) -> asyncio.Task[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await job()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a maintenance job must not stop the hub
                    self.maintenance_errors += 1
                    logger.warning("hub %s failed: %s", name, exc)

        return asyncio.create_task(loop(), name=f"hub-{name}")

    # --- maintenance jobs --------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        if self.node_id is None:
            return
        if not await self.db.connections.heartbeat(self.node_id):
            logger.error("hub node %s was declared dead by a reaper; reviving it", self.node_id)
            await self.db.connections.revive_node(self.node_id, list(self.fanout.clients))

    async def _reap(self) -> None:
        nodes, connections = await self.db.connections.reap(
            timedelta(seconds=self.settings.hub_node_stale_after), reaper=self.node_id
        )
        if nodes or connections:
            logger.info("reaped %d dead hub nodes and %d connection rows", nodes, connections)

    async def _prune(self) -> None:
        deleted = await self.db.events.prune()
        if deleted:
            logger.info("pruned %d stream events past retention", deleted)
        tickets = await self.db.tickets.prune()
        if tickets:
            logger.info("pruned %d expired stream tickets and credentials", tickets)

    async def _sweep_sessions(self) -> None:
        ended = await self.db.sessions.sweep_timed_out(
            timedelta(seconds=self.settings.session_idle_timeout)
        )
        if ended:
            logger.info("timed out %d idle agent sessions", len(ended))

    async def _expire_holds(self) -> None:
        expired = await self.db.credits.expire_holds()
        if expired:
            logger.info("expired %d credit holds", expired)

    async def recheck_tokens(self) -> None:
        """End connections whose token was revoked or expired, or whose user was deactivated
        or changed admin status, since they authenticated. One query for all clients."""
        clients = [c for c in self.fanout.clients.values() if not c.closing]
        hashes = {c.connection_id: c.token_hash for c in clients}
        statuses = await self.db.connections.token_statuses(h for h in hashes.values() if h)
        for client in clients:
            found = statuses.get(hashes[client.connection_id] or "")
            if found is None:
                continue
            status, is_admin = found
            if status != "ok":
                client.close(STATUS_CLOSE.get(status, CloseCode.INVALID_TOKEN), f"token {status}")
            elif is_admin != client.is_admin:
                client.close(CloseCode.PRIVILEGES_CHANGED, "privileges changed; reconnect")

    # --- called by connections ---------------------------------------------------------------
    def authenticated(self, client: Client, send: Any) -> None:
        """``client`` authenticated on the ASGI ``send``: its socket leaves the stranger cap, and a
        keepalive timeout closes it as too slow (keen_stream/hub/transport.py)."""
        proto = guarded_protocol(send)
        if proto is None:
            return

        def unresponsive() -> None:
            if client.closing:
                return
            # Not answering pings means not reading (or gone): the documented 4008 with the
            # resume point, as when its buffer passes the limit.
            self._unresponsive.add(client.connection_id)
            client.close(CloseCode.TOO_SLOW, too_slow_reason(client.last_cursor))

        proto.mark_authenticated(unresponsive)

    def request_close(self, client: Client, code: int, reason: str) -> None:
        """Client.close() lands here: run the close I/O in its own task (never on the hot path)."""
        if code == CloseCode.TOO_SLOW:
            self.stats.slow_consumers_closed += 1
        task = asyncio.get_running_loop().create_task(
            client.sender.close(code, reason, self.settings.hub_close_timeout)
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def record_close(
        self, client: Client, code: int | None, reason: str | None, status: ConnectionStatus
    ) -> None:
        if client.connection_id in self._unresponsive:
            self._unresponsive.discard(client.connection_id)
            status = "timed_out"
        self.recorder.closed(
            ConnectionClosed(
                connection_id=client.connection_id,
                disconnected_at=datetime.now(UTC),
                connection_status=status,
                close_code=code,
                close_reason=(reason or None) and reason[:123],
            )
        )

    def health(self) -> dict[str, Any]:
        listener = self.listener
        return {
            "node_id": str(self.node_id) if self.node_id else None,
            "listener": {
                "connected": listener.connected,
                "cursor": str(listener.cursor) if listener.cursor else None,
                "lag_seconds": round(listener.lag, 6),
                "reconnects": listener.reconnects,
                "last_read_age_seconds": (
                    round(time.time() - listener.last_read_at, 3) if listener.last_read_at else None
                ),
            },
            "connections": len(self.fanout.clients),
            "subscriptions": self.fanout.subscription_count,
            "pending_records": self.recorder.pending,
        }
