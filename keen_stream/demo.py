"""``keen-stream demo``: the whole platform in under a minute, on a database it throws away.

It starts PostgreSQL (the embedded server in a new temporary directory; with
``--use-database-url``, a scratch database on ``KEEN_DATABASE_URL``'s server instead), migrates
it, runs a hub in this process, creates two users and the admin, and plays a recursive agent run
through the data layer: root sessions spawning sub-agents two levels deep, progress reports,
model calls reserved as credit holds and settled into charges, one sub-agent failing. Three
:class:`~keen_stream.client.StreamClient` watchers (the admin, alice, bob) print each event the
hub delivers to them, one line each, as it arrives. It ends with the admin analytics and the
ledger's verification. Everything it started is stopped and removed at the end, on Ctrl-C,
SIGTERM or an error too.

Picked up by ``keen_stream.cli`` through :func:`register`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO
from urllib.parse import urlsplit

from keen_stream.client import (
    Event,
    StreamClient,
    StreamUnavailable,
    Subscription,
    SubscriptionRejected,
)
from keen_stream.errors import ConfigurationError, DatabaseUnavailable
from keen_stream.settings import Settings, with_database

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase
    from keen_stream.dal.models import User
    from keen_stream.dal.models.analytics import AdminAnalytics

#: Seconds between the run's steps, so that a person can follow it (``--fast``: none).
PAUSE: Final = 0.6
#: How long the watchers may take to receive the last events once the run has ended.
DELIVERY_TIMEOUT: Final = 15.0
#: Exit status after Ctrl-C or SIGTERM (the shell's 128 + SIGINT).
INTERRUPTED: Final = 130
DEMO_PREFIX: Final = "keen-demo-"
#: Signals that end the demo as Ctrl-C (SIGINT) does: cleanly, leaving nothing behind.
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGHUP)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="a recursive agent run streamed live to three watchers, on a throwaway database",
        description=(
            "Starts the embedded PostgreSQL in a new temporary directory (your data directory "
            "is never touched), a hub, two users and the admin; plays a recursive agent run "
            "while WebSocket clients print the events each of them receives; prints the admin "
            "analytics and verifies the ledger; then stops and removes everything. Exit 0 when "
            "every check passed, 1 when one failed, 2 on an error, 130 when interrupted."
        ),
    )
    p.add_argument("--fast", action="store_true", help="no pauses between steps (tests, CI)")
    p.add_argument(
        "--use-database-url",
        action="store_true",
        help="instead of the embedded server, use KEEN_DATABASE_URL's server: the demo creates "
        "a scratch database there (keen_demo_<random>; needs CREATEDB) and drops it afterwards",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    out = Output(sys.stdout)
    started = time.monotonic()
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        with _database(settings, use_database_url=args.use_database_url, out=out) as dsn:
            ok = asyncio.run(_main(dsn, settings, fast=args.fast, out=out))
        out.say(f"demo finished in {time.monotonic() - started:.1f} s; nothing left running")
        return 0 if ok else 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        out.say("interrupted: everything the demo started is stopped and removed")
        return INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: object) -> None:
    """Outside the event loop, SIGTERM and SIGHUP unwind like Ctrl-C: through every finally."""
    raise KeyboardInterrupt


async def _main(dsn: str, settings: Settings, *, fast: bool, out: Output) -> bool:
    """:func:`_play`, which SIGTERM and SIGHUP cancel (as asyncio.run's handler does on Ctrl-C),
    so that its cleanup runs in order: watchers, hub, pool, then the database."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is None:  # pragma: no cover -- asyncio.run always runs us in a task
        raise RuntimeError("_main must run as a task")
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await _play(dsn, settings, fast=fast, out=out)
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, _interrupt)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Cleanup that a second Ctrl-C must not cut short (it would leave a server running)."""
    held = (signal.SIGINT, *STOP_SIGNALS)
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in held}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """A block that an interrupt does not cut short but ends: it is raised once the block is
    done. Starting the embedded server is one: initdb's own backend, which nobody would wait
    for, would go on writing into the data directory after the cleanup removed it."""
    received: list[int] = []

    def note(signum: int, frame: object) -> None:
        received.append(signum)

    deferred = [
        sig for sig in (signal.SIGINT, *STOP_SIGNALS) if signal.getsignal(sig) != signal.SIG_IGN
    ]
    saved = {sig: signal.signal(sig, note) for sig in deferred}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if received:  # the interrupt wins over what the block raised (a killed initdb, say)
            raise KeyboardInterrupt


# --- the database ------------------------------------------------------------------------------
@contextmanager
def _database(settings: Settings, *, use_database_url: bool, out: Output) -> Iterator[str]:
    """A DSN to a new, empty database that is gone (server stopped or database dropped) after."""
    if use_database_url:
        with _scratch_database(settings, out) as dsn:
            yield dsn
    else:
        with _embedded_database(out) as dsn:
            yield dsn


@contextmanager
def _embedded_database(out: Output) -> Iterator[str]:
    from keen_stream.embedded import EmbeddedPostgres, stop_server, watchdog_pid

    root = Path(tempfile.mkdtemp(prefix=DEMO_PREFIX))
    data = root / "pgdata"
    embedded = EmbeddedPostgres(data, "keen")
    try:
        out.say(f"starting PostgreSQL (embedded) in {data}")
        with _interrupts_deferred():
            dsn = embedded.start()
        yield dsn
    finally:
        with _signals_held():
            embedded.stop()
            stop_server(data)  # one interrupted while starting has no handle to stop it by
            # The server is stopped: its watchdog has nothing left to watch. It would exit by
            # itself, seconds later on a busy machine; the demo leaves nothing running.
            pid = watchdog_pid(data)
            if pid is not None and pid > 0:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while watchdog_pid(data) is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            shutil.rmtree(root, ignore_errors=True)
            out.say(f"stopped PostgreSQL and removed {root}")


@contextmanager
def _scratch_database(settings: Settings, out: Output) -> Iterator[str]:
    url = settings.database_url
    if not url:
        raise ConfigurationError("--use-database-url needs KEEN_DATABASE_URL")
    name = f"keen_demo_{secrets.token_hex(4)}"
    where = urlsplit(url).hostname or "the local socket"
    out.say(f"creating the scratch database {name} on {where}")
    created = False
    try:
        with _interrupts_deferred():  # so that "created" is exact
            asyncio.run(_execute(url, f'CREATE DATABASE "{name}"'))
            created = True
        yield with_database(url, name)
    finally:
        if created:
            with _signals_held():
                asyncio.run(_execute(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                out.say(f"dropped the scratch database {name}")


async def _execute(dsn: str, statement: str) -> None:
    import asyncpg

    from keen_stream.dal.pgerrors import translating

    with translating():
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()


# --- output ------------------------------------------------------------------------------------
class Output:
    """The demo's lines: ``[name ] text``; an event line per event a watcher receives."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.gone = False
        # A terminal without UTF-8 still gets every line (the tree and arrows degrade to "?").
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")

    def line(self, tag: str, text: str) -> None:
        self._write(f"[{tag:<5}] {text}")

    def say(self, text: str) -> None:
        self.line("demo", text)

    def blank(self) -> None:
        self._write("")

    def _write(self, text: str) -> None:
        if self.gone:
            return
        try:
            print(text, file=self.stream, flush=True)
        except BrokenPipeError:
            # The reader left (`keen-stream demo | head`): carry on quietly, cleanup included,
            # and let nothing try this stream again (Python's own flush at exit would).
            self.gone = True
            with suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())


def session_label(handle: str) -> str:
    """``alice-build-3f9a2c`` -> ``build``: the demo's handles are ``<user>-<label>-<random>``."""
    parts = handle.split("-")
    return "-".join(parts[1:-1]) or handle


def tree_cell(label: str, depth: int) -> str:
    return label if depth == 0 else "  " * (depth - 1) + "└─ " + label


@dataclass
class WatchedSession:
    label: str
    depth: int


def format_event(
    event: Event, names: dict[uuid.UUID, str], sessions: dict[uuid.UUID, WatchedSession]
) -> str:
    """One readable line for an event: time, user, place in the session tree, type, what
    changed, and the money (decimal strings, as the hub sends them).

    ``sessions`` is what this watcher has learnt from the stream (session.created); it is
    updated here, so a credit event is placed in the tree by what the watcher saw before.
    """
    data = event.data
    if event.event_type.startswith("session.") and event.session_id is not None:
        sessions.setdefault(
            event.session_id,
            WatchedSession(session_label(str(data.get("session_handle"))), int(data["depth"])),
        )
    where = sessions.get(event.session_id) if event.session_id else None
    tree = tree_cell(where.label, where.depth) if where else "(account)"
    detail, money = _describe(event, sessions)
    when = event.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
    user = names.get(event.user_id, str(event.user_id)[:8])
    text = f"{when}  {user:<5}  {tree:<16} {event.event_type:<21} {detail}"
    return f"{text:<96} {money}".rstrip() if money else text


def _describe(event: Event, sessions: dict[uuid.UUID, WatchedSession]) -> tuple[str, str]:
    data = event.data
    kind = event.event_type
    if kind.startswith("credit."):
        return str(data.get("description", "")), (
            f"{data['amount']} cr, balance {data['balance_after']}"
        )
    phase = data.get("phase")
    budget = data.get("credit_budget")
    money = f"budget {data['budget_used']} of {budget} cr" if budget is not None else ""
    if kind == "session.created":
        parent_id = data.get("parent_session_id")
        parent = sessions.get(uuid.UUID(parent_id)) if parent_id else None
        return (f"{phase}, sub-agent of {parent.label}" if parent else f"{phase}, root"), money
    if kind == "session.phase_changed":
        return f"{data.get('previous_phase')} → {phase}", money
    if kind == "session.progress":
        counts = (
            f"{phase}  iterations {data['iteration_count']}  tools {data['tool_calls_count']}"
            f"  tokens {data['tokens_used']}"
        )
        return counts, money
    if kind == "session.completed":
        cost = f"charged {data['keen_cost_credits']} cr (${data['claude_cost_usd']})"
        if data.get("success"):
            return "completed", cost
        return f"FAILED: {data.get('error_message')}", cost
    return str(data.get("status")), money


# --- the watchers ------------------------------------------------------------------------------
@dataclass
class Watcher:
    """A StreamClient following what the hub lets one user see, printing each event."""

    name: str
    user_id: uuid.UUID
    token: str
    scope: Literal["mine", "all"]
    out: Output
    names: dict[uuid.UUID, str]
    events: list[Event] = field(default_factory=list)
    sessions: dict[uuid.UUID, WatchedSession] = field(default_factory=dict)
    subscription: Subscription | None = None

    @property
    def subscribed(self) -> bool:
        """The hub has answered ``subscribed``: every event written from now on will come."""
        return self.subscription is not None and self.subscription.cursor is not None

    async def follow(self, url: str) -> None:
        async with StreamClient(url, token=self.token, max_attempts=5) as client:
            self.subscription = client.subscribe(scope=self.scope)
            async for event in self.subscription:
                self.events.append(event)
                self.out.line(self.name, format_event(event, self.names, self.sessions))

    def count_by_user(self) -> Counter[uuid.UUID]:
        return Counter(event.user_id for event in self.events)


async def _when(predicate: Callable[[], bool], within: float = 30.0) -> bool:
    """Wait until ``predicate()`` holds; False if it still does not after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --- the run -----------------------------------------------------------------------------------
@dataclass
class Member:
    name: str
    user: User
    token: str


class Agent:
    """One simulated agent session: the calls the agent core makes, through the data layer."""

    #: The session's row id (``AgentSession.id``), once started.
    id: uuid.UUID

    def __init__(self, play: Play, member: Member, label: str, parent: Agent | None) -> None:
        self.play = play
        self.member = member
        self.label = label
        self.parent = parent
        self.handle = f"{member.name}-{label}-{secrets.token_hex(3)}"

    @property
    def db(self) -> KeenDatabase:
        return self.play.db

    @property
    def path(self) -> str:
        return self.label if self.parent is None else f"{self.parent.path}/{self.label}"

    async def start(self, vision: str) -> Agent:
        session = await self.db.sessions.create_session(
            self.member.user.id,
            session_handle=self.handle,
            parent_session_handle=self.parent.handle if self.parent else None,
            vision=vision,
            working_directory=f"/work/{self.member.name}",
            git_branch="main",
        )
        self.id = session.id
        await self.play.pause()
        return self

    async def spawn(self, label: str, vision: str) -> Agent:
        return await Agent(self.play, self.member, label, self).start(vision)

    async def sub_agent(
        self,
        label: str,
        vision: str,
        *,
        work: tuple[int, int, int],
        call: tuple[str, str],
        cost: str,
    ) -> None:
        """A sub-agent that explores (``work``: iterations, tool calls, tokens), makes one model
        call (``call``: estimated and actual USD), wraps up and completes, its last call
        (``cost``) charged with its end."""
        agent = await self.spawn(label, vision)
        iterations, tool_calls, tokens = work
        await agent.progress(
            iterations=iterations, tool_calls=tool_calls, tokens=tokens, context_tokens=tokens // 2
        )
        await agent.model_call(*call)
        await agent.progress("COMPLETE", iterations=1, tokens=tokens // 5)
        await agent.complete(cost)

    async def progress(self, phase: str | None = None, **counts: int) -> None:
        await self.db.sessions.update_progress(
            self.member.user.id, self.handle, phase=phase, **counts
        )
        await self.play.pause()

    async def model_call(self, estimate: str, actual: str | None) -> None:
        """Reserve the estimated cost as a hold, then settle it at the actual cost (or release
        it: the call failed, nothing is charged)."""
        credits = self.db.credits
        hold = await credits.reserve(
            self.member.user.id,
            Decimal(estimate),
            session_handle=self.handle,
            description=f"model call in {self.label}",
        )
        self.play.narrate(
            f"{self.member.name}/{self.path}: model call, hold of {hold.amount} credits"
            f" (estimated ${hold.estimated_claude_cost_usd})"
        )
        await self.play.pause()
        if actual is None:
            await credits.release(hold)
            self.play.narrate(
                f"{self.member.name}/{self.path}: the call failed; hold released, nothing charged"
            )
        else:
            tx = await credits.settle(hold, Decimal(actual))
            self.play.narrate(
                f"{self.member.name}/{self.path}: settled at ${actual}: {-tx.amount} credits"
                f" charged, the rest of the hold freed"
            )
        await self.play.pause()

    async def complete(self, cost: str) -> None:
        await self.db.sessions.complete_session(
            self.member.user.id, self.handle, success=True, claude_cost_usd=Decimal(cost)
        )
        await self.play.pause()

    async def fail(self, error: str, cost: str) -> None:
        await self.db.sessions.fail_session(
            self.member.user.id, self.handle, error_message=error, claude_cost_usd=Decimal(cost)
        )
        await self.play.pause()


@dataclass
class Play:
    db: KeenDatabase
    out: Output
    fast: bool

    async def pause(self, steps: float = 1.0) -> None:
        await asyncio.sleep(0 if self.fast else PAUSE * steps)

    def narrate(self, text: str) -> None:
        self.out.line("run", text)


async def alice_run(play: Play, alice: Member) -> None:
    """A root that plans, summons two sub-agents, one of which summons two more (depth 2);
    one of those fails."""
    root = await Agent(play, alice, "root", None).start("Add rate limiting to the public API")
    await play.db.sessions.set_budget(alice.user.id, root.handle, Decimal("25"))
    play.narrate(f"alice/root: budget of 25 credits for the whole tree ({root.handle})")
    await root.progress(iterations=1, tool_calls=3, tokens=4200, context_tokens=1800)
    await root.model_call("0.30", "0.24")
    await root.progress("PLAN", iterations=1, tool_calls=1, tokens=2600, context_tokens=900)
    await root.progress("SUMMON")

    async def build() -> None:
        agent = await root.spawn("build", "Implement the limiter")
        await agent.progress(iterations=1, tool_calls=4, tokens=3800, context_tokens=1500)
        await agent.model_call("0.25", "0.21")
        await agent.progress("SUMMON")

        async def lint() -> None:
            child = await agent.spawn("lint", "Lint and type-check the change")
            await child.progress(iterations=1, tool_calls=2, tokens=1400, context_tokens=500)
            await child.model_call("0.10", None)
            await child.fail("ruff crashed: exit status 2", "0.02")

        await asyncio.gather(
            agent.sub_agent(
                "tests",
                "Write the limiter's tests",
                work=(2, 5, 3300),
                call=("0.15", "0.12"),
                cost="0.03",
            ),
            lint(),
        )
        await agent.progress("COMPLETE", iterations=1, tokens=700)
        await agent.complete("0.04")

    await asyncio.gather(
        root.sub_agent(
            "research",
            "Survey the rate limiter options",
            work=(2, 6, 5100),
            call=("0.20", "0.17"),
            cost="0.05",
        ),
        build(),
    )
    await root.progress("COMPLETE", iterations=1, tokens=1100)
    await root.complete("0.06")


async def bob_run(play: Play, bob: Member) -> uuid.UUID:
    """A smaller run at the same time: a root and one sub-agent."""
    root = await Agent(play, bob, "root", None).start("Summarise this week's changelog")
    await root.progress(iterations=1, tool_calls=2, tokens=2100, context_tokens=700)
    await root.progress("SUMMON")
    await root.sub_agent(
        "notes", "Draft the release notes", work=(2, 3, 2900), call=("0.12", "0.09"), cost="0.02"
    )
    await root.progress("COMPLETE", iterations=1, tokens=500)
    await root.complete("0.03")
    return root.id


# --- the whole demo ----------------------------------------------------------------------------
async def _play(dsn: str, settings: Settings, *, fast: bool, out: Output) -> bool:
    """Migrate, serve, run, check. True when every check passed."""
    from keen_stream.dal.database import KeenDatabase
    from keen_stream.hub.app import create_app
    from keen_stream.hub.cli import serving
    from keen_stream.migrate import upgrade_async

    settings = settings.model_copy(
        update={
            "database_url": dsn,
            "auto_migrate": False,
            # The users' passwords are random and die with the database: the cheapest argon2
            # saves seconds of CPU (five hashes at 64 MiB) that the demo is not about.
            "argon2_time_cost": 1,
            "argon2_memory_kib": 8192,
            "argon2_parallelism": 1,
        }
    )
    out.say("migrating the new database")
    await upgrade_async(dsn)
    db = await KeenDatabase.connect(settings=settings, migrate=False)
    try:
        app = create_app(settings, db=db)
        async with serving(app, settings) as port:
            if not await _when(lambda: app.service is not None and app.service.listener.connected):
                raise DatabaseUnavailable("the hub's event listener could not connect")
            url = f"ws://127.0.0.1:{port}/ws"
            out.say(f"hub listening on {url}")
            try:
                return await _scenario(db, url, fast=fast, out=out)
            finally:
                out.say("stopping the hub")
    finally:
        await db.close()


async def _cast(db: KeenDatabase, out: Output) -> tuple[Member, Member, Member]:
    from keen_stream.dal.users import upsert_super_admin

    async def member(name: str, user: User) -> Member:
        issued = await db.tokens.issue(user.id, "session", scopes=["stream"])
        return Member(name, user, issued.token.get_secret_value())

    async def registered(name: str) -> Member:
        password = secrets.token_urlsafe(16)  # thrown away with the database
        await db.users.create(email=f"{name}@example.com", username=name, password=password)
        user = await db.users.authenticate(f"{name}@example.com", password)  # a login
        return await member(name, user)

    admin_user = await upsert_super_admin(db, "admin@example.com", secrets.token_urlsafe(16))
    admin = await member("admin", admin_user)
    alice, bob = await asyncio.gather(registered("alice"), registered("bob"))
    out.say("users: alice and bob (logged in, stream tokens issued); admin@example.com (admin)")
    return admin, alice, bob


async def _scenario(db: KeenDatabase, url: str, *, fast: bool, out: Output) -> bool:
    admin, alice, bob = await _cast(db, out)
    names = {m.user.id: m.name for m in (admin, alice, bob)}
    watchers = [
        Watcher("admin", admin.user.id, admin.token, "all", out, names),
        Watcher("alice", alice.user.id, alice.token, "mine", out, names),
        Watcher("bob", bob.user.id, bob.token, "mine", out, names),
    ]
    tasks = [asyncio.create_task(w.follow(url)) for w in watchers]
    try:
        ready = await _when(
            lambda: all(w.subscribed for w in watchers) or any(t.done() for t in tasks)
        )
        _fail_fast(tasks)
        if not ready:
            raise StreamUnavailable("the watchers could not subscribe within 30 s")
        out.say("watching: the admin every user's events (scope all), alice and bob their own")
        out.say(
            "the run: alice's root agent summons research and build; build summons tests and"
            " lint (depth 2); lint fails. Bob's root summons notes, at the same time. Each model"
            " call reserves a credit hold, settled into a charge when the call returns."
        )
        out.say("an event line: [watcher] time  user  session tree  event  progress  money")
        out.blank()
        before = await _events_per_user(db)
        play = Play(db, out, fast)
        await asyncio.gather(
            db.billing.purchase(alice.user.id, Decimal("50.00"), description="card payment"),
            db.billing.purchase(bob.user.id, Decimal("20.00"), description="card payment"),
        )
        await play.pause()
        _, bob_root = await asyncio.gather(alice_run(play, alice), bob_run(play, bob))
        written = await _events_per_user(db) - before
        delivered = await _delivery(watchers, written, tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    out.blank()
    isolated = _report_isolation(watchers, written, out)
    await _report_refusals(db, url, alice, bob_root, out)
    out.blank()
    await _report_money(db, admin, (alice, bob), out)
    return delivered and isolated and await _verify_ledger(db, out)


def _fail_fast(tasks: list[asyncio.Task[None]]) -> None:
    """A watcher that stopped (refused token, hub gone) is an error, not a silent gap."""
    for task in tasks:
        if task.done():
            task.result()


async def _events_per_user(db: KeenDatabase) -> Counter[uuid.UUID]:
    """What the outbox holds per user: what the watchers must receive."""
    async with db.system_transaction() as conn:
        rows = await conn.fetch("SELECT user_id, count(*) AS n FROM stream_events GROUP BY 1")
    return Counter({row["user_id"]: row["n"] for row in rows})


async def _delivery(
    watchers: list[Watcher], written: Counter[uuid.UUID], tasks: list[asyncio.Task[None]]
) -> bool:
    """Wait until every watcher has the events written for it; False if some never came."""

    def expected(w: Watcher) -> int:
        return sum(written.values()) if w.scope == "all" else written[w.user_id]

    await _when(
        lambda: all(len(w.events) >= expected(w) for w in watchers) or any(t.done() for t in tasks),
        DELIVERY_TIMEOUT,
    )
    _fail_fast(tasks)
    ok = True
    for w in watchers:
        if len(w.events) != expected(w):
            w.out.say(
                f"MISSING: {w.name}'s watcher received {len(w.events)} of {expected(w)} events"
            )
            ok = False
    return ok


def _report_isolation(watchers: list[Watcher], written: Counter[uuid.UUID], out: Output) -> bool:
    names = watchers[0].names
    ok = True
    for w in watchers:
        got = w.count_by_user()
        mix = ", ".join(
            f"{names[u]} {n}" for u, n in sorted(got.items(), key=lambda i: names[i[0]])
        )
        if w.scope == "all":
            out.say(f"isolation: the admin's watcher received {len(w.events)} events ({mix})")
            continue
        others = sum(n for u, n in written.items() if u != w.user_id)
        foreign = len(w.events) - got[w.user_id]
        if foreign:
            ok = False
            out.say(f"ISOLATION BROKEN: {w.name}'s watcher received {foreign} events of others")
        else:
            out.say(
                f"isolation: {w.name}'s watcher received {len(w.events)} events, all {w.name}'s;"
                f" none of the other {others}"
            )
    return ok


async def _report_refusals(
    db: KeenDatabase, url: str, alice: Member, bob_root: uuid.UUID, out: Output
) -> None:
    from keen_stream.errors import InsufficientPrivileges

    async def ask(**subscription: Any) -> str:
        async with StreamClient(url, token=alice.token, max_attempts=1) as client:
            try:
                async for _ in client.subscribe(**subscription):
                    return "NOT refused"
            except SubscriptionRejected as exc:
                return f"refused ({exc.error_code})"
        return "NOT refused"

    out.say(
        f"isolation: alice asks the hub for bob's root session: {await ask(sessions=[bob_root])}"
    )
    out.say(f"isolation: alice asks the hub for every user's events: {await ask(scope='all')}")
    try:
        await db.analytics.get_admin_analytics("day", actor_id=alice.user.id)
        out.say("isolation: alice asks for the admin analytics: NOT refused")
    except InsufficientPrivileges as exc:
        out.say(f"isolation: alice asks for the admin analytics: refused ({exc.code})")


async def _report_money(
    db: KeenDatabase, admin: Member, members: tuple[Member, ...], out: Output
) -> None:
    for m in members:
        b = await db.credits.get_balance(m.user.id)
        out.say(
            f"balance: {m.name} {b.current} credits (bought {b.lifetime_purchased},"
            f" spent {b.lifetime_spent}, held {b.held})"
        )
    analytics = await db.analytics.get_admin_analytics("day", actor_id=admin.user.id)
    out.blank()
    for text in format_analytics(analytics):
        out.line("admin", text)


def format_analytics(a: AdminAnalytics) -> list[str]:
    """The admin analytics as the demo prints them (money as decimal strings)."""
    u, s, r, c, t = (
        a.user_metrics,
        a.session_metrics,
        a.recursion_metrics,
        a.cost_analysis,
        a.context_usage,
    )
    return [
        f"analytics, last {a.time_range} (db.analytics.get_admin_analytics):",
        f"  users      {u.total_users} registered, {u.new_users} new, {u.active_users} active",
        f"  sessions   {s.total_sessions} started: {s.successful_sessions} completed,"
        f" {s.failed_sessions} failed, {s.cancelled_sessions} cancelled,"
        f" {s.timed_out_sessions} timed out, {s.running_sessions} running",
        f"  recursion  {r.total_recursive_sessions} sub-agent sessions, average depth"
        f" {r.avg_recursion_depth}, deepest {r.max_recursion_depth}",
        f"  cost       Claude ${c.total_claude_costs} -> {c.total_credit_revenue} credits"
        f" (markup {c.markup_effectiveness}), charged as sessions ended",
        f"  ledger     {c.credits_purchased} credits purchased, {c.credits_used} used"
        " (model calls and session ends)",
        f"  tokens     {t.total_tokens} total, {t.context_tokens} context"
        f" (utilization {t.context_utilization_rate})",
    ]


async def _verify_ledger(db: KeenDatabase, out: Output) -> bool:
    from keen_stream.ledger_cli import format_report

    report = await db.credits.verify_ledger()
    out.blank()
    for text in format_report(report).splitlines():
        out.line("admin", text)
    return report.ok
