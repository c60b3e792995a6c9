"""The stream's guarantee under real operational faults: a client never misses an event it is
entitled to.

One scenario, faults in sequence, each while a writer writes through the DAL and the clients
follow the stream: a PostgreSQL server the test owns (stopped, restarted, its backends killed),
two hub nodes as separate processes (stopped, killed, restarted), users and an admin that
resume with ``since`` as docs/protocol.md says, and two applications following the stream with
keen_stream.client (tests/faults/clientkit.py). Afterwards every client's receipts are compared
with ``stream_events``: every event it is entitled to, exactly once after dedupe by cursor, in
cursor order per connection, nothing it is not entitled to, and no ``recovered: true`` that was
not true. docs/reliability.md describes each fault; tests/faults/harness.py the pieces.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from keen_stream.dal.models import User
from tests.faults.clientkit import StreamClientConsumer
from tests.faults.harness import (
    LISTENER_APPLICATION_NAME,
    HubNode,
    ResumingClient,
    SubscriptionSpec,
    Timeline,
    Writer,
    format_cursor,
    head_cursor,
    long_transaction,
    parse_cursor,
    read_stream,
    tenants,
    terminate_backends,
    verify,
    wait_caught_up,
    write_evidence,
    writer_database,
)
from tests.integration.hubkit import stream_token, wait_for
from tests.pgcluster import OwnedPostgres, StopMode, requires_owned_postgres

pytestmark = requires_owned_postgres

#: Quiet time after each fault, writer still writing: reconnects and replays finish.
SETTLE = 2.0
#: Events written while the resuming client of fault 7 is away, with full-size payloads (the
#: description is cut at 200 characters): ~740-byte frames, ~9 MB of replay. The hub's kernel
#: socket buffer takes up to 4 MB (tcp_wmem) before its own send buffer fills, and the replay
#: must outlast both to be still running, waiting for the client, when the database stops.
BURST = 12_000
BURST_DESCRIPTION = "burst call " + "x" * 189
#: The hub's per-client send buffer. A replay waits for the client once more than half of it is
#: queued, then writes a whole 1,000-event page (~0.75 MB): with the default 1 MiB that page can
#: pass the limit and close a client that is not reading yet as too slow (4008) before the
#: database stops (tests/integration/test_hub_replay_pacing.py). Fault 7 is about the
#: database outage, so the nodes get room for a page.
HUB_ENV = {
    "KEEN_HUB_SEND_BUFFER_LIMIT": str(3 * 1024 * 1024),
    # Diagnostics in hub-*.log: each replay's pages and waits (stall hunting).
    "KEEN_DEBUG_LOGGERS": os.environ.get("KEEN_FAULT_DEBUG_LOGGERS", ""),
}
REPLAYED = "keen_hub_events_replayed_total"
DATABASE = "keen"  # the owned_dsn fixture's database


@dataclass
class Scenario:
    pg: OwnedPostgres
    dsn: str
    timeline: Timeline
    nodes: dict[str, HubNode]
    writer: Writer
    clients: list[ResumingClient]
    #: Applications iterating keen_stream.client: checked like the clients, never dropped.
    consumers: list[StreamClientConsumer]
    #: What each fault did and what was observed (printed with the verdict).
    log: list[str] = field(default_factory=list)
    #: Faults that did not happen as planned: the scenario would not prove what it claims.
    problems: list[str] = field(default_factory=list)
    faults: int = 0

    @property
    def admin_dsn(self) -> str:
        return self.pg.dsn("postgres")

    @property
    def followers(self) -> list[ResumingClient | StreamClientConsumer]:
        return [*self.clients, *self.consumers]

    def client(self, name: str) -> ResumingClient:
        return next(c for c in self.clients if c.name == name)

    async def healthy(self, *names: str) -> None:
        await asyncio.gather(*(self.nodes[n].wait_healthy() for n in names or self.nodes))

    async def all_live(self, within: float = 30.0) -> None:
        await wait_for(
            lambda: all(c.live for c in self.followers),
            "every client subscribed",
            within=within,
        )

    def urls(self) -> list[str | None]:
        return [c.url for c in self.followers]

    def fault(self, name: str) -> str:
        """Start the next fault: its phase name is ``"<n> <name>"``."""
        self.faults += 1
        self.timeline.enter(f"{self.faults} {name}")
        return self.timeline.phase

    def problem(self, text: str) -> None:
        self.problems.append(f"fault {self.timeline.phase}: {text}")

    def note(self, text: str) -> None:
        self.log.append(f"[{self.timeline.elapsed():7.2f}s] {self.timeline.phase}: {text}")

    async def settle(self) -> None:
        await asyncio.sleep(SETTLE)
        await self.all_live()

    # --- the faults ---------------------------------------------------------------------------
    async def listener_terminated(self) -> None:
        self.fault("listener terminated")
        killed = await terminate_backends(
            self.admin_dsn, DATABASE, application_name=LISTENER_APPLICATION_NAME
        )
        self.note(f"terminated {killed} listener backends")
        if killed < len(self.nodes):
            self.problem(f"terminated {killed} listeners, expected one per node")
        await self.healthy()
        await self.settle()

    async def all_backends_terminated(self) -> None:
        self.fault("all backends terminated")
        killed = await terminate_backends(self.admin_dsn, DATABASE)
        # Two clients resume while every pool reconnects.
        self.drop("u0-mine-a", "admin-all")
        self.note(f"terminated {killed} backends; dropped u0-mine-a, admin-all")
        if killed < 2 * len(self.nodes):
            self.problem(f"terminated only {killed} backends")
        await self.healthy()
        await self.settle()

    async def database_restarted(self, mode: StopMode, dropped: tuple[str, ...]) -> None:
        self.fault(f"database restarted {mode}")
        started = time.monotonic()
        restart = asyncio.create_task(asyncio.to_thread(self.pg.restart, mode))
        await asyncio.sleep(0.05)
        self.drop(*dropped)  # they resume while the database goes down and comes back
        await restart
        self.note(
            f"pg_ctl restart -m {mode} took {time.monotonic() - started:.2f}s; "
            f"dropped {', '.join(dropped)}"
        )
        await self.healthy()
        await self.settle()

    async def node_a_stopped(self) -> None:
        self.fault("node A SIGTERM")
        a, b = self.nodes["A"], self.nodes["B"]
        await self.rebalance(a, at_least=2)
        on_a = [c.name for c in self.clients if c.url == a.url]
        code = await a.stop()
        self.note(f"node A exited {code}; its clients {on_a} resume on B; A stays down")
        if not on_a:
            self.problem("no client was on node A")
        await self.settle()
        if any(url != b.url for url in self.urls()):
            self.problem("a client is not on node B")

    async def node_b_killed(self) -> None:
        self.fault("node B kill -9")
        a, b = self.nodes["A"], self.nodes["B"]
        code = await b.kill()
        self.note(f"node B killed ({code}); no node is up")
        await asyncio.sleep(1.0)  # the writer writes; nobody delivers
        # Node A restarts while a long write transaction holds the stream's horizon, so A
        # publishes nothing until it ends and every client resumes on a node that has not
        # published its first event yet. Without it, that window lasts until the first event
        # after A's start: a few milliseconds at this writer's rate (minutes on a quiet
        # system), and a regression would be caught only by chance.
        async with long_transaction(self.dsn) as xid:
            a.start()
            await a.wait_healthy()
            await self.all_live()
            early = [
                c.name
                for c in self.clients
                for r in c.replies
                if r.phase == self.timeline.phase and r.cursor == r.since
            ]
            self.note(
                f"node A restarted under transaction {xid}; clients resumed on it "
                f"before its first event: {early or 'none'}"
            )
        if any(url != a.url for url in self.urls()):
            self.problem("a client is not on the restarted node A")
        b.start()
        await b.wait_healthy()
        self.note("node B restarted")
        await self.settle()

    async def resume_interrupted_by_outage(self) -> None:
        phase = self.fault("resume interrupted by a database outage")
        resumer = self.client("admin-resumer")
        resumer.disconnect()
        since = resumer.last
        assert since is not None
        written = await self.writer.burst(BURST, description=BURST_DESCRIPTION)
        away = await read_stream(self.dsn, after=parse_cursor(since))
        missed = len(away)
        newest = format_cursor(away[-1].cursor) if away else since
        self.note(
            f"admin-resumer away at {since}; burst wrote {written}; {missed} to replay "
            f"(up to {newest})"
        )
        before = {name: await node.metric(REPLAYED) for name, node in self.nodes.items()}
        resumer.reconnect(stall_after_subscribed=True)
        await asyncio.wait_for(resumer.stalled.wait(), 30)
        node = next(n for n in self.nodes.values() if n.url == resumer.url)
        replayed = await self.replay_stalled(node) - before[node.name]
        await asyncio.to_thread(self.pg.stop, "fast")
        self.note(
            f"database stopped; the replay on node {node.name} waits for the client "
            f"after {replayed:.0f} of {missed} events"
        )
        if replayed >= missed:
            self.problem(
                f"the whole replay ({replayed:.0f} events) went out before the outage; raise BURST"
            )
        await asyncio.sleep(0.5)
        resumer.release()  # the replay's next page now needs the stopped database
        await asyncio.sleep(2.0)
        await asyncio.to_thread(self.pg.start)
        self.note("database started")
        await self.healthy()
        await self.settle()
        interruptions = [f"error {code}" for _, code, p in resumer.error_frames if p == phase]
        interruptions += [
            f"close {d.code}"
            for d in resumer.disconnects
            if d.phase == phase and "client" not in d.reason
        ]
        self.note(f"admin-resumer saw {interruptions or 'no interruption'}")
        if not interruptions:
            self.problem("the resume was not interrupted by the outage")

    async def replay_stalled(self, node: HubNode) -> float:
        """The node's replay counter once it stopped moving (the replay waits for the client)."""
        count = await node.metric(REPLAYED)
        for _ in range(100):
            await asyncio.sleep(0.3)
            now = await node.metric(REPLAYED)
            if now == count:
                return now
            count = now
        return count

    def drop(self, *names: str) -> None:
        for name in names:
            self.client(name).drop()

    async def rebalance(self, node: HubNode, *, at_least: int) -> None:
        """Make sure ``at_least`` clients are on ``node``: earlier faults moved clients around
        (a dropped client resumes on the next node, and so does one refused during an outage).
        With two nodes, a dropped client's next node is the other one."""
        for _ in range(5):
            elsewhere = [c for c in self.clients if c.url != node.url]
            missing = at_least - (len(self.clients) - len(elsewhere))
            if missing <= 0:
                return
            for client in elsewhere[:missing]:
                client.drop()
            await asyncio.sleep(0.5)
            await self.all_live()
        self.problem(f"fewer than {at_least} clients on node {node.name}")


async def test_each_client_gets_every_entitled_event_exactly_once_through_a_sequence_of_faults(
    owned_pg: OwnedPostgres, owned_dsn: str, tmp_path: Path
) -> None:
    timeline = Timeline()
    db = await writer_database(owned_dsn, pool_max_size=6)
    nodes = {name: HubNode(name, owned_dsn, tmp_path, env=HUB_ENV) for name in ("A", "B")}
    clients: list[ResumingClient] = []
    consumers: list[StreamClientConsumer] = []
    followers: list[ResumingClient | StreamClientConsumer] = []
    writer: Writer | None = None
    try:
        for node in nodes.values():
            node.start()
        cast = await tenants(db, "fault", 4, timeline=timeline)
        admin, users, writer, roots = cast.admin, cast.users, cast.writer, cast.roots
        baseline = await head_cursor(owned_dsn)
        assert baseline is not None
        since = format_cursor(baseline)
        urls = [nodes["A"].url, nodes["B"].url]
        # users[3] has no client: its events are foreign to every user client.
        plan: list[tuple[str, User, SubscriptionSpec, int, int | None]] = [
            ("u0-mine-a", users[0], SubscriptionSpec("mine"), 0, None),
            ("u0-mine-b", users[0], SubscriptionSpec("mine"), 1, None),
            (
                "u1-filtered",
                users[1],
                SubscriptionSpec("mine", events=("session.*", "credit.usage")),
                0,
                None,
            ),
            (
                "u2-root",
                users[2],
                SubscriptionSpec("sessions", sessions=(str(roots[users[2].id]),)),
                1,
                None,
            ),
            ("admin-all", admin, SubscriptionSpec("all"), 0, None),
            # A small receive buffer, but not smaller than one loopback segment (~64 KiB):
            # with 16 KiB the receiving kernel pruned segments it could not hold, and the
            # retransmit timer's backoff could leave the replay's last bytes in the hub's send
            # queue for 30 s or more (docs/reliability.md, "A stall that was TCP's").
            ("admin-resumer", admin, SubscriptionSpec("all"), 1, 131072),
        ]
        for name, user, spec, start_at, receive_buffer in plan:
            clients.append(
                ResumingClient(
                    name,
                    urls,
                    await stream_token(db, user.id),
                    spec,
                    user_id=user.id,
                    is_admin=user.id == admin.id,
                    since=since,
                    timeline=timeline,
                    start_at=start_at,
                    receive_buffer=receive_buffer,
                )
            )
        # keen_stream.client, given both URLs: user 1's events, and everything (as an admin).
        for name, user, spec, order in [
            ("py-u1-mine", users[1], SubscriptionSpec("mine"), urls),
            ("py-admin-all", admin, SubscriptionSpec("all"), urls[::-1]),
        ]:
            consumers.append(
                StreamClientConsumer(
                    name,
                    order,
                    spec,
                    user_id=user.id,
                    is_admin=user.id == admin.id,
                    since=since,
                    timeline=timeline,
                    token=await stream_token(db, user.id),
                    # No hung node here: slower pings, so a busy box cannot fake one.
                    ping_interval=2.0,
                    ping_timeout=2.0,
                )
            )
        await asyncio.gather(*(node.wait_healthy() for node in nodes.values()))
        followers = [*clients, *consumers]
        for follower in followers:
            follower.start()
        s = Scenario(owned_pg, owned_dsn, timeline, nodes, writer, clients, consumers)
        await s.all_live()
        timeline.enter("warm-up")
        writer.start()
        await asyncio.sleep(SETTLE)

        await s.listener_terminated()
        await s.all_backends_terminated()
        await s.database_restarted("fast", ("u1-filtered", "u2-root"))
        await s.database_restarted("immediate", ("u0-mine-b", "admin-all"))
        await s.node_a_stopped()
        await s.node_b_killed()
        await s.resume_interrupted_by_outage()

        timeline.enter("catch-up")
        await writer.stop()
        rows = await read_stream(owned_dsn, after=baseline)
        caught_up: list[dict[str, object]] = []
        # Longer than the hub's drain timeout (30 s): a replay that stalled for good would end
        # in a 4008 close, which the verdict below refuses, rather than in a timeout here.
        behind = await wait_caught_up(followers, rows, within=45.0, record=caught_up)
    finally:
        for follower in followers:
            await follower.stop()
        if writer is not None:
            await writer.stop()
        for node in nodes.values():
            await node.close()
        await db.close()

    verdict = verify(followers, rows, faults=s.faults, writer_errors=writer.errors)
    verdict.notes += s.problems
    verdict.notes += [problem for c in consumers for problem in c.check_signal()]
    verdict.notes += [f"{name} did not catch up with the stream" for name in behind]
    # No client here reads too slowly for the hub: a 4008 means a replay or the fan-out stopped
    # waiting for a client that was reading (test_hub_replay_pacing.py).
    verdict.notes += [
        f"{c.name} was closed 4008 ({d.reason}) in {d.phase}"
        for c in clients
        for d in c.disconnects
        if d.code == 4008
    ]
    report = "\n".join(
        [
            verdict.report(),
            "faults:",
            *(f"  {line}" for line in s.log),
            f"writer: {dict(writer.ops)}",
            f"writer errors by phase: {dict(writer.errors_by_phase)}",
            f"writer errors by operation: {dict(writer.errors_by_op)}",
            f"elapsed: {timeline.elapsed():.1f}s",
        ]
    )
    if not verdict.ok:
        evidence = write_evidence(
            tmp_path / "fault_evidence.json",
            followers,
            rows,
            verdict,
            baseline=format_cursor(baseline),
            caught_up=caught_up,
            faults=s.log,
            phases=timeline.phases,
            report=report,
        )
        report += f"\nevidence: {evidence} (hub logs: {tmp_path}/hub-*.log)"
    print(report)
    assert verdict.ok, report
