"""The DAL's after-commit wake-up (``EventNotifier``) against a real LISTENing connection."""

from __future__ import annotations

import asyncio

import asyncpg

from keen_stream.dal.events import CHANNEL, EventNotifier


async def listening(dsn: str) -> tuple[asyncpg.Connection, asyncio.Queue[str]]:
    conn = await asyncpg.connect(dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(CHANNEL, lambda *args: got.put_nowait(args[2]))
    return conn, got


async def test_pokes_within_the_interval_fold_into_one_more_wake_up(fresh_dsn: str):
    conn, got = await listening(fresh_dsn)
    notifier = EventNotifier(fresh_dsn, interval=0.2)
    try:
        notifier.poke()  # leading edge: at once
        await asyncio.wait_for(got.get(), 5)
        for _ in range(10):
            notifier.poke()  # all inside the interval: one more, after it
        await asyncio.wait_for(got.get(), 5)
        await asyncio.sleep(0.4)
        assert got.empty() and notifier.sent == 2
    finally:
        await notifier.close()
        await conn.close()


async def test_closing_sends_the_wake_up_still_folded_into_the_interval(fresh_dsn: str):
    conn, got = await listening(fresh_dsn)
    notifier = EventNotifier(fresh_dsn, interval=30.0)
    try:
        notifier.poke()
        await asyncio.wait_for(got.get(), 5)
        notifier.poke()  # folded: would wait 30 s for the interval to pass
        started = asyncio.get_running_loop().time()
        await notifier.close()
        assert asyncio.get_running_loop().time() - started < 5
        await asyncio.wait_for(got.get(), 5)  # the last commits' wake-up was not dropped
        assert notifier.sent == 2
        notifier.poke()  # closed: nothing more
        await asyncio.sleep(0.1)
        assert got.empty()
    finally:
        await conn.close()
