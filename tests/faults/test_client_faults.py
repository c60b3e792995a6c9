"""keen_stream.client under real faults: its caller sees every event it is entitled to exactly
once, in order, or a typed signal.

The harness of test_fault_scenario.py (a PostgreSQL server the test owns, two hub nodes as
processes, a writer through the DAL), with StreamClients as the clients, each given both
nodes' URLs and iterated by an application (tests/faults/clientkit.py). The faults are the
ones a client library meets: a listener killed, a node restarted for a deploy (1012), a node
that hangs (SIGSTOP: nothing closes, only an unanswered ping tells), a node killed (no close
frame), an application too slow for the hub (4008), and tokens expiring while connected (one
client has a provider with a fresh token and carries on; one has none and must end with
``TokenExpired``). docs/reliability.md, "The Python client under faults", has the results.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from keen_stream.client import TokenExpired
from tests.faults.clientkit import StreamClientConsumer
from tests.faults.harness import (
    LISTENER_APPLICATION_NAME,
    HubNode,
    SubscriptionSpec,
    Timeline,
    Writer,
    entitled_rows,
    format_cursor,
    head_cursor,
    read_stream,
    tenants,
    terminate_backends,
    verify,
    wait_caught_up,
    write_evidence,
    writer_database,
)
from tests.integration.hubkit import wait_for
from tests.pgcluster import OwnedPostgres, requires_owned_postgres

pytestmark = requires_owned_postgres

#: Quiet time after each fault, the writer still writing.
SETTLE = 1.0
#: The nodes ping every second, so an application that stops reading is closed as too slow
#: (4008) within about two; the close waits up to 5 s for it to read up to the close frame, so
#: the application sees the 4008 (not a cut connection) when it reads again.
HUB_ENV = {"KEEN_HUB_WS_PING_INTERVAL": "1", "KEEN_HUB_CLOSE_TIMEOUT": "5"}
SLOW_CLOSED = "keen_hub_slow_consumers_closed_total"
#: How long node B hangs (SIGSTOP). The clients ping after 0.5 s of quiet and give up 0.75 s
#: later, so they have left it before it wakes (and before the other node would count it
#: stale, KEEN_HUB_NODE_STALE_AFTER = 3 s).
HANG = 2.5
DATABASE = "keen"


@dataclass
class ClientScenario:
    pg: OwnedPostgres
    timeline: Timeline
    nodes: dict[str, HubNode]
    consumers: list[StreamClientConsumer]
    log: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    faults: int = 0

    def consumer(self, name: str) -> StreamClientConsumer:
        return next(c for c in self.consumers if c.name == name)

    @property
    def following(self) -> list[StreamClientConsumer]:
        """The consumers still meant to be following (not the one whose token ran out)."""
        return [c for c in self.consumers if c.expect is None or not c.done]

    def on(self, node: HubNode) -> list[StreamClientConsumer]:
        return [c for c in self.following if c.url == node.url]

    def fault(self, name: str) -> None:
        self.faults += 1
        self.timeline.enter(f"{self.faults} {name}")

    def note(self, text: str) -> None:
        self.log.append(f"[{self.timeline.elapsed():6.2f}s] {self.timeline.phase}: {text}")

    def problem(self, text: str) -> None:
        self.problems.append(f"fault {self.timeline.phase}: {text}")

    async def all_live(self, within: float = 20.0) -> None:
        await wait_for(
            lambda: all(c.live for c in self.following), "every consumer live", within=within
        )

    async def settle(self) -> None:
        await asyncio.sleep(SETTLE)
        await self.all_live()

    def expect_moved(self, moved: list[StreamClientConsumer], to: HubNode) -> None:
        names = [c.name for c in moved]
        self.note(f"{names} resumed on node {to.name}")
        if not moved:
            self.problem(f"no consumer was affected (none was on the node other than {to.name})")
        if any(c.url != to.url for c in moved):
            self.problem(f"{names} did not all move to node {to.name}")

    # --- the faults ---------------------------------------------------------------------------
    async def listener_terminated(self) -> None:
        self.fault("listener terminated")
        killed = await terminate_backends(
            self.pg.dsn("postgres"), DATABASE, application_name=LISTENER_APPLICATION_NAME
        )
        self.note(f"terminated {killed} listener backends")
        if killed < len(self.nodes):
            self.problem(f"terminated {killed} listeners, expected one per node")
        await asyncio.gather(*(n.wait_healthy() for n in self.nodes.values()))
        await self.settle()

    async def node_restarted(self, name: str, other: str) -> None:
        """A deploy: SIGTERM (uvicorn closes with 1012), then the node starts again."""
        self.fault(f"node {name} SIGTERM and restart")
        node, to = self.nodes[name], self.nodes[other]
        moved = self.on(node)
        before = {c.name: c.closes[1012] for c in moved}
        code = await node.stop()
        await self.settle()
        self.note(f"node {name} exited {code}")
        self.expect_moved(moved, to)
        if any(c.closes[1012] != before[c.name] + 1 for c in moved):
            self.problem("a consumer on the stopped node did not see one 1012")
        node.start()
        await node.wait_healthy()

    async def node_hangs(self, name: str, other: str) -> None:
        """SIGSTOP: the node's sockets stay open, the kernel still acknowledges bytes, nothing
        answers. Only a ping going unanswered tells the client."""
        self.fault(f"node {name} SIGSTOP")
        node, to = self.nodes[name], self.nodes[other]
        moved = self.on(node)
        before = {c.name: c.sub.dead_connections if c.sub else 0 for c in moved}
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(HANG)
            self.expect_moved(moved, to)
            dead = [c.name for c in moved if c.sub and c.sub.dead_connections > before[c.name]]
            self.note(f"left node {name} after an unanswered ping: {dead}")
            if len(dead) != len(moved):
                self.problem("a consumer on the hung node was not cut by its ping")
        finally:
            node.proc.send_signal(signal.SIGCONT)
        await node.wait_healthy()
        await self.settle()

    async def node_killed(self, name: str, other: str) -> None:
        self.fault(f"node {name} kill -9 and restart")
        node, to = self.nodes[name], self.nodes[other]
        moved = self.on(node)
        before = {c.name: c.closes[1006] for c in moved}
        code = await node.kill()
        await self.settle()
        self.note(f"node {name} killed ({code})")
        self.expect_moved(moved, to)
        if any(c.closes[1006] <= before[c.name] for c in moved):
            self.problem("a consumer on the killed node did not see a 1006")
        node.start()
        await node.wait_healthy()

    async def consumer_too_slow(self, name: str) -> None:
        """The application stops asking for events; the hub closes it 4008 once a ping goes
        unanswered; the application reads again: the queued events, the 4008, and the client
        resumes where its caller stopped."""
        self.fault("application too slow")
        slow = self.consumer(name)
        node = next(n for n in self.nodes.values() if n.url == slow.url)
        closed = await node.metric(SLOW_CLOSED)
        slow.pause()
        try:
            await wait_for_async(lambda: node.metric(SLOW_CLOSED), closed + 1, within=15.0)
        except TimeoutError:
            self.problem(f"node {node.name} did not close the paused {name}")
        finally:
            slow.resume()
        await self.settle()
        self.note(f"{name} closed by node {node.name}: {dict(slow.closes)}")
        if slow.closes[4008] != 1:
            self.problem(f"{name} did not see exactly one 4008: {dict(slow.closes)}")

    async def tokens_expired(
        self,
        admin_dsn: str,
        token_ids: list[uuid.UUID],
        refreshed: StreamClientConsumer,
        ended: StreamClientConsumer,
    ) -> None:
        """Both tokens expire while connected (the hub's recheck closes 4004): the client with
        a provider reconnects with its fresh token, the one without ends with TokenExpired."""
        self.fault("tokens expired")
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(
                "UPDATE auth_tokens SET expires_at = now() WHERE id = ANY($1::uuid[])", token_ids
            )
        finally:
            await conn.close()
        await wait_for(lambda: ended.done, "the fixed-token client ended", within=10.0)
        await self.settle()
        self.note(
            f"{refreshed.name} closes {dict(refreshed.closes)}; {ended.name} ended with "
            f"{ended.signals!r}"
        )
        if refreshed.closes[4004] != 1:
            self.problem(f"{refreshed.name} did not see one 4004: {dict(refreshed.closes)}")


async def wait_for_async(
    sample: Callable[[], Awaitable[float]], target: float, *, within: float
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while await sample() < target:
        if loop.time() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.1)


async def test_a_stream_client_hands_its_caller_every_event_once_in_order_through_faults(
    owned_pg: OwnedPostgres, owned_dsn: str, tmp_path: Path
) -> None:
    timeline = Timeline()
    db = await writer_database(owned_dsn, pool_max_size=4)
    nodes = {name: HubNode(name, owned_dsn, tmp_path, env=HUB_ENV) for name in ("A", "B")}
    consumers: list[StreamClientConsumer] = []
    writer: Writer | None = None
    try:
        for node in nodes.values():
            node.start()
        cast = await tenants(db, "cf", 3, timeline=timeline)
        admin, users, writer, roots = cast.admin, cast.users, cast.writer, cast.roots
        baseline = await head_cursor(owned_dsn)
        assert baseline is not None
        since = format_cursor(baseline)
        a, b = nodes["A"].url, nodes["B"].url

        async def issue(user_id: uuid.UUID) -> tuple[uuid.UUID, str]:
            issued = await db.tokens.issue(user_id, "session", scopes=["stream"])
            return issued.record.id, issued.token.get_secret_value()

        # The token provider's current token: replaced before the first one expires.
        expiring_id, first_token = await issue(users[1].id)
        current = {"token": first_token}

        async def provider() -> str:
            return current["token"]

        fixed_id, fixed_token = await issue(users[2].id)
        plan = [
            ("py-u0-mine", users[0].id, SubscriptionSpec("mine"), [a, b], {}),
            (
                "py-u1-provider",
                users[1].id,
                SubscriptionSpec("mine", events=("session.*", "credit.usage")),
                [b, a],
                {"token_provider": provider},
            ),
            (
                "py-u2-root-expiring",
                users[2].id,
                SubscriptionSpec("sessions", sessions=(str(roots[users[2].id]),)),
                [a, b],
                {"token": fixed_token, "expect": TokenExpired},
            ),
            ("py-admin-all", admin.id, SubscriptionSpec("all"), [b, a], {}),
            ("py-admin-slow", admin.id, SubscriptionSpec("all"), [a, b], {}),
        ]
        for name, user_id, spec, urls, options in plan:
            if not options:
                options = {"token": (await issue(user_id))[1]}
            consumers.append(
                StreamClientConsumer(
                    name,
                    urls,
                    spec,
                    user_id=user_id,
                    is_admin=user_id == admin.id,
                    since=since,
                    timeline=timeline,
                    **options,  # type: ignore[arg-type]
                )
            )
        await asyncio.gather(*(node.wait_healthy() for node in nodes.values()))
        for consumer in consumers:
            consumer.start()
        s = ClientScenario(owned_pg, timeline, nodes, consumers)
        await s.all_live()
        timeline.enter("warm-up")
        writer.start()
        await asyncio.sleep(SETTLE)

        await s.listener_terminated()
        await s.node_restarted("A", "B")
        await s.node_hangs("B", "A")
        await s.node_killed("A", "B")
        await s.consumer_too_slow("py-admin-slow")
        current["token"] = (await issue(users[1].id))[1]
        await s.tokens_expired(
            owned_pg.dsn(DATABASE),
            [expiring_id, fixed_id],
            s.consumer("py-u1-provider"),
            s.consumer("py-u2-root-expiring"),
        )

        timeline.enter("catch-up")
        await writer.stop()
        rows = await read_stream(owned_dsn, after=baseline)
        following = [c for c in consumers if c.expect is None]
        behind = await wait_caught_up(following, rows, within=30.0)
    finally:
        for consumer in consumers:
            await consumer.stop()
        if writer is not None:
            await writer.stop()
        for node in nodes.values():
            await node.close()
        await db.close()

    verdict = verify(following, rows, faults=s.faults, writer_errors=writer.errors)
    verdict.notes += s.problems
    verdict.notes += [f"{name} did not catch up with the stream" for name in behind]
    for consumer in consumers:
        verdict.notes += consumer.check_signal()
    # The one whose token ran out: everything up to where it ended, once and in order.
    ended = s.consumer("py-u2-root-expiring")
    got = [r.cursor for r in ended.received]
    upto = ended.last_cursor or baseline
    owed = [r.cursor for r in entitled_rows(ended, rows) if r.cursor <= upto]
    if got != owed:
        missing, extra = sorted(set(owed) - set(got)), sorted(set(got) - set(owed))
        verdict.notes.append(
            f"{ended.name} before its TokenExpired: received {len(got)}, owed {len(owed)}; "
            f"missing {missing[:5]}, not owed {extra[:5]} (or repeated / out of order)"
        )
    if len(owed) < 5:
        verdict.notes.append(f"{ended.name} received too little to prove anything ({len(owed)})")
    report = "\n".join(
        [
            verdict.report(),
            f"  {ended.name}: {len(got)} events, then {ended.signals!r}",
            "faults:",
            *(f"  {line}" for line in s.log),
            f"writer: {dict(writer.ops)}",
            f"elapsed: {timeline.elapsed():.1f}s",
        ]
    )
    if not verdict.ok:
        evidence = write_evidence(
            tmp_path / "client_fault_evidence.json",
            consumers,
            rows,
            verdict,
            baseline=format_cursor(baseline),
            faults=s.log,
            phases=timeline.phases,
            report=report,
        )
        report += f"\nevidence: {evidence} (hub logs: {tmp_path}/hub-*.log)"
    print(report)
    assert verdict.ok, report
