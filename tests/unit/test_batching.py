"""The batcher's scheduling rules, with plain coroutines standing in for the database calls."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from keen_stream.dal.batching import Batcher


class Calls:
    """run_one / run_many that record what they were given and wait for a gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.singles: list[int] = []
        self.batches: list[list[int]] = []
        self.fail_batch: BaseException | None = None

        self.running = 0
        self.most_running = 0

    async def _wait(self) -> None:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate.wait()
            await asyncio.sleep(0)  # a round trip always yields to the loop
        finally:
            self.running -= 1

    async def one(self, item: int) -> int:
        self.singles.append(item)
        await self._wait()
        if item < 0:
            raise ValueError(f"bad item {item}")
        return item * 10

    async def many(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        await self._wait()
        if self.fail_batch is not None:
            raise self.fail_batch
        return [ValueError(f"bad item {i}") if i < 0 else i * 10 for i in items]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lone_call_goes_at_once_on_its_own():
    calls = Calls()
    calls.gate.set()
    batcher = Batcher(calls.one, calls.many, max_batch=8, max_in_flight=2)
    assert await batcher.submit(3) == 30
    assert (calls.singles, calls.batches) == ([3], [])


async def test_calls_made_while_one_is_in_flight_leave_together_in_order():
    calls = Calls()
    batcher = Batcher(calls.one, calls.many, max_batch=3, max_in_flight=2)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in range(1, 9)]
    await settle()
    # the first went alone; the rest queued and filled the second slot with one batch
    assert calls.singles == [1] and calls.batches == [[2, 3, 4]]
    calls.gate.set()
    assert await asyncio.gather(*tasks) == [i * 10 for i in range(1, 9)]
    sent = calls.singles + [i for b in calls.batches for i in b]
    assert sorted(sent) == list(range(1, 9))  # each exactly once
    assert all(len(b) <= 3 for b in calls.batches) and calls.batches[1] == [5, 6, 7]
    assert calls.most_running == 2  # never more than max_in_flight


async def test_callers_that_arrive_together_share_the_free_slots_in_batches():
    calls = Calls()
    batcher = Batcher(calls.one, calls.many, max_batch=50, max_in_flight=4)
    first = asyncio.create_task(batcher.submit(0))
    await settle()
    # three slots are free: twenty callers arriving together fill them evenly, in order,
    # instead of three going alone and seventeen waiting for a slot
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 21)]
    await settle()
    assert calls.singles == [0]
    assert calls.batches == [list(range(1, 8)), list(range(8, 15)), list(range(15, 21))]
    calls.gate.set()
    await asyncio.gather(first, *rest)


async def test_callers_woken_by_a_finished_batch_queue_together():
    calls = Calls()
    batcher = Batcher(calls.one, calls.many, max_batch=50, max_in_flight=1)
    starter = asyncio.create_task(batcher.submit(1000))
    await settle()

    async def caller(n: int) -> None:
        for i in range(3):
            await batcher.submit(n * 100 + i)

    callers = [asyncio.create_task(caller(n)) for n in range(1, 10)]
    await settle()
    calls.gate.set()
    await asyncio.gather(starter, *callers)
    # When a batch ends nothing is in flight, but its callers, calling again at once, must not
    # take the fast path one by one: each round leaves as one batch.
    assert calls.singles == [1000]
    assert calls.batches == [[n * 100 + i for n in range(1, 10)] for i in range(3)]


async def test_one_items_failure_is_its_callers_alone():
    calls = Calls()
    batcher = Batcher(calls.one, calls.many, max_batch=8, max_in_flight=1)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, -3, 4)]
    await settle()
    calls.gate.set()
    got = await asyncio.gather(*tasks, return_exceptions=True)
    assert got[0] == 10 and got[1] == 20 and got[3] == 40
    assert isinstance(got[2], ValueError)
    assert calls.batches == [[2, -3, 4]]


async def test_a_batch_that_fails_as_a_whole_fails_each_of_its_callers():
    calls = Calls()
    calls.fail_batch = ConnectionError("gone")
    batcher = Batcher(calls.one, calls.many, max_batch=8, max_in_flight=1)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
    await settle()
    calls.gate.set()
    got = await asyncio.gather(*tasks, return_exceptions=True)
    assert got[0] == 10
    assert all(isinstance(g, ConnectionError) for g in got[1:])
    # and the batcher still works afterwards
    calls.fail_batch = None
    assert await batcher.submit(5) == 50


async def test_a_caller_cancelled_before_its_item_leaves_sends_nothing():
    calls = Calls()
    batcher = Batcher(calls.one, calls.many, max_batch=8, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(1))
    await settle()
    waiting = [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
    await settle()
    waiting[1].cancel()
    await settle()
    calls.gate.set()
    assert await first == 10
    assert await waiting[0] == 20 and await waiting[2] == 40
    with pytest.raises(asyncio.CancelledError):
        await waiting[1]
    assert calls.batches == [[2, 4]]


async def test_a_single_waiting_call_goes_alone_and_drain_waits_for_it():
    calls = Calls()
    batcher = Batcher(calls.one, calls.many, max_batch=8, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(1))
    await settle()
    second = asyncio.create_task(batcher.submit(-2))
    await settle()
    calls.gate.set()
    await first
    await batcher.drain()
    assert second.done() and isinstance(second.exception(), ValueError)
    assert calls.singles == [1, -2] and calls.batches == []


def test_limits_below_one_are_refused():
    with pytest.raises(ValueError):
        Batcher(Calls().one, Calls().many, max_batch=0, max_in_flight=1)


async def test_an_item_whose_key_is_in_flight_waits_for_that_batch_in_order():
    calls = Calls()
    batcher = Batcher(
        calls.one, calls.many, max_batch=8, max_in_flight=2, conflict_key=lambda i: i % 10
    )
    first = asyncio.create_task(batcher.submit(1))  # key 1 in flight
    await settle()
    rest = [asyncio.create_task(batcher.submit(i)) for i in (2, 11, 3, 21, 4)]
    await settle()
    # 11 and 21 share key 1 with the call in flight: they wait; the others go at once
    assert calls.batches == [[2, 3, 4]]
    calls.gate.set()
    await asyncio.gather(first, *rest)
    assert calls.batches == [[2, 3, 4], [11, 21]]
    assert not batcher._busy  # nothing left behind


@pytest.mark.timeout(10)
async def test_a_cancelled_drain_does_not_cancel_the_batches_it_waits_for():
    """Shutdown giving up on drain() (a lifespan timeout) must not cancel other callers'
    batches in flight: their callers would get a CancelledError that is not theirs, for a
    statement whose commit is unknown."""
    calls = Calls()
    batcher = Batcher(calls.one, calls.many, max_batch=8, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(1))
    await settle()
    waiting = [asyncio.create_task(batcher.submit(i)) for i in (2, 3)]
    await settle()
    calls.gate.set()
    await asyncio.sleep(0)
    drain = asyncio.create_task(batcher.drain())
    await asyncio.sleep(0)
    drain.cancel()
    done, _ = await asyncio.wait([first, *waiting], timeout=2)
    assert len(done) == 3, "callers left waiting for ever (their batch never ran)"
    assert [t.result() for t in (first, *waiting)] == [10, 20, 30]
    assert await asyncio.wait_for(batcher.submit(4), 2) == 40  # and the batcher still works
