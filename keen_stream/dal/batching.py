"""Opportunistic batching of concurrent calls (the ledger's deductions use it).

A call made while nothing is in flight goes out at once, on its own, in the caller's task. A
call made while others are in flight joins a queue; the queue is sent at the end of the current
event-loop iteration (so callers woken together by a finished batch leave together), shared
among the free slots (at most ``max_in_flight`` batches run at once, each of at most
``max_batch`` items). So a lone caller
never waits for a timer (there is none), and under load the fixed cost of a database
transaction (the round trip, the statement, the commit and its WAL flush, the client's own
overhead) is shared by the batch. This is TigerBeetle's batching and PostgreSQL's group
commit, done one level up.

``run_many`` gets the waiting items and returns one outcome per item, in order: a result or an
exception, so that one item's failure is that item's alone. An exception raised by
``run_many`` itself (the connection died) is every item's outcome.

A caller that is cancelled before its item leaves takes the item out: nothing is sent for it.
Once it has left, the batch runs to its end for the others; the cancelled caller's outcome is
unknown to it, as for any request whose response is lost (idempotency keys are the remedy).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run_one: Callable[[T], Awaitable[R]],
        run_many: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int,
        max_in_flight: int,
        conflict_key: Callable[[T], Hashable] | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._run_one = run_one
        self._run_many = run_many
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self._key = conflict_key
        # Keys of the items in flight. A waiting item whose key is in flight stays queued (in
        # order) until that batch ends: for the ledger, a batch holds each account row it
        # charged until it commits, so a second batch touching the same account would only
        # sit on that lock, holding its own rows meanwhile.
        self._busy: Counter[Hashable] = Counter()
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatch_soon = False
        # True from the moment a batch hands out its results until the loop has run the woken
        # callers once: those that call again meanwhile queue together instead of one of them
        # going alone through the fast path.
        self._just_finished = False
        #: Counters for tests and metrics: calls sent alone, batches sent, items in batches.
        self.singles = 0
        self.batches = 0
        self.batched_items = 0

    async def submit(self, item: T) -> R:
        if self._in_flight == 0 and not self._waiting and not self._just_finished:
            # Nothing else going on: go now, in the caller's own task.
            self._in_flight += 1
            self.singles += 1
            keys = self._take_keys([item])
            try:
                return await self._run_one(item)
            finally:
                self._in_flight -= 1
                self._release_keys(keys)
                self._dispatch()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if not self._dispatch_soon:
            # Not at once: callers woken in this iteration (a batch just finished) queue first.
            self._dispatch_soon = True
            loop.call_soon(self._dispatch)
        return await future

    async def drain(self) -> None:
        """Wait until every batch sent so far has finished (on shutdown)."""
        while self._tasks:
            # asyncio.wait, not gather: a cancelled drain (a shutdown deadline) must not cancel
            # the batches. Cancelled before its first step, a batch task never runs its
            # ``finally``: its callers would wait for ever and its slot would stay taken.
            await asyncio.wait(set(self._tasks))

    def _dispatch(self) -> None:
        self._dispatch_soon = False
        while self._waiting and self._in_flight < self.max_in_flight:
            # Share the waiting calls among the free slots: one batch holding everyone would
            # leave the other slots (and the server's other cores) idle while it runs.
            size = min(
                self.max_batch, -(-len(self._waiting) // (self.max_in_flight - self._in_flight))
            )
            batch: list[tuple[T, asyncio.Future[R]]] = []
            deferred: list[tuple[T, asyncio.Future[R]]] = []
            while self._waiting and len(batch) < size:
                item, future = self._waiting.popleft()
                if future.done():  # a cancelled caller's item is never sent
                    continue
                if self._key is not None and self._busy[self._key(item)] > 0:
                    deferred.append((item, future))
                else:
                    batch.append((item, future))
            self._waiting.extendleft(reversed(deferred))
            if not batch:
                break  # everything waiting conflicts with a batch in flight: its end dispatches
            self._in_flight += 1
            keys = self._take_keys([item for item, _ in batch])
            task = asyncio.get_running_loop().create_task(self._send(batch, keys))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take_keys(self, items: list[T]) -> list[Hashable]:
        if self._key is None:
            return []
        keys = list({self._key(item) for item in items})
        self._busy.update(keys)
        return keys

    def _release_keys(self, keys: list[Hashable]) -> None:
        for key in keys:  # no zero entries left behind: a long-running process sees many keys
            if self._busy[key] <= 1:
                del self._busy[key]
            else:
                self._busy[key] -= 1

    async def _send(self, batch: list[tuple[T, asyncio.Future[R]]], keys: list[Hashable]) -> None:
        try:
            outcomes: Sequence[R | BaseException]
            if len(batch) == 1:
                self.singles += 1
                try:
                    outcomes = [await self._run_one(batch[0][0])]
                except Exception as exc:
                    outcomes = [exc]
            else:
                self.batches += 1
                self.batched_items += len(batch)
                outcomes = await self._run_many([item for item, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} returned {len(outcomes)} outcomes")
        except BaseException as exc:
            outcomes = [exc] * len(batch)
            if not isinstance(exc, Exception):  # cancelled, or the loop is going away
                for _, future in batch:
                    if not future.done():
                        future.cancel()
                raise
        finally:
            self._in_flight -= 1
            self._release_keys(keys)
            self._dispatch()
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if not self._just_finished:
            self._just_finished = True
            # Scheduled after the woken callers' wake-ups, so it runs once they have had a turn.
            asyncio.get_running_loop().call_soon(self._end_of_wake_ups)

    def _end_of_wake_ups(self) -> None:
        self._just_finished = False
