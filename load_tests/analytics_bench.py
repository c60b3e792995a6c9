"""Admin analytics at scale: rollups plus a live tail against the live computation.

    python load_tests/analytics_bench.py [--dsn DSN] [--scale 1.0] [--samples 200]
                                         [--live-samples 15] [--keep]

Creates a scratch database (migrated with keen_stream.migrate.upgrade) and generates, on the
server (INSERT ... SELECT over generate_series, one UTC day per statement, with every trigger
and constraint in place), 10,000 users, 1,000,000 agent sessions and 5,000,000 ledger rows
over the 30 days before now, times ``--scale``. Sessions: a tenth are two-level sub-agent
trees, the rest roots, with the statuses, durations, costs and tokens of ended runs; ledger:
each account's rows are a valid chain (sequence numbers from 1, balance_after the running
sum), a purchase then nine usage charges, admin accounts' rows admin bypasses. Progress goes
to stderr.

Then, through the public API: ``db.analytics.rollup()`` once (the backfill, timed), and
``db.analytics.get_admin_analytics`` for day, week and month (``--samples`` calls each,
interleaved), against ``keen_analytics_window`` (the live computation the public call made
before the rollups) measured in the same run (``--live-samples`` each). Prints p50/p95 per
range and live/rollups; checks that both give the same figures for the same window. The
scratch database is dropped at the end unless ``--keep``.

``--write-cost SECONDS`` measures instead what the rollups cost the writers: the ledger's
deduction statement under pgbench (load_tests/ledger_bench.py's scratch database, script and
funding), 8 clients, with the analytics triggers enabled and disabled in turns, three runs each;
then, steadier on a shared machine, the time per row of 50,000-row INSERTs into the ledger in
one session, the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keen_stream.dal.analytics import TIME_RANGES
from keen_stream.dal.database import KeenDatabase
from keen_stream.migrate import upgrade
from keen_stream.settings import Settings, with_database
from load_tests import ledger_bench

DAYS = 30
ADMINS = 10  # their sessions are admin sessions, their ledger rows admin bypasses

USERS = """
    INSERT INTO users (email, username, password_hash, role, is_admin, created_at,
                       last_login_at)
    SELECT 'ab' || g || '@example.com', 'ab_' || g, 'not-a-hash',
           CASE WHEN g <= $2::int THEN 'admin' ELSE 'user' END, g <= $2::int,
           $3::timestamptz - interval '60 days' * ((g::bigint * 7919) % $1::int) / $1::int,
           $3::timestamptz - interval '30 days' * ((g::bigint * 104729) % $1::int) / $1::int
      FROM generate_series(1, $1::int) g"""
NUMBERED = """
    CREATE TABLE bench_users AS
    SELECT row_number() OVER (ORDER BY u.username COLLATE "C")::integer AS n, u.id AS user_id,
           a.id AS account_id
      FROM users u JOIN credit_accounts a ON a.user_id = u.id;
    ALTER TABLE bench_users ADD PRIMARY KEY (n)"""

# Session i (0-based, in start order) of $1 per day; family i / 10: member 0 is a root, 1 its
# sub-agent, 2 the sub-agent's; members 3-9 roots of other users. Parents are inserted running
# (a sub-agent needs a running parent) and ended afterwards, as in real life.
SESSION_VALUES = """
    SELECT i, i % 10 AS m,
           CASE WHEN i % 10 < 3 THEN (i / 10 * 7919) % $4::int ELSE (i * 104729) % $4::int END + 1
               AS n,
           $2::timestamptz + (i + 0.5)::float8 * $3::interval AS start_time,
           (i * 2654435761) % 100 AS h,
           round(((i * 7919) % 1000000)::numeric / 200000, 6) AS usd,
           (i * 31) % 50000 + 100 AS tokens
      FROM generate_series($5::bigint * $1::int, $6::bigint - 1) i"""
SESSION_INSERT = """
    INSERT INTO agent_sessions (user_id, session_id, parent_session_id, git_branch, vision,
        working_directory, streaming_enabled, start_time, last_activity_at, created_at, end_time,
        execution_status, success, claude_cost_usd, keen_cost_credits, tokens_used,
        context_tokens_used)
    SELECT b.user_id, 'ab-' || v.i, p.id, 'main', 'bench', '/w', false, v.start_time, v.start_time,
           v.start_time, f.end_time, f.status, f.success, f.usd, f.credits, v.tokens,
           v.tokens / 4
      FROM ({values}) v
      JOIN bench_users b ON b.n = v.n
      LEFT JOIN agent_sessions p ON v.m IN (1, 2) AND p.session_id = 'ab-' || (v.i - 1)
      CROSS JOIN LATERAL (SELECT
          CASE WHEN v.m < 2 OR v.h >= 98 THEN 'running'
               WHEN v.h < 85 THEN 'completed' WHEN v.h < 92 THEN 'failed'
               WHEN v.h < 95 THEN 'cancelled' ELSE 'timed_out' END AS status) s
      CROSS JOIN LATERAL (SELECT s.status,
          CASE WHEN s.status = 'running' THEN NULL ELSE s.status = 'completed' END AS success,
          CASE WHEN s.status = 'running' THEN NULL
               ELSE v.start_time + ((v.h * 37) % 120 + 1) * interval '1 minute' END AS end_time,
          CASE WHEN s.status = 'running' THEN 0 ELSE v.usd END AS usd,
          CASE WHEN s.status = 'running' THEN 0 ELSE v.usd * 5 END AS credits) f
     WHERE v.m IN ({members})
     ORDER BY v.i"""
SESSION_END_PARENTS = """
    UPDATE agent_sessions x
       SET execution_status = f.status, success = f.status = 'completed',
           end_time = x.start_time + ((v.h * 37) % 120 + 1) * interval '1 minute',
           claude_cost_usd = v.usd, keen_cost_credits = v.usd * 5
      FROM ({values}) v
      CROSS JOIN LATERAL (SELECT CASE WHEN v.h < 85 THEN 'completed'
          WHEN v.h < 92 THEN 'failed' WHEN v.h < 95 THEN 'cancelled'
          WHEN v.h < 98 THEN 'timed_out' ELSE 'completed' END AS status) f
     WHERE v.m IN (0, 1) AND x.session_id = 'ab-' || v.i"""

# Account n's usage charge j (1-9) of every period of ten rows, and the running sums.
AMOUNTS = """
    CREATE TABLE bench_amounts AS
    SELECT n, j, amount, sum(amount) OVER (PARTITION BY n ORDER BY j) AS prefix,
           sum(amount) OVER (PARTITION BY n) AS period
      FROM (SELECT b.n, j,
                   CASE WHEN b.n <= $1::int THEN 0::numeric
                        WHEN j = 0 THEN 50::numeric
                        ELSE -round(((b.n * 31 + j * 17) % 97 + 1) * 0.051234, 6) END AS amount
              FROM bench_users b, generate_series(0, 9) j) a;
    ALTER TABLE bench_amounts ADD PRIMARY KEY (n, j)"""
# Row k (1-based) of account n at t0 + (k - 1 + (n - 1) / users) * step: one chain per account,
# rows of all accounts interleaved in time. Day $4's rows, in created_at order (the BRIN index
# on created_at relies on append order following time).
LEDGER_DAY = """
    INSERT INTO credit_transactions (user_id, account_id, transaction_type, amount,
        balance_after, claude_cost_usd, description, is_admin_bypass, created_at,
        sequence_number)
    SELECT b.user_id, b.account_id,
           CASE WHEN b.n <= $5::int THEN 'admin_bypass' WHEN a.j = 0 THEN 'purchase'
                ELSE 'usage' END,
           a.amount, (r.k - 1) / 10 * a.period + a.prefix,
           CASE WHEN b.n <= $5::int OR a.j > 0 THEN round(((b.n + r.k * 13) % 97 + 1) * 0.0102, 6)
           END,
           'bench', b.n <= $5::int, r.at, r.k
      FROM bench_users b
      CROSS JOIN LATERAL (
          SELECT k, $2::timestamptz + (k - 1 + (b.n - 1)::float8 / $3::int) * $6::interval AS at
            FROM generate_series(greatest(1, floor($4::int * $1::numeric / $7::int)::int),
                                 least($1::int,
                                       ceil(($4::int + 1) * $1::numeric / $7::int)::int + 1)) k
      ) r
      JOIN bench_amounts a ON a.n = b.n AND a.j = (r.k - 1) % 10
     WHERE r.at >= $2::timestamptz + $4::int * interval '1 day'
       AND r.at < $2::timestamptz + ($4::int + 1) * interval '1 day'
     ORDER BY r.at"""
ACCOUNTS = """
    UPDATE credit_accounts c
       SET last_sequence = t.last, current_balance = t.balance,
           lifetime_purchased = t.purchased, lifetime_spent = t.spent
      FROM (SELECT account_id, max(sequence_number) AS last,
                   (array_agg(balance_after ORDER BY sequence_number DESC))[1] AS balance,
                   coalesce(sum(amount) FILTER (WHERE amount > 0), 0) AS purchased,
                   coalesce(-sum(amount) FILTER (WHERE amount < 0), 0) AS spent
              FROM credit_transactions GROUP BY account_id) t
     WHERE c.id = t.account_id"""


class Progress:
    """One line on stderr, rewritten in place on a terminal."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def show(self, text: str, *, done: bool = False) -> None:
        line = f"[{time.monotonic() - self.started:6.0f} s] {text}"
        if self.tty:
            sys.stderr.write(f"\r\033[K{line}" + ("\n" if done else ""))
        elif done or not self.tty:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


async def generate(conn: asyncpg.Connection, scale: float, progress: Progress) -> dict[str, int]:
    users = max(ADMINS + 10, round(10_000 * scale))
    # A whole number of families (10 sessions) per statement; the last takes the remainder.
    sessions = max(10 * DAYS, round(1_000_000 * scale)) // 10 * 10
    per_day = sessions // DAYS // 10 * 10
    per_account = max(10, round(5_000_000 * scale / users))
    t0 = await conn.fetchval("SELECT date_trunc('second', now()) - interval '30 days'")
    step = timedelta(days=DAYS) / sessions
    progress.show(f"users: {users:,}")
    await conn.execute(USERS, users, ADMINS, t0 + timedelta(days=DAYS))
    await conn.execute("INSERT INTO credit_accounts (user_id) SELECT id FROM users")
    await conn.execute(NUMBERED)  # no arguments: a script of two statements
    create, key = AMOUNTS.split(";")
    await conn.execute(create, ADMINS)
    await conn.execute(key)
    for day in range(DAYS):
        values = SESSION_VALUES
        end = sessions if day == DAYS - 1 else (day + 1) * per_day
        args = (per_day, t0, step, users, day, end)
        for members in ("0, 3, 4, 5, 6, 7, 8, 9", "1", "2"):
            await conn.execute(SESSION_INSERT.format(values=values, members=members), *args)
        await conn.execute(SESSION_END_PARENTS.format(values=values), *args)
        progress.show(f"sessions: day {day + 1}/{DAYS} ({end:,} sessions)")
    ledger_step = timedelta(days=DAYS) / per_account
    for day in range(DAYS):
        await conn.execute(LEDGER_DAY, per_account, t0, users, day, ADMINS, ledger_step, DAYS)
        progress.show(f"ledger: day {day + 1}/{DAYS}")
    progress.show("ledger: account balances")
    await conn.execute(ACCOUNTS)
    await conn.execute("DROP TABLE bench_amounts, bench_users")
    progress.show("VACUUM ANALYZE")
    await conn.execute("VACUUM ANALYZE")
    counts = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM users) AS users,"
        " (SELECT count(*) FROM agent_sessions) AS sessions,"
        " (SELECT count(*) FROM credit_transactions) AS ledger"
    )
    progress.show(
        f"generated {counts['users']:,} users, {counts['sessions']:,} sessions,"
        f" {counts['ledger']:,} ledger rows",
        done=True,
    )
    return dict(counts)


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


def quantiles(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=20, method="inclusive")
    return statistics.median(samples), cuts[18]


async def measure(db: KeenDatabase, admin: str, samples: int, live_samples: int) -> None:
    live_sql = "SELECT * FROM keen_analytics_window(now() - $1::interval, now())"
    same_sql = (
        "SELECT (SELECT w FROM keen_analytics_window($1, $2) w)"
        " = (SELECT r FROM keen_analytics_rolled($1, $2) r)"
    )
    api: dict[str, list[float]] = {r: [] for r in TIME_RANGES}
    live: dict[str, list[float]] = {r: [] for r in TIME_RANGES}
    exact: dict[str, bool] = {}

    async def run_live(window: timedelta) -> None:
        async with db.system_transaction() as conn:
            await conn.fetchrow(live_sql, window)

    for name, window in TIME_RANGES.items():
        async with db.system_transaction() as conn:
            end = await conn.fetchval("SELECT now()")
            exact[name] = bool(await conn.fetchval(same_sql, end - window, end))
    for i in range(max(samples, live_samples)):
        for name, window in TIME_RANGES.items():
            if i < samples:
                api[name].append(
                    await timed(lambda n=name: db.analytics.get_admin_analytics(n, actor_id=admin))  # type: ignore[misc]
                )
            if i < live_samples:
                live[name].append(await timed(lambda w=window: run_live(w)))  # type: ignore[misc]
    print(
        f"{'range':<8}{'api p50':>10}{'api p95':>10}{'live p50':>11}{'live p95':>11}"
        f"{'live/api p95':>14}  same figures"
    )
    for name in TIME_RANGES:
        a50, a95 = quantiles(api[name])
        l50, l95 = quantiles(live[name])
        print(
            f"{name:<8}{a50:>8.1f}ms{a95:>8.1f}ms{l50:>9.1f}ms{l95:>9.1f}ms{l95 / a95:>13.1f}x"
            f"  {'yes' if exact[name] else 'NO'}"
        )
    if not all(exact.values()):
        raise SystemExit("the rollups and the live computation disagree")


ANALYTICS_TRIGGERS = (
    ("credit_transactions", "credit_transactions_analytics"),
    ("agent_sessions", "agent_sessions_analytics_insert_delete"),
    ("agent_sessions", "agent_sessions_analytics_update"),
)


ROWS = """
    INSERT INTO credit_transactions (user_id, account_id, transaction_type, amount,
        balance_after, description, sequence_number)
    SELECT a.user_id, a.id, 'purchase', 1, 1, 'row cost', a.last_sequence + g
      FROM (SELECT * FROM credit_accounts ORDER BY id LIMIT 1) a, generate_series(1, $1::int) g"""
BUMP = """
    UPDATE credit_accounts SET last_sequence = last_sequence + $1::int
     WHERE id = (SELECT id FROM credit_accounts ORDER BY id LIMIT 1)"""


async def _triggers(conn: asyncpg.Connection, enabled: bool) -> None:
    verb = "ENABLE" if enabled else "DISABLE"
    for table, trigger in ANALYTICS_TRIGGERS:
        await conn.execute(f"ALTER TABLE {table} {verb} TRIGGER {trigger}")


async def _row_cost(conn: asyncpg.Connection, rows: int = 50_000) -> dict[str, list[float]]:
    cost: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(3):
        for mode in ("with", "without"):
            await _triggers(conn, mode == "with")
            started = time.perf_counter()
            await conn.execute(ROWS, rows)
            cost[mode].append((time.perf_counter() - started) * 1e6 / rows)
            await conn.execute(BUMP, rows)
    await _triggers(conn, True)
    return cost


async def write_cost(args: argparse.Namespace) -> int:
    """Deductions per second with and without the late-write triggers, alternating."""
    name = f"keen_analytics_write_{os.getpid()}"
    accounts = 1000
    dsn = await ledger_bench.create_scratch(args.dsn, name, accounts)
    try:
        await ledger_bench.fund_accounts(Settings(database_url=dsn, pool_max_size=32))
        conn = await asyncpg.connect(dsn)
        tps: dict[str, list[float]] = {"with": [], "without": []}
        try:
            for _ in range(3):
                for mode in ("with", "without"):
                    await _triggers(conn, mode == "with")
                    tps[mode].append(
                        await asyncio.to_thread(
                            ledger_bench.pgbench,
                            dsn,
                            8,
                            args.write_cost,
                            accounts,
                            ledger_bench.LEDGER_DEBIT,
                        )
                    )
                    print(f"  deductions, 8 clients, triggers {mode}: {tps[mode][-1]:,.0f}/s")
            per_row = await _row_cost(conn)
        finally:
            await conn.close()
        with_, without = statistics.median(tps["with"]), statistics.median(tps["without"])
        print(
            f"deductions/s (median of 3): with the analytics triggers {with_:,.0f}, without"
            f" {without:,.0f}; with/without {with_ / without:.3f}"
        )
        row_with, row_without = (
            statistics.median(per_row["with"]),
            statistics.median(per_row["without"]),
        )
        print(
            f"ledger INSERT, us per row (median of 3): with {row_with:.1f}, without"
            f" {row_without:.1f}; the triggers' cost {row_with - row_without:.1f} us per row"
        )
    finally:
        await ledger_bench.drop_scratch(args.dsn, name)
    return 0


async def main(args: argparse.Namespace) -> int:
    if args.write_cost:
        return await write_cost(args)
    name = f"keen_analytics_bench_{os.getpid()}"
    progress = Progress()
    admin_conn = await asyncpg.connect(args.dsn)
    try:
        await admin_conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin_conn.close()
    dsn = with_database(args.dsn, name)
    try:
        progress.show(f"scratch database {name}: migrating")
        await asyncio.to_thread(upgrade, dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await generate(conn, args.scale, progress)
            admin = str(await conn.fetchval("SELECT id FROM users WHERE username = 'ab_1'"))
        finally:
            await conn.close()
        settings = Settings(database_url=dsn, pool_min_size=2, pool_max_size=4)
        db = await KeenDatabase.connect(settings=settings, migrate=False)
        try:
            progress.show("rollup (backfill of every hour, through the public API)")
            started = time.perf_counter()
            report = await db.analytics.rollup()
            backfill = time.perf_counter() - started
            progress.show(
                f"rolled {report.hours} hours and {len(report.days)} days in {backfill:.1f} s",
                done=True,
            )
            started = time.perf_counter()
            again = await db.analytics.rollup()
            print(
                f"rollup backfill: {report.hours} hours, {len(report.days)} days in"
                f" {backfill:.1f} s; a run with nothing new: {again.hours} hours in"
                f" {(time.perf_counter() - started) * 1000:.0f} ms"
            )
            await measure(db, admin, args.samples, args.live_samples)
        finally:
            await db.close()
    finally:
        if args.keep:
            print(f"kept scratch database {name}")
        else:
            admin_conn = await asyncpg.connect(args.dsn)
            try:
                await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin_conn.close()
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("KEEN_TEST_DATABASE_URL", "postgresql:///postgres"),
        help="a database on the server to test, where we may CREATE DATABASE",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="fraction of the full size (0.01: a quick run)"
    )
    parser.add_argument("--samples", type=int, default=200, help="public API calls per range")
    parser.add_argument("--live-samples", type=int, default=15, help="live computations per range")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument(
        "--write-cost",
        type=int,
        default=0,
        metavar="SECONDS",
        help="measure the deductions' cost of the late-write triggers instead (pgbench runs)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
