"""During a database outage every public DAL call raises a keen_stream error, and the DAL recovers.

A mix of calls runs concurrently against a private server (``owned_pg``) while the test kills
every backend, restarts the server (fast, then immediate: a crash), and stops it for a few
seconds. Whatever a call raises must be a :class:`keen_stream.errors.KeenError`: a caller
never has to know asyncpg's exceptions. After each fault a call succeeds again within a bound.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import asyncpg

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.models.connections import ConnectionBatch, ConnectionOpened
from keen_stream.dal.models.events import ORIGIN
from keen_stream.dal.users import upsert_super_admin
from keen_stream.errors import KeenError
from tests.conftest import ADMIN_EMAIL, PASSWORD, make_settings
from tests.integration.credits_support import fund
from tests.pgcluster import OwnedPostgres

#: How long the DAL may take to serve a call again once the server is back.
RECOVERY_BOUND = 20.0
#: A call that takes longer than this during a fault is hung, not failed.
CALL_BOUND = 30.0
_n = itertools.count()


class Workload:
    """Public DAL calls in a loop on several tasks; every exception is kept, by type."""

    def __init__(self, db: KeenDatabase, users: list[User], admin: User, node: uuid.UUID) -> None:
        self.db = db
        self.users = users
        self.admin = admin
        self.node = node
        self.raised: Counter[str] = Counter()
        self.foreign: list[BaseException] = []  # raised, but not a KeenError
        self.succeeded = 0
        self.succeeded_by_call: Counter[str] = Counter()
        self._stop = asyncio.Event()

    async def call(self, name: str, make: Callable[[], Awaitable[Any]]) -> None:
        try:
            await asyncio.wait_for(make(), CALL_BOUND)
            self.succeeded += 1
            self.succeeded_by_call[name] += 1
        except TimeoutError as exc:  # our bound, not the DAL's: a hang
            self.raised[f"{name}: hung"] += 1
            self.foreign.append(exc)
        except KeenError as exc:
            self.raised[type(exc).__name__] += 1
        except Exception as exc:
            self.raised[f"{type(exc).__module__}.{type(exc).__name__}"] += 1
            self.foreign.append(exc)

    def calls(self, user: User, token: str) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
        db, uid, n = self.db, user.id, next(_n)
        session = f"s{n}"

        async def session_life() -> None:
            await db.sessions.create_session(
                uid, session_handle=session, vision="v", working_directory="/w", git_branch="main"
            )
            await db.sessions.update_progress(uid, session, iterations=1, tool_calls=2)
            await db.sessions.complete_session(
                uid, session, success=True, claude_cost_usd=Decimal("0.001")
            )

        async def hold() -> None:
            held = await db.credits.reserve(uid, Decimal("0.002"))
            await db.credits.settle(held, Decimal("0.001"))

        async def deductions() -> None:  # concurrent: these leave in batches
            await asyncio.gather(
                *(
                    db.credits.deduct_credits(u.id, Decimal("0.0001"), None, "burst")
                    for u in self.users
                )
            )

        async def reader() -> None:
            conn = await db.events.connect_reader()
            conn.terminate()

        opened = ConnectionOpened(
            connection_id=f"c{n}",
            user_id=uid,
            token_id=None,
            client_ip="127.0.0.1",
            client_type="test",
            admin_connection=False,
            can_view_all_sessions=False,
            hub_node_id=self.node,
            connected_at=datetime.now(UTC),
        )
        return [
            (
                "users.create",
                lambda: db.users.create(
                    email=f"w{n}@example.com", username=f"w_{n}", password=PASSWORD
                ),
            ),
            ("users.get", lambda: db.users.get(uid)),
            ("users.authenticate", lambda: db.users.authenticate(user.email, PASSWORD)),
            ("tokens.issue", lambda: db.tokens.issue(uid, "session")),
            ("tokens.validate", lambda: db.tokens.validate(token)),
            (
                "credits.deduct",
                lambda: db.credits.deduct_credits(uid, Decimal("0.0001"), None, "single"),
            ),
            ("credits.deduct batched", deductions),
            ("credits.reserve+settle", hold),
            ("credits.get_balance", lambda: db.credits.get_balance(uid)),
            ("sessions", session_life),
            ("events.head", db.events.head),
            ("events.replay", lambda: db.events.replay(uid, ORIGIN, ORIGIN._replace(xid=2**62))),
            ("connections.flush", lambda: db.connections.flush(ConnectionBatch(opened=(opened,)))),
            ("connections.heartbeat", lambda: db.connections.heartbeat(self.node)),
            ("connections.list_for_user", lambda: db.connections.list_for_user(uid)),
            ("analytics.admin", lambda: db.analytics.get_admin_analytics(actor_id=self.admin.id)),
            ("analytics.rollup", lambda: db.analytics.rollup_daily(date.today())),
            ("events.connect_reader", reader),
            ("check_role_safety", db.check_role_safety),
        ]

    async def _worker(self, index: int) -> None:
        user = self.users[index % len(self.users)]
        issued = await self.db.tokens.issue(user.id, "session")
        token = issued.token.get_secret_value()
        while not self._stop.is_set():
            for name, make in self.calls(user, token):
                await self.call(name, make)
                if self._stop.is_set():
                    return
            await asyncio.sleep(0)

    async def run(self, workers: int) -> None:
        await asyncio.gather(*(self._worker(i) for i in range(workers)))

    def stop(self) -> None:
        self._stop.set()


async def recovers(work: Workload) -> float:
    """Seconds until a call succeeds again (fails the test past RECOVERY_BOUND)."""
    started = time.monotonic()
    while time.monotonic() - started < RECOVERY_BOUND:
        before = work.succeeded
        await work.call("probe", lambda: work.db.credits.get_balance(work.users[0].id))
        if work.succeeded > before:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"the DAL did not recover within {RECOVERY_BOUND} s: {work.raised}")


async def terminate_backends(pg: OwnedPostgres) -> None:
    conn = await asyncpg.connect(pg.dsn("postgres"))
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = 'keen' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()


async def stop_for_a_while(pg: OwnedPostgres) -> None:
    await asyncio.to_thread(pg.stop, "fast")
    await asyncio.sleep(3)
    await asyncio.to_thread(pg.start)


async def test_every_call_during_outages_raises_a_keen_error_and_the_dal_recovers(
    owned_pg: OwnedPostgres, owned_dsn: str
) -> None:
    settings = make_settings(owned_dsn, pool_max_size=8, connect_timeout=2, pool_acquire_timeout=2)
    db = await KeenDatabase.connect(settings=settings, migrate=False)
    try:
        users = [
            await db.users.create(email=f"u{i}@example.com", username=f"u_{i}", password=PASSWORD)
            for i in range(4)
        ]
        for user in users:
            await fund(db, user, "1000")
        admin = await upsert_super_admin(db, ADMIN_EMAIL, PASSWORD)
        node = await db.connections.register_node()
        work = Workload(db, users, admin, node.id)
        running = asyncio.create_task(work.run(workers=6))
        faults: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("terminate all backends", lambda: terminate_backends(owned_pg)),
            ("restart fast", lambda: asyncio.to_thread(owned_pg.restart, "fast")),
            ("restart immediate", lambda: asyncio.to_thread(owned_pg.restart, "immediate")),
            ("stopped for 3 s", lambda: stop_for_a_while(owned_pg)),
        ]
        recovered: dict[str, float] = {}
        try:
            await asyncio.sleep(0.5)
            for name, fault in faults:
                before = work.succeeded
                await fault()
                recovered[name] = await recovers(work)
                await asyncio.sleep(0.5)  # the mix runs on the recovered server for a while
                assert work.succeeded > before, f"no call succeeded after {name}"
        finally:
            work.stop()
            await running
        report = ", ".join(f"{k}: {v}" for k, v in sorted(work.raised.items()))
        print(f"\nraised during faults: {report}; recovered after (s): {recovered}")
        assert not work.foreign, (
            f"non-keen_stream errors reached callers ({report}): {work.foreign[:5]!r}"
        )
        assert sum(work.raised.values()) > 0, "the faults never reached a call: proves nothing"
        names = {name for name, _ in work.calls(users[0], "")}
        assert names <= set(work.succeeded_by_call), "a call never succeeded: the mix is broken"
        assert db.credits.batch_stats()["batches"] > 0, "no deduction went in a batch"
    finally:
        await db.close()
