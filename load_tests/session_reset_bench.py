"""What resetting pooled sessions costs a tenant transaction, against not resetting at all.

    python load_tests/session_reset_bench.py [--dsn DSN] [--seconds N] [--rounds N]

Since migration 0007 the DAL resets a pooled session after every transaction context
(keen_stream/dal/database.py, ``SessionReset``), sending the reset in the same message as the
COMMIT. This runs one small tenant transaction through ``db.user_transaction`` (BEGIN, the
tenant context, one indexed read, COMMIT: the shape of most DAL reads) three ways, interleaved
round by round on the same server so that drift in a shared machine's load hits each alike:

- ``before``: COMMIT alone and no reset, as the DAL did before 0007 (every ratio's baseline);
- ``shipped``: the reset in the COMMIT's message;
- ``on release``: COMMIT alone, then the same reset from the pool's release hook, a round trip
  of its own (what asyncpg's default reset costs; asyncpg's own query would not even drop temp
  tables or end a session-level SET ROLE).

Printed, per number of concurrent callers (1 and 8): transactions per second, the server's CPU
time per transaction (the database's backends, read from /proc: the server must run on this
machine) and this client's, each with its ratio to ``before``. On a shared machine the CPU
figures are the steadier ones. The one-statement hot paths (the deduction) send no reset at
all: load_tests/ledger_bench.py measures them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from statistics import median

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keen_stream.dal.database import KeenDatabase
from keen_stream.settings import Settings
from load_tests import ledger_bench

BODY = "SELECT current_balance FROM credit_accounts WHERE user_id = $1"
CALLERS = (1, 8)
VARIANTS = ("before", "shipped", "on release")
#: The benchmark's own backends (the pools'), not the one asking. Client backends only: an
#: autovacuum worker on the database comes and goes, and one that exits mid-measurement takes
#: its CPU time out of the total (negative figures).
BACKENDS = """
    SELECT pid FROM pg_stat_activity
     WHERE datname = current_database() AND backend_type = 'client backend'
       AND pid <> pg_backend_pid()"""
TICK = os.sysconf("SC_CLK_TCK")


def server_cpu(pids: list[int]) -> float:
    """CPU seconds the given backends have used (user + system)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


async def open_variant(dsn: str, variant: str) -> KeenDatabase:
    """A DAL whose transaction contexts end as ``variant`` says."""
    size = max(CALLERS)
    db = await KeenDatabase.connect(
        # No connection is replaced mid-run (asyncpg's default is after 50,000 queries, seconds
        # at one caller): the server CPU read from /proc would lose the replaced backend's time.
        settings=Settings(
            database_url=dsn, pool_min_size=size, pool_max_size=size, pool_max_queries=10**9
        ),
        migrate=False,
    )
    if variant == "shipped":
        return db
    reset = db._session_reset

    @asynccontextmanager
    async def commit_alone(conn: asyncpg.Connection) -> AsyncIterator[None]:
        async with conn.transaction():
            yield
        if variant == "before":
            reset.vouch(conn)  # so the pool's hook skips its reset: nothing is reset at all

    reset.transaction = commit_alone  # type: ignore[method-assign]
    return db


async def run(db: KeenDatabase, users: list[uuid.UUID], callers: int, seconds: float) -> int:
    done = 0
    stop = time.perf_counter() + seconds

    async def caller(n: int) -> None:
        nonlocal done
        i = n
        while time.perf_counter() < stop:
            user = users[i % len(users)]
            async with db.user_transaction(user) as conn:
                await conn.fetchval(BODY, user)
            i += callers
            done += 1

    await asyncio.gather(*(caller(n) for n in range(callers)))
    return done


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("KEEN_TEST_DATABASE_URL", "postgresql:///postgres")
    )
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    name = f"keen_reset_bench_{os.getpid()}"
    dsn = await ledger_bench.create_scratch(args.dsn, name, 100)
    # (variant, callers) -> per round: (tx/s, server CPU us per tx, client CPU us per tx)
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        dbs = {variant: await open_variant(dsn, variant) for variant in VARIANTS}
        owner = await asyncpg.connect(dsn)
        try:
            async with dbs["shipped"].system_transaction() as conn:
                users = [r["user_id"] for r in await conn.fetch("SELECT user_id FROM bench_users")]
            for db in dbs.values():
                await run(db, users, max(CALLERS), 0.5)  # warm statements and plan caches
            for round_no in range(1, args.rounds + 1):
                for callers in CALLERS:
                    for variant, db in dbs.items():
                        # Read each time: the pools replace connections (idle lifetime, the
                        # reset closing one), and a stale list would miss the new backends.
                        pids = [r["pid"] for r in await owner.fetch(BACKENDS)]
                        server0, client0 = server_cpu(pids), time.process_time()
                        wall0 = time.perf_counter()
                        done = await run(db, users, callers, args.seconds)
                        wall = time.perf_counter() - wall0
                        results.setdefault((variant, callers), []).append(
                            (
                                done / wall,
                                (server_cpu(pids) - server0) / done * 1e6,
                                (time.process_time() - client0) / done * 1e6,
                            )
                        )
                print(f"round {round_no} of {args.rounds} done", flush=True)
        finally:
            await owner.close()
            for db in dbs.values():
                await db.close()
    finally:
        await ledger_bench.drop_scratch(args.dsn, name)

    print(
        f"\nmedians of {args.rounds} rounds, {args.seconds:g} s each; a tenant transaction ="
        " BEGIN, context, one read, COMMIT"
    )
    for callers in CALLERS:
        print(
            f"\n{callers} caller(s)    {'tx/s':>8}{'ratio':>7}{'server us/tx':>15}{'ratio':>7}"
            f"{'client us/tx':>15}{'ratio':>7}"
        )
        base = [median(r[i] for r in results[("before", callers)]) for i in range(3)]
        for variant in VARIANTS:
            figures = [median(r[i] for r in results[(variant, callers)]) for i in range(3)]
            print(
                f"  {variant:<12}"
                + "".join(
                    f"{value:>{width},.0f}" + (f"{value / b:>7.2f}" if b else f"{'-':>7}")
                    for value, b, width in zip(figures, base, (8, 15, 15), strict=True)
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
