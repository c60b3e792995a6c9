"""The event outbox: tail it in stream order, replay a range for one user, prune it, wake readers.

How events get here: triggers on agent_sessions and credit_transactions (migration 0004) append a
``stream_events`` row in the writing transaction. How a reader knows which rows are final: each
row carries its transaction id (xid8); every row with an xid below the *horizon*
(``keen_stream_horizon()``, the oldest transaction of this database still running) belongs to a
finished transaction, and no later transaction can get such an xid. Readers therefore deliver in
cursor order, (xid, id), and only below the horizon: a transaction that holds an early id and
commits late is waited for, never skipped.

Wake-up: no NOTIFY inside business transactions (it serializes commits; see
docs/architecture.md). The triggers raise one NOTICE per transaction on DAL connections;
after the commit, :class:`EventNotifier` sends a coalesced ``NOTIFY keen_stream_events`` from its
own connection. The table stays the truth: a reader that misses a NOTIFY finds the rows on its
next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

import asyncpg

from keen_stream.dal.models.events import ORIGIN, Cursor, StreamEvent, TailBatch
from keen_stream.dal.pgerrors import translating
from keen_stream.dal.validation import parse_uuid
from keen_stream.errors import CursorExpired, CursorUnknown, InvalidInput

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase

logger = logging.getLogger(__name__)

#: LISTEN/NOTIFY channel of the wake-up.
CHANNEL: Final = "keen_stream_events"
#: SQLSTATE of the NOTICE the capture triggers raise on DAL connections (once per transaction).
SIGNAL_SQLSTATE: Final = "KSE01"
#: Startup setting that asks the triggers for that NOTICE.
SIGNAL_SETTING: Final = {"keen.stream_signal": "on"}

Scope = Literal["mine", "sessions", "all"]

_EVENT_COLUMNS: Final = (
    "e.xid, e.id, e.user_id, e.session_id, e.root_session_id, e.event_type,"
    " e.payload::text AS data, e.created_at"
)

SQL: Final = {
    # One round trip: the horizon, whether committed rows wait beyond it, and the next batch of
    # released rows. All three use the statement's one snapshot (keen_stream_position is STABLE).
    "tail": f"""
        WITH h AS MATERIALIZED (SELECT horizon, pending FROM keen_stream_position())
        SELECT h.horizon, h.pending, e.*
          FROM h LEFT JOIN LATERAL (
              SELECT {_EVENT_COLUMNS} FROM stream_events e
               WHERE (e.xid, e.id) > ($1::xid8, $2::bigint) AND e.xid < h.horizon
               ORDER BY e.xid, e.id LIMIT $3) e ON true
         ORDER BY e.xid, e.id""",
    # The newest released position (where a new reader starts).
    "head": """
        SELECT e.xid, e.id FROM stream_events e
         WHERE e.xid < keen_stream_horizon()
         ORDER BY e.xid DESC, e.id DESC LIMIT 1""",
    # Runs as the user: RLS decides what they may see (their own rows; admins all). The explicit
    # filters narrow it to the subscription; the range is (after, upto] in stream order. The
    # retention watermark is read in the same snapshot: if it is not past ``after``, no event of
    # the range had been pruned when the page was read, so the page is complete.
    "replay": f"""
        SELECT w.pruned_xid, w.pruned_id, g.gap_from, g.gap_to, e.*
          FROM stream_retention w CROSS JOIN stream_state g LEFT JOIN LATERAL (
              SELECT {_EVENT_COLUMNS} FROM stream_events e
               WHERE (e.xid, e.id) > ($1::xid8, $2::bigint)
                 AND (e.xid, e.id) <= ($3::xid8, $4::bigint)
                 AND ($5::uuid IS NULL OR e.user_id = $5)
                 AND ($6::uuid[] IS NULL OR e.session_id = ANY($6) OR e.root_session_id = ANY($6))
               ORDER BY e.xid, e.id LIMIT $7) e ON true
         ORDER BY e.xid, e.id""",
    "pruned_through": "SELECT pruned_xid, pruned_id FROM stream_retention",
    # Both ends of what a resume can get: the retention watermark and the newest released event
    # (NULL when nothing is kept), in one snapshot.
    "bounds": """
        SELECT w.pruned_xid, w.pruned_id, g.gap_from, g.gap_to, h.xid, h.id
          FROM stream_retention w CROSS JOIN stream_state g LEFT JOIN LATERAL (
              SELECT e.xid, e.id FROM stream_events e
               WHERE e.xid < keen_stream_horizon()
               ORDER BY e.xid DESC, e.id DESC LIMIT 1) h ON true""",
    "prune": "SELECT keen_stream_prune($1::interval, $2)",
    "notify": "SELECT pg_notify($1, '')",
    "enter_system": "SET ROLE keen_system",
    # Confirm this server start's stream offset (moves it on a restored database's new
    # cluster) before reading: migration 0009, docs/architecture.md.
    "claim": "SELECT keen_stream_claim()",
    "probe": "SELECT 1",
    # Which of these sessions the user may see (RLS decides; admins see all).
    "visible_sessions": "SELECT id FROM agent_sessions WHERE id = ANY($1::uuid[])",
}


def event_from_row(row: asyncpg.Record) -> StreamEvent:
    return StreamEvent(
        cursor=Cursor(row["xid"], row["id"]),
        user_id=row["user_id"],
        session_id=row["session_id"],
        root_session_id=row["root_session_id"],
        event_type=row["event_type"],
        data=row["data"],
        created_at=row["created_at"],
    )


def _check_issued(since: Cursor, row: asyncpg.Record) -> None:
    """Raise CursorUnknown when ``since`` lies in ``stream_state``'s gap: positions a restore on
    another cluster skipped, which only the old cluster can have issued (after the backup)."""
    gap_from, gap_to = row["gap_from"], row["gap_to"]
    if gap_from is not None and gap_from < since.xid < gap_to:
        raise CursorUnknown(
            "this cursor was not issued by this database (restored from a backup)",
            since=str(since),
        )


class StreamReader:
    """A dedicated connection that tails the outbox (the hub's listener holds one).

    Never pooled: its LISTEN must outlive transactions, and it runs as ``keen_system`` for its
    whole life (a session-level ``SET ROLE`` is safe on a connection nobody else gets). Every
    call runs under ``timeout``: a connection that died silently never fires asyncpg's
    termination callback, and only a round trip that does not come back tells. Errors are
    keen_stream's (``DatabaseUnavailable`` and the like), as everywhere in the DAL.
    """

    __slots__ = ("_conn", "_timeout")

    def __init__(self, conn: asyncpg.Connection, timeout: float) -> None:
        self._conn = conn
        self._timeout = timeout

    @property
    def backend_pid(self) -> int:
        return int(self._conn.get_server_pid())

    async def listen(self, on_wakeup: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """Call ``on_wakeup`` for every NOTIFY on the stream's channel and ``on_lost`` when the
        connection ends (when asyncpg notices)."""
        self._conn.add_termination_listener(lambda _conn: on_lost())
        with translating():
            await asyncio.wait_for(
                self._conn.add_listener(CHANNEL, lambda *_args: on_wakeup()), self._timeout
            )

    async def head(self) -> Cursor:
        """The newest released cursor (the origin when nothing is kept)."""
        with translating():
            row = await self._conn.fetchrow(SQL["head"], timeout=self._timeout)
        return ORIGIN if row is None else Cursor(row["xid"], row["id"])

    async def read(self, after: Cursor, limit: int) -> TailBatch:
        """The next ``limit`` released events after ``after``, and where the horizon is."""
        with translating():
            rows = await self._conn.fetch(
                SQL["tail"], after.xid, after.id, limit, timeout=self._timeout
            )
        events = [event_from_row(r) for r in rows if r["id"] is not None]
        return TailBatch(events=events, horizon=rows[0]["horizon"], pending=rows[0]["pending"])

    async def probe(self) -> None:
        """One round trip: raises DatabaseUnavailable if it does not come back in time."""
        with translating():
            await self._conn.fetchval(SQL["probe"], timeout=self._timeout)

    def terminate(self) -> None:
        """Drop the connection at once (its state is unknown: never politely)."""
        if not self._conn.is_closed():
            self._conn.terminate()

    async def close(self) -> None:
        with translating():
            await self._conn.close()


class EventSignal:
    """Log listener for one transaction: remembers whether a capture trigger fired in it."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, _conn: object, message: Any) -> None:
        if getattr(message, "sqlstate", None) == SIGNAL_SQLSTATE:
            self.seen = True


class EventNotifier:
    """Coalescing after-commit wake-up: ``poke()`` is cheap and synchronous.

    The first poke sends ``NOTIFY`` at once (leading edge); pokes that arrive while one is in
    flight or within ``interval`` after it are folded into one more. The NOTIFY runs in its own
    tiny transaction on a dedicated connection with ``synchronous_commit = off``: it holds the
    notify commit lock only for itself, never inside a business transaction. Failures are
    logged and dropped (readers poll anyway).
    """

    def __init__(self, dsn: str, *, interval: float, connect_timeout: float = 10.0) -> None:
        self._dsn = dsn
        self._interval = interval
        self._connect_timeout = connect_timeout
        self._pending = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self.sent = 0
        self.failures = 0

    def poke(self) -> None:
        if self._closed:
            return
        self._pending = True
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._pending and not self._closed:
                self._pending = False
                await self._send()
                if self._interval and not self._hurry.is_set():
                    # The interval, cut short by close() (its pending wake-up goes out at once).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), self._interval)
        finally:
            self._task = None

    async def _send(self) -> None:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self._connect_timeout,
                    server_settings={
                        "application_name": "keen_stream_notifier",
                        "synchronous_commit": "off",
                    },
                )
            await self._conn.execute(SQL["notify"], CHANNEL)
            self.sent += 1
        except (
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,  # a killed backend's FATAL read before its close
        ) as exc:
            self.failures += 1
            logger.warning("event wake-up NOTIFY failed (readers will poll): %s", exc)
            await self._drop_connection()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        task = self._task
        if task is not None:
            # A wake-up folded into the interval must still go out: otherwise readers learn of
            # the process's last commits only by their fallback poll (seen: a 1 s delay on the
            # last event of a benchmark run).
            self._hurry.set()
            await asyncio.wait({task}, timeout=self._connect_timeout)
            if not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # close() itself was cancelled: not ours to swallow
                # Cancelled mid-query: the connection's state is unknown; do not reuse or
                # politely close it.
                await self._drop_connection()
        self._closed = True
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class EventDAO:
    """``db.events``: the outbox as the hub and resuming clients see it."""

    def __init__(self, db: KeenDatabase) -> None:
        self._db = db
        self.notifier = EventNotifier(
            db.dsn,
            interval=db.settings.event_notify_interval,
            connect_timeout=db.settings.connect_timeout,
        )

    def after_commit(self) -> None:
        """Called by KeenDatabase after a transaction that wrote events has committed."""
        self.notifier.poke()

    async def close(self) -> None:
        await self.notifier.close()

    async def connect_reader(
        self, application_name: str = "keen_stream_listener", *, call_timeout: float | None = None
    ) -> StreamReader:
        """A :class:`StreamReader`: a dedicated connection as keen_system; its calls run under
        ``call_timeout`` (default: the connect timeout)."""
        settings = self._db.settings
        with translating():
            conn = await asyncpg.connect(
                self._db.dsn,
                timeout=settings.connect_timeout,
                server_settings={
                    "application_name": application_name,
                    "statement_timeout": str(settings.statement_timeout_ms),
                },
            )
        try:
            # Under a timeout like every other step: a connection that dies silently right
            # after connecting must not hang its reader (TCP alone can take minutes to notice).
            with translating():
                await conn.execute(SQL["enter_system"], timeout=settings.connect_timeout)
                await conn.execute(SQL["claim"], timeout=settings.connect_timeout)
        except BaseException:
            conn.terminate()
            raise
        timeout = settings.connect_timeout if call_timeout is None else call_timeout
        return StreamReader(conn, timeout)

    async def head(self) -> Cursor:
        """The newest released cursor: a reader starting now continues from here."""
        return (await self.bounds())[1]

    async def bounds(self, since: Cursor | None = None) -> tuple[Cursor, Cursor]:
        """``(pruned_through, head)``: a resume from a cursor before the first has lost events;
        one after the second was not issued by this database. With nothing kept, the head is
        the watermark. Raises :class:`CursorUnknown` if ``since`` lies in the range a restore
        on another cluster skipped (issued by the old cluster after the backup)."""
        async with self._db.system_transaction() as conn:
            row = await conn.fetchrow(SQL["bounds"])
        if since is not None and row is not None:
            _check_issued(since, row)
        pruned = ORIGIN if row is None else Cursor(row["pruned_xid"], row["pruned_id"])
        if row is None or row["xid"] is None:
            return pruned, pruned
        return pruned, Cursor(row["xid"], row["id"])

    async def visible_sessions(
        self, user_id: uuid.UUID | str, session_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]:
        """The subset of ``session_ids`` that ``user_id`` may see (its own; an admin: all)."""
        uid = parse_uuid(user_id, "user_id")
        if not session_ids:
            return set()
        async with self._db.user_transaction(uid) as conn:
            rows = await conn.fetch(SQL["visible_sessions"], list(session_ids))
        return {r["id"] for r in rows}

    async def pruned_through(self) -> Cursor:
        """Every event at or before this cursor has been pruned: a resume from before it fails."""
        async with self._db.system_transaction() as conn:
            row = await conn.fetchrow(SQL["pruned_through"])
        return Cursor(row["pruned_xid"], row["pruned_id"]) if row else ORIGIN

    async def replay(
        self,
        user_id: uuid.UUID | str,
        after: Cursor,
        upto: Cursor,
        *,
        scope: Scope = "mine",
        session_ids: Sequence[uuid.UUID] | None = None,
        limit: int = 1000,
    ) -> list[StreamEvent]:
        """Released events in (``after``, ``upto``], as ``user_id`` sees them (RLS), in order.

        ``scope``: ``mine`` (the user's own events), ``sessions`` (events of ``session_ids`` or
        of their sub-agents), ``all`` (everything RLS shows: all users for an admin).
        Returns at most ``limit`` events; call again from the last cursor for more. Raises
        :class:`CursorExpired` when events after ``after`` have been pruned (retention): the
        range cannot be given whole.
        """
        uid = parse_uuid(user_id, "user_id")
        if scope not in ("mine", "sessions", "all"):
            raise InvalidInput("unknown scope", field="scope")
        if scope == "sessions" and not session_ids:
            raise InvalidInput("a sessions scope needs session ids", field="sessions")
        if not 1 <= limit <= 100_000:
            raise InvalidInput("limit out of range", field="limit")
        owner = uid if scope == "mine" else None
        sessions = list(session_ids) if scope == "sessions" and session_ids else None
        async with self._db.user_transaction(uid) as conn:
            rows = await conn.fetch(
                SQL["replay"], after.xid, after.id, upto.xid, upto.id, owner, sessions, limit
            )
        pruned = Cursor(rows[0]["pruned_xid"], rows[0]["pruned_id"]) if rows else ORIGIN
        if rows:
            _check_issued(after, rows[0])
        if after < pruned:
            raise CursorExpired(
                "events after this cursor were pruned", since=str(after), pruned=str(pruned)
            )
        return [event_from_row(r) for r in rows if r["id"] is not None]

    async def prune(self, keep: timedelta | None = None, *, batch: int = 1000) -> int:
        """Delete events older than ``keep`` (default: the configured retention), in batches of
        ``batch`` rows, each in its own short transaction. Returns the number deleted.

        Small batches because a pruning transaction is a write transaction: while it runs it
        holds the stream's horizon, and every event committed meanwhile waits for it. Measured
        over 20,000 expired events: 5,000-row batches took 5-20 ms each, 1,000-row batches
        2-5 ms."""
        keep = keep if keep is not None else timedelta(seconds=self._db.settings.event_retention)
        if keep < timedelta(0) or not 1 <= batch <= 1_000_000:
            raise InvalidInput("invalid retention or batch size")
        total = 0
        while True:
            async with self._db.system_transaction() as conn:
                deleted = await conn.fetchval(SQL["prune"], keep, batch)
            total += int(deleted)
            if deleted < batch:
                return total
