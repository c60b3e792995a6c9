"""What migration 0009 (stream position = xid + stored offset) costs the event hot path.

    python load_tests/stream_epoch_bench.py [--dsn DSN] [--seconds 20]

Two scratch databases on one server, in one run: ``before`` migrated to 0008_session_handle
(the outbox's ``xid`` column defaults to ``pg_current_xact_id()``) and ``after`` migrated to
head (it defaults to ``keen_stream_next_position()``, and the horizon is shifted by the
offset). Each workload runs in short chunks alternating between the two (before, after, after,
before, ...), so the machine's load drifts over both alike; printed: throughput of each, the
ratio ``after / before`` of the totals and the median of the per-chunk ratios.

- ``write``: a session's progress update, one event per autocommitted statement, from one
  connection (the capture trigger, its outbox insert and the column default: an event's whole
  write on the server, plus the round trip; ``synchronous_commit = off``, so the commit's
  fsync, the same for both, does not add its noise);
- ``insert``: 2,000 outbox rows in one statement (the column default alone, server side: the
  worst case for the default's share);
- ``tail_empty``: the listener's tail read at the head of the stream (its usual call);
- ``tail_page``: the same read returning a 1,000-event page.
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


class Variant:
    """One database's connections: a writer (as the owner) and a reader (as the listener)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def open(self) -> None:
        # No WAL flush wait per commit: on a shared machine the fsync's variance would drown
        # what the server spends on the event (the part this measures).
        self.writer = await asyncpg.connect(self.dsn, server_settings={"synchronous_commit": "off"})
        self.reader = await asyncpg.connect(self.dsn)
        await self.reader.execute("SET ROLE keen_system")
        self.session = await self.writer.fetchval("SELECT id FROM agent_sessions LIMIT 1")
        self.user = await self.writer.fetchval("SELECT id FROM users LIMIT 1")
        first = await self.reader.fetchrow(
            "SELECT xid, id FROM stream_events ORDER BY xid, id LIMIT 1"
        )
        self.before_first = (first["xid"], first["id"] - 1)

    async def close(self) -> None:
        await self.writer.close()
        await self.reader.close()

    async def write(self, n: int) -> None:
        """``n`` progress updates, one event each, each its own transaction."""
        for _ in range(n):
            await self.writer.execute(
                "UPDATE agent_sessions SET iteration_count = iteration_count + 1 WHERE id = $1",
                self.session,
            )

    async def insert(self, n: int) -> None:
        """``n`` times 2,000 outbox rows in one statement (the column default alone), rolled
        back so the outbox keeps its size."""
        for _ in range(n):
            transaction = self.writer.transaction()
            await transaction.start()
            await self.writer.execute(
                "INSERT INTO stream_events (user_id, event_type, payload)"
                " SELECT $1, 'session.progress', '{}' FROM generate_series(1, 2000)",
                self.user,
            )
            await transaction.rollback()

    async def tail_empty(self, n: int) -> None:
        """The listener's usual read: at the head, nothing new."""
        head = await self.reader.fetchrow(SQL["head"])
        for _ in range(n):
            await self.reader.fetch(SQL["tail"], head["xid"], head["id"], 1000)

    async def tail_page(self, n: int) -> None:
        """A read that returns a 1,000-event page."""
        for _ in range(n):
            await self.reader.fetch(SQL["tail"], *self.before_first, 1000)


#: Workload, chunk size: chunks alternate between the databases (before, after, after,
#: before, ...) so the machine's load drifts over both alike.
WORKLOADS = {"write": 50, "insert": 2, "tail_empty": 50, "tail_page": 5}
UNITS = {"write": "events/s", "insert": "rows/s", "tail_empty": "reads/s", "tail_page": "reads/s"}
PER_CALL = {"write": 1, "insert": 2000, "tail_empty": 1, "tail_page": 1}


async def measure(variants: dict[str, Variant], seconds: float) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for name, chunk in WORKLOADS.items():
        spent = {"before": 0.0, "after": 0.0}
        calls = {"before": 0, "after": 0}
        ratios = []
        stop = time.monotonic() + seconds
        order = ("before", "after")
        while time.monotonic() < stop:
            chunk_time = {}
            for v in order:
                started = time.perf_counter()
                await getattr(variants[v], name)(chunk)
                chunk_time[v] = time.perf_counter() - started
                spent[v] += chunk_time[v]
                calls[v] += chunk
            ratios.append(chunk_time["before"] / chunk_time["after"])
            order = order[::-1]
        results[name] = {
            "before": calls["before"] * PER_CALL[name] / spent["before"],
            "after": calls["after"] * PER_CALL[name] / spent["after"],
            "median_chunk_ratio": median(ratios),
        }
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("KEEN_BENCH_DSN", "postgresql:///postgres"))
    parser.add_argument("--seconds", type=float, default=20, help="per workload")
    args = parser.parse_args()
    pid = os.getpid()
    variants = {
        "before": Variant(await create(args.dsn, f"keen_epoch_before_{pid}", BEFORE)),
        "after": Variant(await create(args.dsn, f"keen_epoch_after_{pid}", "head")),
    }
    try:
        for variant in variants.values():
            await variant.open()
            await variant.write(200)  # warm: plans cached, the offset claimed
            await variant.tail_empty(200)
        results = await measure(variants, args.seconds)
        for variant in variants.values():
            await variant.close()
    finally:
        conn = await asyncpg.connect(args.dsn)
        try:
            for variant in variants.values():
                name = variant.dsn.rsplit("/", 1)[1].split("?")[0]
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
    print(f"{'workload':12} {'before':>12} {'after':>12} {'after/before':>13} {'chunk median':>13}")
    for name, r in results.items():
        print(
            f"{name:12} {r['before']:12,.0f} {r['after']:12,.0f}"
            f" {r['after'] / r['before']:13.3f} {r['median_chunk_ratio']:13.3f}   {UNITS[name]}"
        )


if __name__ == "__main__":
    asyncio.run(main())
