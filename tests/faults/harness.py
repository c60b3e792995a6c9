"""Fault-injection harness: hub nodes as processes, a continuous writer, resuming clients, and
the check that every client received exactly the events it is entitled to.

A fault test builds a small deployment on a PostgreSQL server it owns and may stop
(``owned_pg`` / ``owned_dsn`` in tests/conftest.py), injects faults while the writer writes and
the clients follow the stream, and compares what each client received with ``stream_events``:

    timeline = Timeline()
    nodes = [HubNode("A", owned_dsn, tmp_path), HubNode("B", owned_dsn, tmp_path)]
    for node in nodes:
        node.start()
    await asyncio.gather(*(node.wait_healthy() for node in nodes))
    writer = Writer(db, [WriterUser(alice.id, "alice")], timeline=timeline)
    await writer.open_root(alice.id)
    baseline = await head_cursor(owned_dsn)         # clients are entitled to what comes after
    client = ResumingClient("alice", [n.url for n in nodes], token, SubscriptionSpec("mine"),
                            user_id=alice.id, is_admin=False, since=format_cursor(baseline),
                            timeline=timeline)
    client.start()
    writer.start()
    ...                         # faults: terminate_backends, owned_pg.restart, node.stop/kill
    await writer.stop()
    rows = await read_stream(owned_dsn, after=baseline)
    await wait_caught_up([client], rows)
    verdict = verify([client], rows, faults=1, writer_errors=writer.errors)
    assert verdict.ok, verdict.report()

The pieces:

- :class:`HubNode`: one ``python -m keen_stream serve`` process on a fixed port (a restarted
  node keeps its URL), fast intervals through ``KEEN_*`` variables, health wait, SIGTERM,
  SIGKILL.
- :func:`terminate_backends`, :func:`long_transaction`, :func:`head_cursor`,
  :func:`read_stream`: the database side, as the owned server's superuser.
- :class:`Writer`: business writes through the DAL at a steady rate (sessions, sub-agents,
  progress, deductions, completions), carrying on through outages and counting every error by
  type; :meth:`Writer.burst` writes thousands of events quickly. Users need credits first
  (``tests/integration/credits_support.fund``).
- :class:`ResumingClient`: a WebSocket client that follows docs/protocol.md and resumes with
  ``since`` after every close or failure, round-robin over the nodes, recording everything.
- :class:`Follower`: what the check needs of a client; :class:`ResumingClient` is one, and so is
  ``tests/faults/clientkit.StreamClientConsumer`` (keen_stream.client as an application uses
  it: what its caller was handed).
- :func:`verify`: per client, entitled vs received: lost, duplicated, out of order, foreign,
  ``recovered`` claims that were not true; losses attributed to the phase they happened in.
- :func:`write_evidence`: what a failed run leaves behind (JSON): per client its log of
  connections, subscribes, replies, error frames and closes, every received cursor with its
  connection and subscribe, what it lost, what the catch-up wait saw; the outbox rows.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import asyncpg
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.models.events import EVENT_TYPES
from keen_stream.dal.models.sessions import PHASES
from keen_stream.dal.users import upsert_super_admin
from keen_stream.hub.sockinfo import tcp_state
from tests.conftest import ADMIN_EMAIL, PASSWORD, make_settings
from tests.integration.credits_support import fund

ROOT: Final = Path(__file__).resolve().parents[2]

Cursor = tuple[int, int]


def parse_cursor(text: str) -> Cursor:
    """``"<xid>-<id>"`` as a tuple: cursor order is ``(xid, id)``, compared numerically."""
    xid, _, event_id = text.partition("-")
    return int(xid), int(event_id)


def format_cursor(cursor: Cursor) -> str:
    return f"{cursor[0]}-{cursor[1]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def error_type(exc: BaseException) -> str:
    """How errors are counted: the class with its module (``asyncpg.exceptions.X`` vs
    ``keen_stream.errors.X`` is the difference that matters here)."""
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


class Timeline:
    """The scenario's current phase (a fault's name, from its injection until the next fault).

    Every record the writer and the clients make carries the phase, so a loss can be traced to
    the fault behind it."""

    def __init__(self) -> None:
        self.phase = "start"
        self._t0 = time.monotonic()
        self.phases: list[tuple[str, float]] = [("start", 0.0)]

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.phases.append((phase, self.elapsed()))

    def elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.phases]


# --- hub nodes --------------------------------------------------------------------------------
#: Intervals for nodes under test: a fault is noticed and survived in well under a second.
#: Pruning is off in effect, so every ``since`` a client holds stays resumable (a
#: ``recovered: false`` is then always a failure).
FAST_HUB_ENV: Final[Mapping[str, str]] = {
    "KEEN_LISTENER_FALLBACK_POLL": "0.2",
    "KEEN_LISTENER_PROBE_INTERVAL": "0.5",
    "KEEN_LISTENER_PROBE_TIMEOUT": "2",
    "KEEN_LISTENER_BACKOFF_MAX": "0.3",
    "KEEN_HUB_FLUSH_INTERVAL": "0.5",
    "KEEN_HUB_HEARTBEAT_INTERVAL": "0.5",
    "KEEN_HUB_NODE_STALE_AFTER": "3",
    "KEEN_HUB_TOKEN_RECHECK_INTERVAL": "1",
    "KEEN_HUB_CLOSE_TIMEOUT": "1",
    "KEEN_EVENT_PRUNE_INTERVAL": "3600",
    "KEEN_EVENT_RETENTION": "86400",
    "KEEN_CONNECT_TIMEOUT": "2",
    "KEEN_POOL_ACQUIRE_TIMEOUT": "2",
    "KEEN_POOL_MIN_SIZE": "1",
    "KEEN_POOL_MAX_SIZE": "4",
}


class HubNodeError(RuntimeError):
    """A hub node process did not start, or died when it should not have."""


class HubNode:
    """One hub node: ``python -m keen_stream serve`` as a process of its own.

    The port is fixed at construction, so a restarted node is reachable at the same URL (as
    behind a load balancer). Output goes to ``<log_dir>/hub-<name>.log``, every start appended.
    ``env`` adds or overrides ``KEEN_*`` settings on top of :data:`FAST_HUB_ENV`.
    """

    def __init__(
        self,
        name: str,
        dsn: str,
        log_dir: Path,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.port = port or free_port()
        self.env = dict(env or {})
        self.log_path = log_dir / f"hub-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exit_codes: list[int] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Launch the process (returns at once; :meth:`wait_healthy` waits for it)."""
        if self.running:
            raise HubNodeError(f"hub {self.name} is already running")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEEN_")}
        env.update(FAST_HUB_ENV)
        env.update(self.env)
        env["KEEN_DATABASE_URL"] = self.dsn
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} at {time.time():.3f} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(  # the child keeps its own copy of the log descriptor
                [
                    sys.executable,
                    "-m",
                    "keen_stream",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    async def wait_healthy(self, within: float = 30.0) -> dict[str, Any]:
        """Until ``/healthz`` answers 200 (database reachable, listener connected)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        last = "no answer"
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as http:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise HubNodeError(
                        f"hub {self.name} is not running (exit {code})\n{self.log_tail()}"
                    )
                try:
                    response = await http.get(f"{self.http}/healthz")
                    if response.status_code == 200:
                        body: dict[str, Any] = response.json()
                        return body
                    last = f"{response.status_code} {response.text[:300]}"
                except httpx.TransportError as exc:
                    last = error_type(exc)
                if loop.time() > deadline:
                    raise HubNodeError(
                        f"hub {self.name} not healthy after {within} s: {last}\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.05)

    async def stop(self, grace: float = 20.0) -> int:
        """SIGTERM (uvicorn's graceful shutdown); returns the exit code."""
        return await self._end(signal.SIGTERM, grace)

    async def kill(self) -> int:
        """SIGKILL: the process vanishes, its sockets closed by the kernel."""
        return await self._end(signal.SIGKILL, 10.0)

    async def _end(self, sig: signal.Signals, grace: float) -> int:
        proc = self.proc
        if proc is None:
            raise HubNodeError(f"hub {self.name} was not started")
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            code = await asyncio.to_thread(proc.wait, grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = await asyncio.to_thread(proc.wait, 10.0)
        self.exit_codes.append(code)
        self.proc = None
        return code

    async def close(self) -> None:
        """Make sure the process is gone (test teardown)."""
        if self.proc is not None:
            await self._end(signal.SIGKILL, 10.0)

    async def metric(self, name: str) -> float:
        """One sample of ``/metrics`` (a metric without labels), e.g.
        ``keen_hub_events_replayed_total``."""
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as http:
            response = await http.get(f"{self.http}/metrics")
        response.raise_for_status()
        for line in response.text.splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return float(value)
        raise KeyError(f"hub {self.name} has no metric {name}")

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""


# --- the database side (as the owned server's superuser) ---------------------------------------
#: ``application_name`` of a hub node's listener connection (``EventDAO.connect_reader``).
LISTENER_APPLICATION_NAME: Final = "keen_stream_listener"


async def terminate_backends(
    admin_dsn: str, database: str, *, application_name: str | None = None
) -> int:
    """``pg_terminate_backend`` every client backend of ``database`` (only those with this
    ``application_name``, if given); returns how many were terminated. ``admin_dsn`` should
    point at another database, so this connection is not among them."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        terminated = await conn.fetchval(
            """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
                 FROM pg_stat_activity
                WHERE datname = $1 AND pid <> pg_backend_pid()
                  AND backend_type = 'client backend'
                  AND ($2::text IS NULL OR application_name = $2)""",
            database,
            application_name,
        )
    finally:
        await conn.close()
    return int(terminated)


@contextlib.asynccontextmanager
async def long_transaction(dsn: str) -> AsyncIterator[int]:
    """A write transaction held open for the block, as a batch job or a migration would hold
    one: it has a transaction id, so it holds the stream's horizon (docs/architecture.md,
    "Ordering") and nothing committed after it is released to readers until it ends. ``dsn``
    must be the stream's database. Yields the transaction id; rolled back at the end."""
    conn = await asyncpg.connect(dsn)
    try:
        # It writes nothing: holding an xid is the point. Closing the connection rolls it back.
        await conn.execute("BEGIN")
        yield int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
    finally:
        conn.terminate()


@dataclass(frozen=True, slots=True)
class StreamRow:
    """One ``stream_events`` row, as the check needs it (UUIDs as text, like the frames)."""

    cursor: Cursor
    user_id: str
    session_id: str | None
    root_session_id: str | None
    event_type: str


async def read_stream(dsn: str, after: Cursor | None = None) -> list[StreamRow]:
    """Every outbox row after ``after``, in cursor order (``dsn``'s role must bypass RLS).

    The ``ORDER BY`` names the table's columns (``e.xid``): a bare ``xid`` would be the output
    column, the text, and sort ``"10000"`` before ``"9999"`` (see :data:`_NEWEST_SQL`)."""
    xid, event_id = after or (0, 0)
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """SELECT e.xid::text AS xid, e.id, e.user_id::text AS user_id,
                      e.session_id::text AS session_id,
                      e.root_session_id::text AS root_session_id, e.event_type
                 FROM stream_events e
                WHERE (e.xid, e.id) > ($1::text::xid8, $2::bigint)
                ORDER BY e.xid, e.id""",
            str(xid),
            event_id,
        )
    finally:
        await conn.close()
    return [
        StreamRow(
            (int(r["xid"]), r["id"]),
            r["user_id"],
            r["session_id"],
            r["root_session_id"],
            r["event_type"],
        )
        for r in rows
    ]


#: The newest row. In ``ORDER BY``, a bare name that is also an output column's means the
#: output column: ``SELECT xid::text AS xid ... ORDER BY xid`` sorts the text, and once the
#: stream's transaction ids pass a power of ten (9999 to 10000) the "newest" row and the order
#: of :func:`read_stream` were wrong. The fault scenario's wait for the clients to catch up then
#: ended while a client was still reading a replay, and the events it had not read yet were
#: reported lost ("never delivered"). Hence ``e.xid`` everywhere.
_NEWEST_SQL: Final = """
    SELECT e.xid::text AS xid, e.id FROM stream_events e ORDER BY e.xid DESC, e.id DESC LIMIT 1"""


async def head_cursor(dsn: str) -> Cursor | None:
    """The newest outbox row's cursor (None: empty)."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(_NEWEST_SQL)
    finally:
        await conn.close()
    return None if row is None else (int(row["xid"]), row["id"])


async def writer_database(dsn: str, *, pool_max_size: int) -> KeenDatabase:
    """The writer's DAL: short connect and acquire timeouts, so an outage fails a write quickly
    (counted) instead of holding the writer."""
    return await KeenDatabase.connect(
        settings=make_settings(
            dsn, pool_max_size=pool_max_size, connect_timeout=2.0, pool_acquire_timeout=2.0
        ),
        migrate=False,
    )


async def funded_users(db: KeenDatabase, prefix: str, count: int) -> list[User]:
    """``count`` users (``<prefix><i>@example.com``) with 1,000 credits each to spend."""
    users = []
    for i in range(count):
        user = await db.users.create(
            email=f"{prefix}{i}@example.com", username=f"{prefix}_{i}", password=PASSWORD
        )
        await fund(db, user, "1000")
        users.append(user)
    return users


# --- the writer ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WriterUser:
    user_id: uuid.UUID
    #: Session handles of this user are ``<prefix>-<n>``.
    prefix: str


@dataclass(slots=True)
class _OpenSession:
    handle: str
    depth: int
    keep: bool  # never ended by the writer (a subscribed root must stay open for sub-agents)


class Writer:
    """Business writes through the DAL at a steady rate, one at a time, until stopped.

    Each step picks a user and one operation: report progress, charge a model call (credit
    usage on one of its sessions), spawn a sub-agent, end a sub-agent (completion + charge), or
    start a root session. Errors (an outage) are counted by type and phase, and the writer
    carries on after a short pause: whatever committed is in the outbox, whatever did not is
    not, and the check compares against the outbox, not against the writer's intentions.
    """

    #: Operation weights per step.
    OPS: Final = (("progress", 45), ("deduct", 30), ("spawn", 10), ("finish", 10), ("root", 5))
    COST: Final = Decimal("0.001")

    def __init__(
        self,
        db: KeenDatabase,
        users: Sequence[WriterUser],
        *,
        timeline: Timeline,
        interval: float = 0.025,
        error_pause: float = 0.05,
        max_depth: int = 3,
        seed: int = 7,
    ) -> None:
        self.db = db
        self.users = list(users)
        self.timeline = timeline
        self.interval = interval
        self.error_pause = error_pause
        self.max_depth = max_depth
        self._rng = random.Random(seed)
        self._names = [name for name, _ in self.OPS]
        self._weights = [weight for _, weight in self.OPS]
        self._open: dict[uuid.UUID, list[_OpenSession]] = {u.user_id: [] for u in self.users}
        self._prefix = {u.user_id: u.prefix for u in self.users}
        self._seq = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        #: When the current connection last delivered a frame (loop time), for the watchdog.
        self._frame_at = 0.0
        #: Successful operations by name.
        self.ops: Counter[str] = Counter()
        #: Failed operations by error type.
        self.errors: Counter[str] = Counter()
        #: Failed operations by (phase, error type) and by (operation, error type).
        self.errors_by_phase: Counter[tuple[str, str]] = Counter()
        self.errors_by_op: Counter[tuple[str, str]] = Counter()

    async def open_root(self, user_id: uuid.UUID, *, keep: bool = True) -> uuid.UUID:
        """Start a root session for ``user_id`` (kept open by default); returns its row id."""
        handle = self._handle(user_id)
        session = await self.db.sessions.create_session(
            user_id,
            session_handle=handle,
            vision="fault test",
            working_directory="/w",
            git_branch="main",
        )
        self._open[user_id].append(_OpenSession(handle, 0, keep))
        return session.id

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="fault-writer")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await self._task
            self._task = None

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    async def _run(self) -> None:
        while not self._stopping:
            await self.step()
            await asyncio.sleep(self.interval)

    async def step(self) -> None:
        """One operation for a random user; an error is counted, then a short pause."""
        user = self._rng.choice(self.users).user_id
        op = self._feasible(self._rng.choices(self._names, self._weights)[0], user)
        try:
            await self._do(op, user)
        except Exception as exc:  # an outage: count it by type and carry on
            self._failed(op, exc)
            await asyncio.sleep(self.error_pause)
        else:
            self.ops[op] += 1

    async def burst(
        self, count: int, *, concurrency: int = 64, description: str = "burst call"
    ) -> int:
        """``count`` deductions (credit events) as fast as the ledger takes them (concurrent
        calls share statements: dal/batching.py); returns how many committed. The event's
        payload carries the first 200 characters of ``description``."""
        gate = asyncio.Semaphore(concurrency)
        done = 0

        async def one(n: int) -> None:
            nonlocal done
            user = self.users[n % len(self.users)].user_id
            async with gate:
                try:
                    await self.db.credits.deduct_credits(user, self.COST, None, description)
                except Exception as exc:
                    self._failed("burst", exc)
                else:
                    done += 1
                    self.ops["burst"] += 1

        await asyncio.gather(*(one(n) for n in range(count)))
        return done

    def _failed(self, op: str, exc: Exception) -> None:
        kind = error_type(exc)
        self.errors[kind] += 1
        self.errors_by_phase[(self.timeline.phase, kind)] += 1
        self.errors_by_op[(op, kind)] += 1

    def _handle(self, user_id: uuid.UUID) -> str:
        return f"{self._prefix[user_id]}-{next(self._seq)}"

    def _feasible(self, op: str, user_id: uuid.UUID) -> str:
        """``op``, or what to do instead when this user has nothing to apply it to."""
        sessions = self._open[user_id]
        if not sessions:
            return "root"
        if op == "finish" and not any(not s.keep and s.depth > 0 for s in sessions):
            return "progress"
        return op

    async def _do(self, op: str, user_id: uuid.UUID) -> None:
        sessions, db, rng = self._open[user_id], self.db, self._rng
        if op == "root":
            await self.open_root(user_id, keep=False)
        elif op == "finish":
            target = rng.choice([s for s in sessions if not s.keep and s.depth > 0])
            # Forgotten first: if the call fails after its commit, the session has ended, and
            # a later progress report on it would only fail again.
            sessions.remove(target)
            await db.sessions.complete_session(
                user_id, target.handle, success=rng.random() < 0.8, claude_cost_usd=self.COST * 2
            )
        elif op == "spawn":
            parents = [s for s in sessions if s.depth < self.max_depth]
            parent = rng.choice(parents or sessions)
            handle = self._handle(user_id)
            await db.sessions.create_session(
                user_id,
                session_handle=handle,
                vision="sub-agent",
                working_directory="/w",
                git_branch="main",
                parent_session_handle=parent.handle,
            )
            sessions.append(_OpenSession(handle, parent.depth + 1, False))
        elif op == "deduct":
            target = rng.choice(sessions)
            await db.credits.deduct_credits(user_id, self.COST, target.handle, "model call")
        else:
            target = rng.choice(sessions)
            await db.sessions.update_progress(
                user_id,
                target.handle,
                phase=rng.choice(PHASES) if rng.random() < 0.1 else None,
                iterations=1,
                tool_calls=rng.randint(0, 3),
                tokens=rng.randint(1, 500),
            )


@dataclass
class Tenants:
    """Who a scenario writes for: funded users and the super-admin, each with a root session the
    writer keeps open (``roots``: user id to the root's row id)."""

    admin: User
    users: list[User]
    writer: Writer
    roots: dict[uuid.UUID, uuid.UUID]


async def tenants(db: KeenDatabase, prefix: str, count: int, *, timeline: Timeline) -> Tenants:
    """``count`` funded users (:func:`funded_users`), the super-admin, and a :class:`Writer`
    for all of them (not started); session handles ``u<i>-<n>`` and ``adm-<n>``."""
    admin = await upsert_super_admin(db, ADMIN_EMAIL, PASSWORD)
    users = await funded_users(db, prefix, count)
    writer = Writer(
        db,
        [WriterUser(u.id, f"u{i}") for i, u in enumerate(users)] + [WriterUser(admin.id, "adm")],
        timeline=timeline,
    )
    roots = {u.id: await writer.open_root(u.id) for u in [*users, admin]}
    return Tenants(admin, users, writer, roots)


# --- the resuming client ----------------------------------------------------------------------
def _event_types(patterns: Iterable[str]) -> frozenset[str] | None:
    """The types a subscription's ``events`` list selects (None: all), as docs/protocol.md."""
    selected: set[str] = set()
    for pattern in patterns:
        if pattern == "*":
            return None
        if pattern.endswith(".*"):
            selected |= {t for t in EVENT_TYPES if t.startswith(pattern[:-1])}
        else:
            selected.add(pattern)
    return frozenset(selected) or None


@dataclass(frozen=True)
class SubscriptionSpec:
    """What a client subscribes to (the same on every resume), and the entitlement rule."""

    scope: str = "mine"  # mine, sessions, all
    sessions: tuple[str, ...] = ()
    events: tuple[str, ...] = ()

    def frame(self, since: str | None, ref: int) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "subscribe", "id": ref, "scope": self.scope}
        if self.sessions:
            frame["sessions"] = list(self.sessions)
        if self.events:
            frame["events"] = list(self.events)
        if since is not None:
            frame["since"] = since
        return frame

    def evidence(self) -> dict[str, Any]:
        return {"scope": self.scope, "sessions": list(self.sessions), "events": list(self.events)}

    def entitles(self, row: StreamRow, user_id: str, is_admin: bool) -> bool:
        """The authorization rule (RLS: own events; admins all), then the subscription's."""
        if not is_admin and row.user_id != user_id:
            return False
        if self.scope == "mine" and row.user_id != user_id:
            return False
        if self.scope == "sessions" and not (
            row.session_id in self.sessions or row.root_session_id in self.sessions
        ):
            return False
        types = _event_types(self.events)
        return types is None or row.event_type in types


@dataclass(frozen=True, slots=True)
class Received:
    cursor: Cursor
    event_type: str
    user_id: str
    session_id: str | None
    connection: int  # the client's n-th connection (1-based)
    subscription: int  # the subscribe (by its id) whose reply preceded this event
    phase: str


@dataclass(frozen=True, slots=True)
class SubscribeReply:
    connection: int
    subscription: int
    url: str
    since: str | None  # what the client sent
    cursor: str
    recovered: bool
    reason: str | None
    phase: str
    at: float  # seconds into the timeline


@dataclass(frozen=True, slots=True)
class Disconnect:
    connection: int
    url: str
    code: int | None  # None: no close frame (a dropped connection, a killed node)
    reason: str
    phase: str


class ResumingClient:
    """A WebSocket client that follows docs/protocol.md and never gives up.

    - ``last`` is the cursor of the last event received; it starts at ``since``.
    - On any close or connection failure: reconnect to the next URL (round-robin), with a small
      exponential backoff and jitter (reset once a connection got ``ready``), authenticate with
      an ``auth`` frame, and subscribe with ``since: last`` (the same scope and filters).
    - An ``error`` with code ``unavailable`` means the subscribe did not take effect (the
      database could not be reached): wait a little and send it again with ``since: last``.
    - ``subscribed`` with ``recovered: false``: as the protocol says, continue from its
      ``cursor`` (recorded; in a scenario without pruning it is a failure).

    Everything is recorded: each event (cursor, type, user, session, connection, phase), each
    ``subscribed`` reply, each close code, each error frame, each connect failure.

    For faults on the client side: :meth:`drop` cuts the connection (no close frame),
    :meth:`disconnect` cuts it and stays away until :meth:`reconnect`, which can make the
    client stop reading right after the next ``subscribed`` reply (so a big replay stalls on the
    hub's send buffer) until :meth:`release`. ``receive_buffer`` sets the socket's SO_RCVBUF
    (small: the kernel cannot absorb a stalled replay).
    """

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        token: str,
        spec: SubscriptionSpec,
        *,
        user_id: uuid.UUID,
        is_admin: bool,
        since: str | None,
        timeline: Timeline,
        start_at: int = 0,
        backoff_base: float = 0.05,
        backoff_max: float = 0.25,
        unavailable_retry: float = 0.2,
        receive_buffer: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.name = name
        self.urls = list(urls)
        self.token = token
        self.spec = spec
        self.user_id = str(user_id)
        self.is_admin = is_admin
        self.baseline = since
        self.last = since
        self.timeline = timeline
        self.start_at = start_at
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.unavailable_retry = unavailable_retry
        self.receive_buffer = receive_buffer
        self._rng = random.Random(seed if seed is not None else name)
        self.received: list[Received] = []
        self.replies: list[SubscribeReply] = []
        self.disconnects: list[Disconnect] = []
        self.error_frames: list[tuple[int, str, str]] = []  # (connection, code, phase)
        self.unexpected: list[str] = []
        self.connect_failures: Counter[str] = Counter()
        self.connects: list[tuple[int, str, str]] = []  # (connection, url, phase)
        self.connections = 0
        self.subscribes = 0
        #: Everything but events, in order: (seconds into the timeline, connection, events
        #: received so far, what happened). With ``received``, a failed run's story
        #: (:meth:`evidence`).
        self.log: list[tuple[float, int, int, str]] = []
        self.unavailable = 0
        self.recovered_false = 0
        self._allowed = asyncio.Event()
        self._allowed.set()
        self._reading = asyncio.Event()
        self._reading.set()
        self._stall_next = False
        #: Set when a stalled reconnect got its ``subscribed`` reply and stopped reading.
        self.stalled = asyncio.Event()
        self._ws: ClientConnection | None = None
        #: The URL of the current connection (None between connections).
        self.url: str | None = None
        self._dropping = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # --- control --------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"client-{self.name}")

    async def stop(self) -> None:
        self._note(self.connections, f"stopping (last {self.last})")
        self._stopping = True
        self._allowed.set()
        self._reading.set()
        self._abort()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def drop(self) -> None:
        """Cut the connection without a close frame (a network drop); the client resumes."""
        self._note(self.connections, "dropping the connection")
        self._dropping = True
        self._abort()

    def disconnect(self) -> None:
        """Cut the connection and stay away until :meth:`reconnect`."""
        self._allowed.clear()
        self.drop()

    def reconnect(self, *, stall_after_subscribed: bool = False) -> None:
        self._stall_next = stall_after_subscribed
        self.stalled.clear()
        self._allowed.set()

    def release(self) -> None:
        """Read again after a stall."""
        self._note(self.connections, "released: reading again")
        self._reading.set()

    def _abort(self) -> None:
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    # --- state ------------------------------------------------------------------------------------
    @property
    def last_cursor(self) -> Cursor | None:
        return None if self.last is None else parse_cursor(self.last)

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)

    def _note(self, connection: int, text: str) -> None:
        self.log.append((self.timeline.elapsed(), connection, len(self.received), text))

    def evidence(self) -> dict[str, Any]:
        """What this client did and received, as JSON-ready data (:func:`write_evidence`).

        ``received`` lists the event cursors in arrival order; ``segments`` says which
        connection and subscribe each run of them came under (``[first, end)`` indexes)."""
        segments: list[dict[str, Any]] = []
        for i, r in enumerate(self.received):
            last = segments[-1] if segments else None
            if last and (last["connection"], last["subscription"]) == (
                r.connection,
                r.subscription,
            ):
                last["end"] = i + 1
            else:
                segments.append(
                    {
                        "connection": r.connection,
                        "subscription": r.subscription,
                        "phase": r.phase,
                        "first": i,
                        "end": i + 1,
                        "first_cursor": format_cursor(r.cursor),
                    }
                )
        for segment in segments:
            segment["last_cursor"] = format_cursor(self.received[segment["end"] - 1].cursor)
        highest = max((r.cursor for r in self.received), default=None)
        return {
            "name": self.name,
            "user_id": self.user_id,
            "is_admin": self.is_admin,
            "spec": self.spec.evidence(),
            "baseline": self.baseline,
            "last": self.last,
            "highest_received": None if highest is None else format_cursor(highest),
            "connections": self.connections,
            "log": [
                {"at": at, "connection": c, "received": n, "what": what}
                for at, c, n, what in self.log
            ],
            "replies": [
                {
                    "connection": r.connection,
                    "subscription": r.subscription,
                    "url": r.url,
                    "since": r.since,
                    "cursor": r.cursor,
                    "recovered": r.recovered,
                    "reason": r.reason,
                    "phase": r.phase,
                    "at": r.at,
                }
                for r in self.replies
            ],
            "segments": segments,
            "received": [format_cursor(r.cursor) for r in self.received],
        }

    @property
    def live(self) -> bool:
        """Connected, and the current connection's latest subscribe was answered."""
        return (
            self.url is not None
            and bool(self.replies)
            and self.replies[-1].connection == self.connections
        )

    # --- the loop -----------------------------------------------------------------------------
    def _stopped(self) -> bool:
        return self._stopping

    async def _run(self) -> None:
        index = self.start_at
        attempt = 0
        while not self._stopped():
            await self._allowed.wait()
            if self._stopped():
                return
            url = self.urls[index % len(self.urls)]
            index += 1
            served = await self._connection(url)
            if self._stopped():
                return
            attempt = 0 if served else attempt + 1
            delay = min(self.backoff_max, self.backoff_base * 2**attempt)
            await asyncio.sleep(delay * (0.5 + self._rng.random() / 2))

    async def _open(self, url: str) -> ClientConnection:
        options: dict[str, Any] = {
            "open_timeout": 5,
            "close_timeout": 1,
            "max_size": 2**24,
            "compression": None,
            "proxy": None,
        }
        if self.receive_buffer is None:
            return await connect(url, **options)
        parts = urlsplit(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Before connect(): the window scale is agreed in the handshake.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
            return await connect(url, sock=sock, max_queue=4, **options)
        except BaseException:
            sock.close()
            raise

    async def _connection(self, url: str) -> bool:
        """One connection, until it ends; returns whether it got as far as ``ready``."""
        try:
            ws = await self._open(url)
        except (OSError, TimeoutError, WebSocketException) as exc:
            self.connect_failures[type(exc).__name__] += 1
            self._note(self.connections, f"connect to {url} failed: {type(exc).__name__}")
            return False
        self._ws = ws
        self.url = url
        self._dropping = False
        self.connections += 1
        number = self.connections
        self.connects.append((number, url, self.timeline.phase))
        self._note(number, f"connected to {url}")
        served = False
        try:
            await ws.send(
                json.dumps({"type": "auth", "token": self.token, "client_type": "fault-test"})
            )
            ready = json.loads(await asyncio.wait_for(ws.recv(), 15))
            if ready.get("type") != "ready":
                self.unexpected.append(f"connection {number}: {ready}")
                return False
            served = True
            state = _ConnectionState(url)
            await self._subscribe(ws, state)
            self._frame_at = asyncio.get_running_loop().time()
            watchdog = asyncio.create_task(self._watch(ws, number))
            try:
                while True:
                    await self._reading.wait()
                    text = await ws.recv()
                    self._frame_at = asyncio.get_running_loop().time()
                    await self._on_frame(ws, number, json.loads(text), state)
            finally:
                watchdog.cancel()
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None else "no close frame"
            self._closed(number, url, code, reason)
        except (OSError, TimeoutError, WebSocketException) as exc:
            self._closed(number, url, None, type(exc).__name__)
        finally:
            self._ws = None
            self.url = None
            if ws.state is not State.CLOSED:
                ws.transport.abort()
        return served

    async def _watch(self, ws: ClientConnection, number: int) -> None:
        """Diagnostics: while the client means to read but gets nothing, note every few seconds
        where the bytes are (the kernel's receive queue, websockets' frame queue) and whether
        the transport reads, so a stalled run's evidence says which side stopped."""
        loop = asyncio.get_running_loop()
        noted = 0.0
        while True:
            await asyncio.sleep(0.5)
            now = loop.time()
            quiet = now - self._frame_at
            if not self._reading.is_set() or quiet < 2.0 or now - noted < 5.0:
                continue
            noted = now
            self._note(number, f"quiet {quiet:.1f}s: {connection_diagnostics(ws)}")

    def _closed(self, number: int, url: str, code: int | None, reason: str) -> None:
        if self._dropping:
            reason = f"dropped by the client ({reason})"
        self.disconnects.append(Disconnect(number, url, code, reason, self.timeline.phase))
        self._note(number, f"closed: {code} {reason}")

    async def _subscribe(self, ws: ClientConnection, state: _ConnectionState) -> None:
        self.subscribes += 1
        state.sent[self.subscribes] = self.last
        self._note(self.connections, f"subscribe {self.subscribes} since={self.last}")
        await ws.send(json.dumps(self.spec.frame(self.last, self.subscribes)))

    async def _on_frame(
        self, ws: ClientConnection, number: int, frame: dict[str, Any], state: _ConnectionState
    ) -> None:
        kind = frame.get("type")
        phase = self.timeline.phase
        if kind == "event":
            self.received.append(
                Received(
                    parse_cursor(frame["cursor"]),
                    frame["event_type"],
                    frame["user_id"],
                    frame.get("session_id"),
                    number,
                    state.subscription,
                    phase,
                )
            )
            self.last = frame["cursor"]
        elif kind == "subscribed":
            ref = frame.get("id")
            state.subscription = ref if isinstance(ref, int) else -1
            recovered = bool(frame.get("recovered"))
            self.replies.append(
                SubscribeReply(
                    number,
                    state.subscription,
                    state.url,
                    state.sent.get(state.subscription),
                    frame["cursor"],
                    recovered,
                    frame.get("reason"),
                    phase,
                    self.timeline.elapsed(),
                )
            )
            self._note(
                number,
                f"subscribed {frame.get('id')}: cursor={frame['cursor']} recovered={recovered}"
                f" reason={frame.get('reason')}",
            )
            if not recovered:
                self.recovered_false += 1
                self.last = frame["cursor"]  # the protocol: reload state, continue from here
            if self._stall_next:
                self._stall_next = False
                self._reading.clear()
                self.stalled.set()
                self._note(number, "stalled: not reading")
        elif kind == "error":
            code = str(frame.get("code"))
            self.error_frames.append((number, code, phase))
            self._note(number, f"error {code} id={frame.get('id')}: {frame.get('message')}")
            if code == "unavailable":
                # The subscribe did not take effect; the connection may have no subscription.
                # This client sends nothing but subscribes, so the reply is the outstanding
                # subscribe's even without its id (the hub omits it: test_outage_replies.py).
                self.unavailable += 1
                await asyncio.sleep(self.unavailable_retry * (0.5 + self._rng.random()))
                await self._subscribe(ws, state)
        else:
            self.unexpected.append(f"connection {number}: {frame}")


def connection_diagnostics(ws: ClientConnection) -> str:
    """A websockets client connection's read side, in one line (for evidence logs)."""
    transport = ws.transport
    messages = ws.recv_messages
    parts = [
        f"state={ws.state.name}",
        f"transport_reading={transport.is_reading()}",
        f"closing={transport.is_closing()}",
        f"queued_frames={len(messages.frames)}",
        f"paused={messages.paused}",
        f"get_in_progress={messages.get_in_progress}",
        f"write_buffer={transport.get_write_buffer_size()}",
    ]
    sock = transport.get_extra_info("socket")
    if sock is not None:
        parts += [f"{key}={value}" for key, value in tcp_state(sock).items()]
    return " ".join(parts)


class _ConnectionState:
    """Per connection: its URL, which subscribe the events belong to (the one whose reply came
    last), and the ``since`` each subscribe sent."""

    __slots__ = ("sent", "subscription", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self.subscription = 0
        self.sent: dict[int, str | None] = {}


# --- the check ----------------------------------------------------------------------------------
class Follower(Protocol):
    """A client as the check sees it (:class:`ResumingClient`, or a StreamClient's caller in
    tests/faults/clientkit.py): what it subscribed to, from where, and what it received."""

    name: str
    spec: SubscriptionSpec
    user_id: str
    is_admin: bool
    #: The starting ``since``; ``last`` the cursor of the last event received.
    baseline: str | None
    last: str | None
    received: list[Received]
    replies: list[SubscribeReply]
    error_frames: list[tuple[int, str, str]]
    connect_failures: Counter[str]
    unexpected: list[str]
    unavailable: int

    @property
    def disconnects(self) -> list[Disconnect]: ...

    @property
    def recovered_false(self) -> int: ...

    @property
    def reconnects(self) -> int: ...

    @property
    def last_cursor(self) -> Cursor | None: ...

    def evidence(self) -> dict[str, Any]: ...


@dataclass
class ClientVerdict:
    name: str
    entitled: int = 0
    deliveries: int = 0
    distinct: int = 0
    lost: list[Cursor] = field(default_factory=list)
    lost_by_phase: Counter[str] = field(default_factory=Counter)
    duplicates_within: int = 0  # a cursor again on the same connection ("no repeat")
    duplicates_across: int = 0  # a cursor again on a later connection
    out_of_order: int = 0  # a smaller cursor after a bigger one on the same connection
    foreign: list[Cursor] = field(default_factory=list)  # received, not entitled
    unauthorized: int = 0  # of those: another user's event on a non-admin connection
    recovered_false: int = 0
    #: Subscriptions that answered ``recovered: true`` and then skipped entitled events.
    false_recovered: list[str] = field(default_factory=list)
    reconnects: int = 0
    connect_failures: int = 0
    unavailable: int = 0
    closes: Counter[str] = field(default_factory=Counter)
    #: Frames the protocol does not allow here (a first frame other than ``ready``, an
    #: unknown type).
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.duplicates_within
            or self.out_of_order
            or self.foreign
            or self.recovered_false
            or self.false_recovered
            or self.unexpected
        )

    def line(self) -> str:
        phases = ", ".join(f"{p}: {n}" for p, n in self.lost_by_phase.items()) or "-"
        closes = ", ".join(f"{c} x{n}" for c, n in sorted(self.closes.items())) or "-"
        return (
            f"{self.name}: entitled={self.entitled} deliveries={self.deliveries} "
            f"distinct={self.distinct} lost={len(self.lost)} (by phase: {phases}) "
            f"dup_within={self.duplicates_within} dup_across={self.duplicates_across} "
            f"out_of_order={self.out_of_order} foreign={len(self.foreign)} "
            f"(unauthorized {self.unauthorized}) recovered_false={self.recovered_false} "
            f"false_recovered={len(self.false_recovered)} reconnects={self.reconnects} "
            f"(refused {self.connect_failures}) unavailable={self.unavailable} "
            f"closes=[{closes}] unexpected={len(self.unexpected)}"
        )


@dataclass
class Verdict:
    events: int
    faults: int
    clients: list[ClientVerdict]
    writer_errors: Counter[str]
    notes: list[str] = field(default_factory=list)

    def total(self, attr: str) -> int:
        values = (getattr(c, attr) for c in self.clients)
        return sum(len(v) if isinstance(v, list) else int(v) for v in values)

    @property
    def lost_by_phase(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.clients:
            total.update(c.lost_by_phase)
        return total

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.clients) and not self.notes

    def summary(self) -> str:
        errors = (
            ", ".join(f"{k.rsplit('.', 1)[-1]}={n}" for k, n in self.writer_errors.most_common())
            or "none"
        )
        return (
            f"fault scenario: events={self.events} faults={self.faults} "
            f"deliveries={self.total('deliveries')} lost={self.total('lost')} "
            f"duplicated={self.total('duplicates_across')} "
            f"(within a connection {self.total('duplicates_within')}) "
            f"foreign={self.total('foreign')} out_of_order={self.total('out_of_order')} "
            f"recovered_false={self.total('recovered_false')} "
            f"false_recovered={self.total('false_recovered')} "
            f"reconnects={self.total('reconnects')} "
            f"unavailable_retries={self.total('unavailable')} writer_errors={{{errors}}}"
        )

    def report(self) -> str:
        lines = [self.summary()]
        by_phase = self.lost_by_phase
        if by_phase:
            lines.append("lost by phase: " + ", ".join(f"{p}={n}" for p, n in by_phase.items()))
        lines += [f"  {c.line()}" for c in self.clients]
        for c in self.clients:
            if c.false_recovered:
                lines.append(f"  {c.name} false recovered: {'; '.join(c.false_recovered[:5])}")
            if c.unexpected:
                lines.append(f"  {c.name} unexpected frames: {'; '.join(c.unexpected[:5])}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def entitled_rows(client: Follower, rows: Iterable[StreamRow]) -> list[StreamRow]:
    """The rows ``client`` must receive: after its starting ``since``, allowed by the
    authorization rule and its subscription."""
    start = parse_cursor(client.baseline) if client.baseline else (0, 0)
    return [
        r
        for r in rows
        if r.cursor > start and client.spec.entitles(r, client.user_id, client.is_admin)
    ]


def verify(
    clients: Sequence[Follower],
    rows: Sequence[StreamRow],
    *,
    faults: int,
    writer_errors: Counter[str] | None = None,
) -> Verdict:
    """Compare each client's receipts with the outbox (see :class:`ClientVerdict`)."""
    verdicts = [_verify_one(client, rows) for client in clients]
    return Verdict(
        events=len(rows),
        faults=faults,
        clients=verdicts,
        writer_errors=writer_errors or Counter(),
    )


def _verify_one(client: Follower, rows: Sequence[StreamRow]) -> ClientVerdict:
    entitled = {r.cursor for r in entitled_rows(client, rows)}
    by_cursor = {r.cursor: r for r in rows}
    v = ClientVerdict(client.name, entitled=len(entitled), deliveries=len(client.received))
    v.recovered_false = client.recovered_false
    v.reconnects = client.reconnects
    v.connect_failures = sum(client.connect_failures.values())
    v.unavailable = client.unavailable
    v.unexpected = list(client.unexpected)
    for d in client.disconnects:
        v.closes[str(d.code) if d.code is not None else "none"] += 1

    seen: set[Cursor] = set()
    per_connection: dict[int, set[Cursor]] = {}
    previous: dict[int, Cursor] = {}
    for r in client.received:
        mine = per_connection.setdefault(r.connection, set())
        if r.cursor in mine:
            v.duplicates_within += 1
        elif r.cursor in seen:
            v.duplicates_across += 1
        before = previous.get(r.connection)
        if before is not None and r.cursor < before:
            v.out_of_order += 1
        previous[r.connection] = r.cursor
        mine.add(r.cursor)
        seen.add(r.cursor)
    v.distinct = len(seen)
    v.foreign = sorted(seen - entitled)
    v.unauthorized = sum(
        1
        for c in v.foreign
        if not client.is_admin and (c not in by_cursor or by_cursor[c].user_id != client.user_id)
    )
    v.lost = sorted(entitled - seen)

    # Attribute each lost event to the delivery that first went past it: its phase, and
    # whether that subscription had answered recovered: true for a `since` before the loss.
    replies = {(r.connection, r.subscription): r for r in client.replies}
    false_claims: dict[tuple[int, int], int] = {}
    lost = v.lost
    high: Cursor | None = None
    done = 0
    for r in client.received:
        if high is not None and r.cursor <= high:
            continue
        upto = bisect.bisect_left(lost, r.cursor)
        if upto > done:
            skipped = lost[done:upto]
            v.lost_by_phase[r.phase] += len(skipped)
            reply = replies.get((r.connection, r.subscription))
            if (
                reply is not None
                and reply.recovered
                and reply.since is not None
                and parse_cursor(reply.since) < skipped[0]
            ):
                key = (r.connection, r.subscription)
                false_claims[key] = false_claims.get(key, 0) + len(skipped)
            done = upto
        high = r.cursor
    if done < len(lost):
        v.lost_by_phase["never delivered"] += len(lost) - done
    for (conn, sub), count in false_claims.items():
        reply = replies[(conn, sub)]
        v.false_recovered.append(
            f"connection {conn} subscribe {sub} in {reply.phase}: since={reply.since} "
            f"recovered=true cursor={reply.cursor}, then {count} entitled events skipped"
        )
    return v


async def wait_caught_up(
    clients: Sequence[Follower],
    rows: Sequence[StreamRow],
    *,
    within: float = 30.0,
    record: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Wait until each client's ``last`` reached its newest entitled event; returns the names
    of those that did not within ``within`` seconds. ``record`` gets, per client, what the
    wait saw when it ended (for :func:`write_evidence`).

    The newest is the greatest cursor, whatever the order of ``rows``."""
    targets = {}
    for client in clients:
        mine = entitled_rows(client, rows)
        if mine:
            targets[client.name] = (client, max(r.cursor for r in mine))
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + within
    while True:
        behind = [
            name
            for name, (client, target) in targets.items()
            if client.last_cursor is None or client.last_cursor < target
        ]
        if not behind or loop.time() > deadline:
            break
        await asyncio.sleep(0.1)
    if record is not None:
        for name, (client, target) in targets.items():
            highest = max((r.cursor for r in client.received), default=None)
            record.append(
                {
                    "name": name,
                    "waited": round(loop.time() - started, 3),
                    "target": format_cursor(target),
                    "last": client.last,
                    "highest_received": None if highest is None else format_cursor(highest),
                    "received": len(client.received),
                    "behind": name in behind,
                }
            )
    return behind


def write_evidence(
    path: Path,
    clients: Sequence[Follower],
    rows: Sequence[StreamRow],
    verdict: Verdict | None = None,
    **extra: Any,
) -> Path:
    """Everything a failed run leaves to explain it, as one JSON file: per client its log
    (connections, subscribes, replies, error frames, closes, with how many events it had
    received at each), every received cursor and under which connection and subscribe, and
    what it lost; the outbox rows the check used; anything in ``extra``. Returns ``path``."""
    lost = {c.name: c.lost for c in verdict.clients} if verdict is not None else {}
    data = {
        "clients": [
            {**c.evidence(), "lost": [format_cursor(x) for x in lost.get(c.name, [])]}
            for c in clients
        ],
        "rows": [
            {
                "cursor": format_cursor(r.cursor),
                "user_id": r.user_id,
                "session_id": r.session_id,
                "root_session_id": r.root_session_id,
                "event_type": r.event_type,
            }
            for r in rows
        ],
        **extra,
    }
    path.write_text(json.dumps(data, indent=1, default=str))
    return path
