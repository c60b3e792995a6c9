"""The listener: one dedicated PostgreSQL connection that LISTENs and tails the outbox.

Every read is "the next released events after my cursor" (dal/events.py explains released), so
the table is the truth and a NOTIFY is only a hint to read now:
- woken by ``NOTIFY keen_stream_events`` (sent after commit by the DAL's notifier);
- re-reads soon (``listener_retry_poll``, doubling) while committed rows wait behind an older
  running transaction, so they go out as soon as it ends;
- otherwise reads every ``listener_fallback_poll`` seconds (writes made outside the DAL);
- probes liveness with ``SELECT 1`` under a timeout (a silently dead TCP connection never fires
  asyncpg's termination callback), and treats a termination callback or any connection error as
  lost: reconnect with exponential backoff and jitter, then continue from the last delivered
  cursor. Nothing is lost across a dropped listener, a PostgreSQL restart or a network cut.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from keen_stream.dal.events import EventDAO, StreamReader
from keen_stream.dal.models.events import Cursor, StreamEvent
from keen_stream.errors import DatabaseError
from keen_stream.settings import Settings

logger = logging.getLogger(__name__)


class ConnectionLost(Exception):
    """The listener's connection ended (termination callback or failed probe)."""


class Wakeup:
    """A flag one task waits on with a timeout: one future and one timer per wait.

    ``asyncio.wait_for(event.wait(), t)`` wraps the wait in a new task per call; the listener
    waits once per read, hundreds of times a second, and that wrapper was about a tenth of the
    hub's samples per event (py-spy, a benchmark run with nothing to deliver).
    """

    __slots__ = ("_flag", "_waiter")

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    async def wait(self, within: float) -> bool:
        """Until set or ``within`` seconds have passed; returns whether it is set."""
        if self._flag:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(within, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return self._flag


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class EventListener:
    """Tails the outbox into ``deliver`` (called synchronously, in order, batch by batch)."""

    def __init__(
        self,
        events: EventDAO,
        deliver: Callable[[list[StreamEvent]], None],
        settings: Settings,
        *,
        start_after: Cursor | None = None,
        batch_size: int = 1000,
    ) -> None:
        self._events = events
        self._deliver = deliver
        self._settings = settings
        self._batch_size = batch_size
        self._wake = Wakeup()
        #: The last delivered cursor (None until the first connection says where "now" is).
        self.cursor: Cursor | None = start_after
        self.connected = False
        self.reconnects = 0
        self.backend_pid: int | None = None
        self.horizon: int | None = None
        #: Seconds from the transaction start of the last delivered event to its delivery.
        self.lag = 0.0
        self.last_read_at: float | None = None
        self.notifications = 0
        #: Tail reads made (each one round trip): wake-ups, retries, fallback polls.
        self.reads = 0
        self._delivered = False  # a read went through on the current connection

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Run until cancelled: connect, tail, and on any loss reconnect with backoff."""
        attempt = 0
        while True:
            reader: StreamReader | None = None
            self._delivered = False
            try:
                reader = await self._events.connect_reader(
                    call_timeout=self._settings.listener_probe_timeout
                )
                await self._tail(reader)
            except asyncio.CancelledError:
                raise
            except (DatabaseError, ConnectionLost) as exc:
                logger.warning("event listener lost its connection: %s", exc or type(exc).__name__)
            except Exception:
                # This task is the node's only reader: if it ended, delivery would stop for good
                # and its exception would surface only at shutdown. Start over from the cursor.
                logger.exception("event listener failed; reconnecting")
            finally:
                self.connected = False
                self.backend_pid = None
                if reader is not None:
                    reader.terminate()
            self.reconnects += 1
            # The backoff starts over only after a read was delivered on that connection: a
            # failure that repeats right after every connect (a bad event, a broken reader)
            # must back off, not reconnect and log twenty times a second.
            if self._delivered:
                attempt = 0
            delay = min(self._settings.listener_backoff_max, 0.05 * 2**attempt)
            attempt += 1
            await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _tail(self, reader: StreamReader) -> None:
        settings = self._settings
        lost = asyncio.Event()

        def on_lost() -> None:
            lost.set()
            self._wake.set()

        def on_wakeup() -> None:
            self.notifications += 1
            self._wake.set()

        await reader.listen(on_wakeup, on_lost)
        if self.cursor is None:
            self.cursor = await reader.head()
        self.backend_pid = reader.backend_pid
        self.connected = True
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + settings.listener_probe_interval
        retry = settings.listener_retry_poll
        while True:
            if lost.is_set():
                raise ConnectionLost("terminated")
            self._wake.clear()
            batch = await reader.read(self.cursor, self._batch_size)
            self.reads += 1
            self.last_read_at = time.time()
            moved = batch.horizon != self.horizon or bool(batch.events)
            self.horizon = batch.horizon
            if batch.events:
                self._deliver(batch.events)
                last = batch.events[-1]
                self.cursor = last.cursor
                self.lag = max(0.0, time.time() - last.created_at.timestamp())
            self._delivered = True
            if len(batch.events) == self._batch_size:
                continue
            if batch.pending:
                # Rows wait behind a running transaction. Its commit may send no NOTIFY (it may
                # write no events: a NOTIFY transaction, a token touch), so re-read soon; back off
                # only while the horizon stays put (a long transaction), up to a tenth of the
                # fallback poll.
                if moved:
                    retry = settings.listener_retry_poll
                wait = retry
                retry = min(retry * 2, settings.listener_fallback_poll / 10)
            else:
                wait = settings.listener_fallback_poll
                retry = settings.listener_retry_poll
            now = loop.time()
            if now >= next_probe:
                await reader.probe()
                next_probe = loop.time() + settings.listener_probe_interval
                continue
            await self._wake.wait(min(wait, next_probe - now))
