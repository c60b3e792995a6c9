"""The listener's wake-up flag: set before, during or never within the wait; cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from keen_stream.hub.listener import Wakeup


async def test_a_flag_set_before_the_wait_returns_at_once() -> None:
    wake = Wakeup()
    wake.set()
    started = time.monotonic()
    assert await wake.wait(5.0) is True
    assert time.monotonic() - started < 0.5


async def test_the_wait_ends_when_the_flag_is_set_or_the_time_is_up() -> None:
    wake = Wakeup()
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, wake.set)
    started = time.monotonic()
    assert await wake.wait(5.0) is True
    assert time.monotonic() - started < 1.0
    wake.clear()
    assert not wake.is_set()
    started = time.monotonic()
    assert await wake.wait(0.05) is False
    assert time.monotonic() - started >= 0.04


async def test_a_cancelled_wait_leaves_the_flag_usable() -> None:
    wake = Wakeup()
    waiting = asyncio.create_task(wake.wait(5.0))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    wake.set()  # no waiter left behind to trip over
    assert await wake.wait(0.01) is True
