"""Progress-update throughput and the sweep's index: HOT updates or an index on the activity time.

    python load_tests/sessions_bench.py [--dsn DSN] [--seconds N] [--sessions N] [--clients N]

Every progress report bumps ``last_activity_at``. An index that has that column as its key (the
obvious sweep index, ``(last_activity_at) WHERE execution_status = 'running'``) makes every such
UPDATE write new entries into every index on agent_sessions; with no indexed column changed,
PostgreSQL can do a HOT update instead (no index writes). This runs
``db.sessions.update_progress`` through the public API for ``--seconds`` with each of:

  A  idx_agent_sessions_running_activity ON (last_activity_at) WHERE running   (as shipped)
  B  the same partial index keyed on start_time, which never changes          (HOT-friendly)

and prints tps, the share of HOT updates, and B/A. Both run in one scratch database on the same
server in the same run (absolute numbers drift on shared machines: read the ratio). The sweep's
own cost with each index is printed too, over the same table. Then, with A, the shipped
one-statement report against the same report inside BEGIN ... COMMIT (before migration 0006),
alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.sessions import SQL as SESSION_SQL
from keen_stream.migrate import upgrade
from keen_stream.settings import Settings, with_database

VARIANTS = {
    "A activity-keyed (shipped)": (
        "CREATE INDEX idx_agent_sessions_running_activity ON agent_sessions (last_activity_at)"
        " WHERE execution_status = 'running'"
    ),
    "B start_time-keyed (HOT)": (
        "CREATE INDEX idx_agent_sessions_running_activity ON agent_sessions (start_time)"
        " WHERE execution_status = 'running'"
    ),
}


async def populate(conn: asyncpg.Connection, sessions: int, ended: int) -> list[tuple[str, str]]:
    await conn.execute(
        "INSERT INTO users (email, username, password_hash)"
        " SELECT 'b' || g || '@example.com', 'bench_' || g, 'x' FROM generate_series(1, 50) g"
    )
    await conn.execute("INSERT INTO credit_accounts (user_id) SELECT id FROM users")
    # History the sweep must not have to read: ended sessions.
    await conn.execute(
        """INSERT INTO agent_sessions (user_id, session_id, git_branch, vision, working_directory)
           SELECT u.id, 'old-' || u.username || '-' || g, 'main', 'v', '/w'
             FROM users u CROSS JOIN generate_series(1, $1) g""",
        ended // 50,
    )
    await conn.execute(
        "UPDATE agent_sessions SET execution_status = 'completed', success = true, end_time = now()"
    )
    await conn.execute(
        """INSERT INTO agent_sessions (user_id, session_id, git_branch, vision, working_directory)
           SELECT u.id, 'live-' || g, 'main', 'v', '/w'
             FROM generate_series(1, $1) g
             JOIN users u ON u.username = 'bench_' || (1 + g % 50)""",
        sessions,
    )
    await conn.execute("VACUUM ANALYZE agent_sessions")
    rows = await conn.fetch(
        "SELECT user_id::text, session_id FROM agent_sessions WHERE execution_status = 'running'"
    )
    return [(r["user_id"], r["session_id"]) for r in rows]


async def run(
    db: KeenDatabase,
    live: list[tuple[str, str]],
    clients: int,
    seconds: float,
    *,
    transaction: bool = False,
) -> int:
    """Progress reports for ``seconds``; ``transaction``: the same function inside BEGIN/COMMIT
    (how a report ran before migration 0006: four messages instead of one)."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller(n: int) -> None:
        nonlocal done
        i = n
        while time.perf_counter() < deadline:
            user_id, handle = live[i % len(live)]
            if transaction:
                async with db.user_transaction(user_id) as conn:
                    await conn.fetchrow(
                        SESSION_SQL["progress"], user_id, handle, None, 1, 1, 100, 0, [], [], []
                    )
            else:
                await db.sessions.update_progress(
                    user_id, handle, iterations=1, tool_calls=1, tokens=100
                )
            done += 1
            i += clients

    await asyncio.gather(*(caller(n) for n in range(clients)))
    return done


async def hot_counts(conn: asyncpg.Connection) -> tuple[int, int]:
    await conn.execute("SELECT pg_stat_force_next_flush()")
    row = await conn.fetchrow(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'agent_sessions'"
    )
    return row["n_tup_upd"], row["n_tup_hot_upd"]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("KEEN_TEST_DATABASE_URL", "postgresql:///postgres")
    )
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--ended", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    name = f"keen_sessions_bench_{os.getpid()}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_database(args.dsn, name)
    try:
        await asyncio.to_thread(upgrade, dsn)
        owner = await asyncpg.connect(dsn)
        live = await populate(owner, args.sessions, args.ended)
        settings = Settings(
            database_url=dsn, pool_min_size=args.clients, pool_max_size=args.clients
        )
        results: dict[str, float] = {}
        async with await KeenDatabase.connect(settings=settings, migrate=False) as db:
            await run(db, live, args.clients, 2)  # warm up
            # A, B, A, B: alternating evens out drift on a shared machine.
            rounds: dict[str, list[float]] = {label: [] for label in VARIANTS}
            for label, index in [*VARIANTS.items(), *VARIANTS.items()]:
                await owner.execute("DROP INDEX idx_agent_sessions_running_activity")
                await owner.execute(index)
                await owner.execute("VACUUM ANALYZE agent_sessions")
                upd0, hot0 = await hot_counts(owner)
                started = time.perf_counter()
                done = await run(db, live, args.clients, args.seconds)
                tps = done / (time.perf_counter() - started)
                upd1, hot1 = await hot_counts(owner)
                hot_share = (hot1 - hot0) / max(1, upd1 - upd0)
                # The sweep over the same table (nothing idle: it reads and ends nothing).
                sweep_started = time.perf_counter()
                for _ in range(20):
                    await db.sessions.sweep_timed_out(timedelta(hours=1))
                sweep_ms = (time.perf_counter() - sweep_started) / 20 * 1000
                rounds[label].append(tps)
                results[label] = sum(rounds[label]) / len(rounds[label])
                print(
                    f"{label:30} {tps:8.0f} progress updates/s   HOT {hot_share:6.1%}"
                    f"   sweep {sweep_ms:6.2f} ms"
                )
        a, b = results.values()
        print(
            f"B/A throughput ratio: {b / a:.2f}  ({args.clients} clients, "
            f"{args.sessions} running sessions, {args.ended} ended)"
        )
        # One statement (shipped) vs the same report inside BEGIN ... COMMIT, index A.
        await owner.execute("DROP INDEX idx_agent_sessions_running_activity")
        await owner.execute(VARIANTS["A activity-keyed (shipped)"])
        async with await KeenDatabase.connect(settings=settings, migrate=False) as db:
            modes: dict[bool, list[float]] = {False: [], True: []}
            for transaction in (False, True, False, True):
                await owner.execute("VACUUM ANALYZE agent_sessions")
                started = time.perf_counter()
                done = await run(db, live, args.clients, args.seconds, transaction=transaction)
                modes[transaction].append(done / (time.perf_counter() - started))
                label = "A, BEGIN/report/COMMIT" if transaction else "A, one statement (shipped)"
                print(f"{label:30} {modes[transaction][-1]:8.0f} progress updates/s")
        one, four = (sum(v) / len(v) for v in modes.values())
        print(f"one statement / BEGIN-report-COMMIT throughput ratio: {one / four:.2f}")
        await owner.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
