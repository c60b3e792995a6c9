"""The fan-out rules without sockets: routing by scope, authorization re-checked per event,
type filters, backpressure, and replay hand-over."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from keen_stream.dal.models.events import Cursor, StreamEvent
from keen_stream.hub.fanout import Client, FanOut, Frame, HubStats, Subscription
from keen_stream.hub.protocol import CloseCode


class FakeSender:
    fast = True

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.writes = 0  # how many writes (system calls on a real transport) carried them
        self.backlog = 0
        self.growing = False  # a peer that reads nothing: every write stays buffered

    def write(self, frame: Frame) -> bool:
        self.frames.append(frame)
        self.writes += 1
        if self.growing:
            self.backlog += len(frame.wire)
        return True

    def write_many(self, frames: list[Frame]) -> bool:
        self.frames.extend(frames)
        self.writes += 1
        if self.growing:
            self.backlog += sum(len(f.wire) for f in frames)
        return True

    def buffered(self) -> int:
        return self.backlog

    async def close(self, code: int, reason: str, grace: float) -> None:
        pass

    def abort(self) -> None:
        pass


closed: list[tuple[str, int, str]] = []


def client(user: uuid.UUID, admin: bool = False) -> Client:
    return Client(
        f"c-{uuid.uuid4().hex[:6]}",
        user,
        admin,
        FakeSender(),  # type: ignore[arg-type]
        lambda c, code, reason: closed.append((c.connection_id, code, reason)),
    )


def event(
    n: int,
    user: uuid.UUID,
    session: uuid.UUID | None = None,
    root=None,
    kind: str = "session.progress",
) -> StreamEvent:
    return StreamEvent(
        Cursor(100 + n, n), user, session, root or session, kind, "{}", datetime.now(UTC)
    )


def cursors(c: Client) -> list[int]:
    return [f.cursor.id for f in c.sender.frames]  # type: ignore[union-attr]


def test_routing_by_scope_with_authorization_rechecked_at_fan_out():
    alice, bob = uuid.uuid4(), uuid.uuid4()
    s_a, s_b, child = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    fan = FanOut(HubStats(), send_buffer_limit=1000, pending_limit=10)
    mine, watcher, admin, sneaky, credits = (
        client(alice),
        client(alice),
        client(bob, True),
        client(bob),
        client(alice),
    )
    for c in (mine, watcher, admin, sneaky, credits):
        fan.add(c)
    fan.subscribe(mine, Subscription("mine"))
    fan.subscribe(watcher, Subscription("sessions", frozenset({s_a})))
    fan.subscribe(admin, Subscription("all"))
    # A subscription that slipped past the subscribe-time check still gets nothing foreign.
    fan.subscribe(sneaky, Subscription("sessions", frozenset({s_a})))
    fan.subscribe(credits, Subscription("mine", event_types=frozenset({"credit.usage"})))
    fan.publish(
        [
            event(1, alice, s_a),
            event(2, bob, s_b),
            event(3, alice, child, root=s_a),
            event(4, alice, None, kind="credit.usage"),
        ]
    )
    assert cursors(mine) == [1, 3, 4]
    assert cursors(watcher) == [1, 3]
    assert cursors(admin) == [1, 2, 3, 4]
    assert cursors(sneaky) == []
    assert cursors(credits) == [4]
    # One encoding per event, shared by every recipient.
    assert mine.sender.frames[0] is admin.sender.frames[0]  # type: ignore[union-attr]
    assert fan.cursor == Cursor(104, 4)
    assert fan.stats.events_received == 4 and fan.stats.events_delivered == 10
    fan.subscribe(mine, Subscription("none"))
    fan.remove(watcher)
    fan.publish([event(5, alice, s_a)])
    assert cursors(mine) == [1, 3, 4] and cursors(watcher) == [1, 3]
    assert fan.subscription_count == 3


def test_the_events_of_one_read_reach_each_client_in_one_write_in_order():
    alice, bob = uuid.uuid4(), uuid.uuid4()
    fan = FanOut(HubStats(), send_buffer_limit=1000, pending_limit=10)
    mine, admin, resumed = client(alice), client(bob, True), client(alice)
    for c in (mine, admin, resumed):
        fan.add(c)
    fan.subscribe(mine, Subscription("mine"))
    fan.subscribe(admin, Subscription("all"))
    fan.subscribe(resumed, Subscription("mine"))
    resumed.last_cursor = Cursor(102, 2)  # it already has events 1 and 2 (a replay sent them)
    fan.publish([event(1, alice), event(2, bob), event(3, alice), event(4, alice)])
    assert cursors(mine) == [1, 3, 4] and mine.sender.writes == 1  # type: ignore[union-attr]
    assert cursors(admin) == [1, 2, 3, 4] and admin.sender.writes == 1  # type: ignore[union-attr]
    assert cursors(resumed) == [3, 4] and resumed.last_cursor == Cursor(104, 4)
    assert mine.last_cursor == Cursor(104, 4) and admin.last_cursor == Cursor(104, 4)
    assert fan.stats.events_delivered == 3 + 4 + 3  # frames a resume point covers count as sent
    # A lone event still goes straight out; a client with one frame in a batch too.
    fan.publish([event(5, alice)])
    fan.publish([event(6, bob), event(7, bob)])
    assert cursors(mine) == [1, 3, 4, 5] and mine.sender.writes == 2  # type: ignore[union-attr]
    assert cursors(admin)[-3:] == [5, 6, 7] and admin.sender.writes == 3  # type: ignore[union-attr]
    # A batch that would take a client past its limit goes frame by frame, each checked.
    near = client(alice)
    fan.add(near)
    fan.subscribe(near, Subscription("mine"))
    near.sender.backlog = fan.limit - 1  # type: ignore[union-attr]
    fan.publish([event(8, alice), event(9, alice)])
    assert cursors(near) == [8, 9] and near.sender.writes == 2  # type: ignore[union-attr]
    assert not near.closing
    # A peer that reads nothing crosses the limit inside a batch: closed right there, with the
    # resume point of the last frame it was sent, the rest counted as dropped.
    stuck = client(alice)
    fan.add(stuck)
    fan.subscribe(stuck, Subscription("mine"))
    stuck.sender.growing = True  # type: ignore[union-attr]
    stuck.sender.backlog = fan.limit - 40  # type: ignore[union-attr]
    dropped = fan.stats.events_dropped
    fan.publish([event(n, alice) for n in range(10, 14)])
    assert cursors(stuck) == [10] and stuck.closing and stuck.close_code == CloseCode.TOO_SLOW
    assert stuck.close_reason == "too slow; resume with since=110-10"
    assert fan.stats.events_dropped - dropped == 3


def test_a_client_over_its_buffer_is_closed_with_its_resume_point_and_others_continue():
    alice = uuid.uuid4()
    fan = FanOut(HubStats(), send_buffer_limit=100, pending_limit=10)
    slow, fast = client(alice), client(alice)
    for c in (slow, fast):
        fan.add(c)
        fan.subscribe(c, Subscription("mine"))
    fan.publish([event(1, alice)])
    slow.sender.backlog = 101  # type: ignore[union-attr]
    fan.publish([event(2, alice), event(3, alice)])
    assert cursors(fast) == [1, 2, 3] and cursors(slow) == [1]
    assert slow.closing and slow.close_code == CloseCode.TOO_SLOW
    assert slow.close_reason == "too slow; resume with since=101-1"
    assert closed[-1] == (slow.connection_id, 4008, "too slow; resume with since=101-1")
    assert fan.stats.events_dropped == 2


def test_live_frames_wait_during_a_replay_and_follow_it_without_repeats():
    alice = uuid.uuid4()
    fan = FanOut(HubStats(), send_buffer_limit=1000, pending_limit=3)
    c = client(alice)
    fan.add(c)
    fan.publish([event(1, alice)])
    upto = fan.hold(c)
    assert upto == Cursor(101, 1)
    fan.subscribe(c, Subscription("mine"))
    fan.publish([event(2, alice), event(3, alice)])
    assert cursors(c) == []
    c.send(Frame("{}", Cursor(101, 1)), 1000)  # the replayed one
    fan.release(c)
    assert cursors(c) == [1, 2, 3]
    # Too many held frames: closed as too slow instead of buffering without bound.
    other = client(alice)
    fan.add(other)
    fan.hold(other)
    fan.subscribe(other, Subscription("mine"))
    fan.publish([event(n, alice) for n in range(4, 9)])
    assert other.closing and other.close_code == CloseCode.TOO_SLOW


async def test_the_portable_asgi_sender_keeps_order_and_counts_its_backlog():
    import asyncio

    from keen_stream.hub.fanout import AsgiSender, make_sender

    sent: list[dict[str, Any]] = []
    gate = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        await gate.wait()
        sent.append(message)

    sender = make_sender(send)  # a plain function: no uvicorn protocol behind it
    assert isinstance(sender, AsgiSender) and not sender.fast
    for n in range(3):
        sender.write(Frame(f'{{"n":{n}}}'))
    assert sender.buffered() == 3 * len(Frame('{"n":0}').wire)
    gate.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert [m["text"] for m in sent] == ['{"n":0}', '{"n":1}', '{"n":2}']
    assert sender.buffered() == 0
    await sender.close(4008, "bye", 1.0)
    assert sent[-1] == {"type": "websocket.close", "code": 4008, "reason": "bye"}
