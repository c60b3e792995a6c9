"""What migration 0009 (stream position = xid + stored offset) costs the event hot path.

    python load_tests/stream_epoch_bench.py [--dsn DSN] [--seconds 5] [--rounds 3]
                                            [--writers 8]

Two scratch databases on one server, in one run: ``before`` migrated to 0008_session_handle
(the outbox's ``xid`` column defaults to ``pg_current_xact_id()``) and ``after`` migrated to
head (it defaults to ``keen_stream_next_position()``, the horizon is shifted by the offset).
Each round runs every workload on both (alternating, so drift in the machine's load hits both
alike) and prints the ``after / before`` ratio:

- ``write``: progress updates of agent sessions from ``--writers`` connections, one event per
  autocommitted statement (the capture trigger, its outbox insert and the column default);
- ``insert``: 20,000 outbox rows in one statement (the column default alone, server side: the
  worst case for the default's share);
- ``tail empty``: the listener's tail read at the head of the stream (its usual call);
- ``tail page``: the same read returning a 1,000-event page.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from statistics import median

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from keen_stream.dal.events import SQL  # noqa: E402
from keen_stream.migrate import upgrade  # noqa: E402
from keen_stream.settings import with_database  # noqa: E402

BEFORE = "0008_session_handle"
SESSIONS = 64


async def create(admin_dsn: str, name: str, revision: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, name)
    await asyncio.to_thread(upgrade, dsn, revision)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO users (email, username, password_hash)"
            " VALUES ('b@example.com', 'bench', 'not-a-hash')"
        )
        await conn.execute(
            """
            INSERT INTO agent_sessions (user_id, session_id, vision, working_directory, git_branch)
            SELECT u.id, 'bench-' || g, 'v', '/w', 'main' FROM users u, generate_series(1, $1) g""",
            SESSIONS,
        )
        # 10,000 events in the outbox (a retention window's worth, scaled down).
        await conn.execute(
            """
            INSERT INTO stream_events (user_id, event_type, payload)
            SELECT u.id, 'session.progress', '{}' FROM users u, generate_series(1, 10000)"""
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return dsn


async def writes(dsn: str, seconds: float, writers: int) -> float:
    """Events per second from ``writers`` connections, one event per statement."""
    conns = [await asyncpg.connect(dsn) for _ in range(writers)]
    sessions = [r["id"] for r in await conns[0].fetch("SELECT id FROM agent_sessions")]
    done = 0
    stop = time.monotonic() + seconds

    async def writer(i: int, conn: asyncpg.Connection) -> None:
        nonlocal done
        session = sessions[i % len(sessions)]
        while time.monotonic() < stop:
            await conn.execute(
                "UPDATE agent_sessions SET iteration_count = iteration_count + 1 WHERE id = $1",
                session,
            )
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(writer(i, c) for i, c in enumerate(conns)))
    elapsed = time.monotonic() - started
    for conn in conns:
        await conn.close()
    return done / elapsed


async def bulk_insert(dsn: str) -> float:
    """Seconds for 20,000 outbox rows in one statement (then removed)."""
    conn = await asyncpg.connect(dsn)
    try:
        user = await conn.fetchval("SELECT id FROM users LIMIT 1")
        transaction = conn.transaction()
        await transaction.start()
        started = time.perf_counter()
        await conn.execute(
            "INSERT INTO stream_events (user_id, event_type, payload)"
            " SELECT $1, 'session.progress', '{}' FROM generate_series(1, 20000)",
            user,
        )
        elapsed = time.perf_counter() - started
        await transaction.rollback()  # the outbox keeps its size across rounds
    finally:
        await conn.close()
    return elapsed


async def tails(dsn: str, seconds: float, *, page: bool) -> float:
    """Tail reads per second as the listener makes them (keen_system, the shipped SQL)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET ROLE keen_system")
        if page:
            row = await conn.fetchrow("SELECT xid, id FROM stream_events ORDER BY xid, id LIMIT 1")
            after = (row["xid"], row["id"] - 1)
        else:
            row = await conn.fetchrow(SQL["head"])
            after = (row["xid"], row["id"])
        done = 0
        stop = time.monotonic() + seconds
        started = time.monotonic()
        while time.monotonic() < stop:
            await conn.fetch(SQL["tail"], after[0], after[1], 1000)
            done += 1
        return done / (time.monotonic() - started)
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("KEEN_BENCH_DSN", "postgresql:///postgres"))
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers", type=int, default=8)
    args = parser.parse_args()
    pid = os.getpid()
    dsns = {
        "before": await create(args.dsn, f"keen_epoch_before_{pid}", BEFORE),
        "after": await create(args.dsn, f"keen_epoch_after_{pid}", "head"),
    }
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for r in range(args.rounds):
            for variant in ("before", "after") if r % 2 == 0 else ("after", "before"):
                dsn = dsns[variant]
                figures = {
                    "write (events/s)": await writes(dsn, args.seconds, args.writers),
                    "insert (rows/s)": 20000 / await bulk_insert(dsn),
                    "tail empty (reads/s)": await tails(dsn, args.seconds / 2, page=False),
                    "tail page (reads/s)": await tails(dsn, args.seconds / 2, page=True),
                }
                for name, value in figures.items():
                    results.setdefault(name, {}).setdefault(variant, []).append(value)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        conn = await asyncpg.connect(args.dsn)
        try:
            for dsn in dsns.values():
                name = dsn.rsplit("/", 1)[1].split("?")[0]
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
    print(f"{'workload':24} {'before':>12} {'after':>12} {'after/before':>13}   (medians)")
    for name, by in results.items():
        b, a = median(by["before"]), median(by["after"])
        print(f"{name:24} {b:12,.0f} {a:12,.0f} {a / b:13.3f}")
        rounds = " · ".join(f"{x / y:.3f}" for x, y in zip(by["after"], by["before"], strict=True))
        print(f"{'':24} per round: {rounds}")


if __name__ == "__main__":
    asyncio.run(main())
