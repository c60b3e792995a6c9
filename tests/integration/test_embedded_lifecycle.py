"""The embedded PostgreSQL does not outlive a crashed keen_stream: something always reclaims it.

``kill -9`` of ``keen-stream serve`` leaves its pid in the wheel's handle list; the wheel would
then never stop the server (issue 'guarantees', finding 9). The watchdog stops it at once; and
without the watchdog the next clean start and stop does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.embedded import EmbeddedPostgres
from keen_stream.errors import DatabaseUnavailable
from tests.conftest import make_settings
from tests.integration.servekit import (
    free_port,
    postmaster,
    start_serve,
    wait_healthy,
    watchdogs,
)

#: How long reclaiming may take on a loaded 2-core box (it takes about a second).
BOUND = 30.0


async def until(condition: Callable[[], bool], what: str, within: float = BOUND) -> None:
    for _ in range(int(within / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} (waited {within} s)")


@pytest.fixture
def data(embedded_dir: Path) -> Path:
    """The embedded data directory (tests/integration/conftest.py), by a shorter name."""
    return embedded_dir


async def crash_serve(data: Path, *, with_watchdog: bool = True) -> psutil.Process:
    """Run ``keen-stream serve`` on ``data`` until healthy, then SIGKILL it (and its watchdog
    first, unless ``with_watchdog``). Returns the embedded server's postmaster: the orphan."""
    port = free_port()
    proc = await start_serve(data, port)
    try:
        await wait_healthy(proc, port)
        server = postmaster(data)
        assert server is not None
        if not with_watchdog:
            for process in watchdogs(data):
                process.kill()
    finally:
        proc.kill()
        await proc.wait()
    return server


async def test_after_serve_is_killed_the_watchdog_stops_the_embedded_server(data: Path) -> None:
    server = await crash_serve(data)
    await until(
        lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE,
        "the orphaned embedded PostgreSQL was never stopped",
    )
    await until(lambda: not (data / "postmaster.pid").exists(), "postmaster.pid left behind")
    await until(lambda: not watchdogs(data), "the watchdog did not exit with the server")


async def test_after_a_crash_the_next_clean_start_and_stop_reclaims_the_server(
    data: Path,
) -> None:
    """Even with no watchdog at all (killed with the server, or turned off): the dead pid is
    dropped from the handle list, so this clean stop is the last one and stops the server."""
    server = await crash_serve(data, with_watchdog=False)
    await asyncio.sleep(0.5)
    assert server.is_running()  # the orphan, and nothing watching it
    embedded = EmbeddedPostgres(data, watchdog=False)
    embedded.start()  # attaches to the orphan
    assert postmaster(data) == server
    embedded.stop()
    await until(
        lambda: not (data / "postmaster.pid").exists(),
        "a clean start and stop left the orphaned server running",
    )
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE


async def test_one_watchdog_per_data_directory_idle_and_gone_when_the_server_stops(
    data: Path,
) -> None:
    from keen_stream.embedded import start_watchdog, watch, watchdog_pid

    embedded = EmbeddedPostgres(data)
    embedded.start()
    try:
        await until(lambda: len(watchdogs(data)) == 1, "no watchdog started")
        dog = watchdogs(data)[0]
        assert watchdog_pid(data) == dog.pid
        # starting it again, or running a second one by hand, leaves the first alone
        start_watchdog(data)
        await asyncio.wait_for(asyncio.to_thread(watch, data), 10)  # returns at once: taken
        assert [p.pid for p in watchdogs(data)] == [dog.pid]
        before = dog.cpu_times()
        await asyncio.sleep(1)
        after = dog.cpu_times()
        # it sleeps on the processes' exits, not in a loop
        assert (after.user + after.system) - (before.user + before.system) < 0.05
    finally:
        embedded.stop()
    await until(lambda: not (data / "postmaster.pid").exists(), "the server did not stop")
    await until(lambda: not watchdogs(data), "the watchdog outlived the server")
    assert watchdog_pid(data) is None


async def test_an_embedded_server_that_cannot_start_is_a_typed_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "pgdata"
    not_a_directory.write_text("a file where the data directory should be")
    settings = make_settings(None, embedded_dir=not_a_directory)  # type: ignore[arg-type]
    with pytest.raises(DatabaseUnavailable, match="cannot start the embedded PostgreSQL"):
        await KeenDatabase.connect(settings=settings)
    assert not_a_directory.read_text().startswith("a file")  # untouched
