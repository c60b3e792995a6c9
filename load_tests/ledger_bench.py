"""Ledger throughput: public-API deductions vs pgbench's plain debit, on the same server, same run.

    python load_tests/ledger_bench.py [--dsn DSN] [--seconds N] [--accounts N] [--keys]

Creates a scratch database (migrated with keen_stream.migrate.upgrade, so any triggers later
migrations add are included), runs each workload for ``--seconds`` and drops the database.
Printed: tps of ``db.credits.deduct_credits`` at 8 and 32 concurrent callers over many accounts,
pgbench ``-M prepared`` running the plain debit (UPDATE one account row + INSERT one history
row) at 8 and 32 clients, their ratio (target: >= 0.8 at 32), and the hot case where every
caller deducts from one account. Absolute numbers drift between runs on shared machines: read
the ratios. ``--keys`` adds a run where every deduction carries an idempotency key.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keen_stream.dal.database import KeenDatabase
from keen_stream.migrate import upgrade
from keen_stream.settings import Settings

PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
COST = Decimal("0.001")  # 0.005 credits at the default 5x markup
START_BALANCE = Decimal(1_000_000)

PLAIN_DEBIT = """\
\\set aid random(1, {accounts})
BEGIN;
UPDATE bench_accounts SET balance = balance - 0.005 WHERE aid = :aid;
INSERT INTO bench_history (aid, delta) VALUES (:aid, -0.005);
END;
"""
# Triggers on the ledger's tables that the ledger itself did not create.
OTHER_TRIGGERS = """
    SELECT tgrelid::regclass::text AS tgrelid, tgname FROM pg_trigger
     WHERE NOT tgisinternal
       AND tgrelid IN ('credit_transactions'::regclass, 'credit_accounts'::regclass,
                       'credit_holds'::regclass)
       AND tgname NOT IN ('credit_transactions_append_only', 'credit_accounts_touch_updated_at')
"""
PGBENCH_TABLES = [
    "CREATE TABLE bench_accounts (aid integer PRIMARY KEY, balance numeric(18,6) NOT NULL)",
    "CREATE TABLE bench_history (aid integer NOT NULL, delta numeric(18,6) NOT NULL,"
    " mtime timestamptz NOT NULL DEFAULT now())",
]


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    netloc = f"//{parts.netloc}" if parts.netloc or dsn.startswith(f"{parts.scheme}://") else ""
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}:{netloc}/{name}{query}"


async def create_scratch(
    admin_dsn: str, name: str, accounts: int, *, ledger_only: bool = False
) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, name)
    await asyncio.to_thread(upgrade, dsn)
    conn = await asyncpg.connect(dsn)
    try:
        # Users and their empty accounts in bulk (registration's argon2 is not what we measure);
        # the credits then go in through the public API so the ledger proves every balance.
        await conn.execute(
            """
            INSERT INTO users (email, username, password_hash)
            SELECT 'bench' || g || '@example.com', 'bench_' || g, 'not-a-hash'
              FROM generate_series(1, $1) g""",
            accounts,
        )
        await conn.execute("INSERT INTO credit_accounts (user_id) SELECT id FROM users")
        for statement in PGBENCH_TABLES:
            await conn.execute(statement)
        await conn.execute(
            "INSERT INTO bench_accounts SELECT g, $2 FROM generate_series(1, $1) g",
            accounts,
            START_BALANCE,
        )
        if ledger_only:
            for row in await conn.fetch(OTHER_TRIGGERS):
                await conn.execute(
                    f'ALTER TABLE {row["tgrelid"]} DISABLE TRIGGER "{row["tgname"]}"'
                )
                print(f"disabled trigger {row['tgname']} on {row['tgrelid']}")
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return dsn


async def drop_scratch(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def pgbench(dsn: str, clients: int, seconds: int, accounts: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(PLAIN_DEBIT.format(accounts=accounts))
    try:
        out = subprocess.run(
            [PGBENCH, "-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-T", str(seconds),
             "-f", script.name, dsn],
            check=True, capture_output=True, text=True,
        ).stdout
    finally:
        os.unlink(script.name)
    match = re.search(r"tps = ([0-9.]+)", out)
    if match is None:
        raise RuntimeError(f"no tps in pgbench output:\n{out}")
    return float(match.group(1))


async def api_run(
    db: KeenDatabase, users: list[uuid.UUID], callers: int, seconds: float, *, keys: bool = False
) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def caller(n: int) -> None:
        nonlocal done
        rng = random.Random(n)
        i = 0
        while time.perf_counter() < stop:
            user = rng.choice(users)
            key = f"bench-{n}-{i}" if keys else None
            i += 1
            await db.credits.deduct_credits(user, COST, None, "bench", idempotency_key=key)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    return done / (time.perf_counter() - started)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("KEEN_TEST_DATABASE_URL", "postgresql:///postgres"),
        help="a database on the server to test, where we may CREATE DATABASE",
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--keys", action="store_true", help="also run with idempotency keys")
    parser.add_argument(
        "--ledger-only",
        action="store_true",
        help="disable other areas' triggers on the ledger tables (measures the ledger alone)",
    )
    args = parser.parse_args()

    name = f"keen_ledger_bench_{os.getpid()}"
    print(f"scratch database {name}; {args.seconds} s per run; {args.accounts} accounts")
    dsn = await create_scratch(args.dsn, name, args.accounts, ledger_only=args.ledger_only)
    try:
        settings = Settings(database_url=dsn, pool_min_size=32, pool_max_size=32)
        db = await KeenDatabase.connect(settings=settings, migrate=False)
        try:
            async with db.system_transaction() as conn:
                users = [r["user_id"] for r in await conn.fetch(
                    "SELECT user_id FROM credit_accounts ORDER BY user_id")]
            sem = asyncio.Semaphore(32)

            async def fund(user: uuid.UUID) -> None:
                async with sem:
                    await db.credits.add_credits(user, START_BALANCE, description="bench funds")

            await asyncio.gather(*(fund(u) for u in users))
            # Warm the pool's prepared statements and PL/pgSQL plan caches.
            await api_run(db, users, 32, 1.0)

            results: dict[str, float] = {}
            for callers in (8, 32):
                results[f"pgbench {callers}"] = pgbench(dsn, callers, args.seconds, args.accounts)
                results[f"api {callers}"] = await api_run(db, users, callers, args.seconds)
            results["pgbench hot 32"] = pgbench(dsn, 32, args.seconds, 1)
            results["api hot 32"] = await api_run(db, users[:1], 32, args.seconds)
            if args.keys:
                results["api keys 32"] = await api_run(db, users, 32, args.seconds, keys=True)

            report = await db.credits.verify_ledger()
        finally:
            await db.close()
    finally:
        await drop_scratch(args.dsn, name)

    print()
    print(f"{'workload':<44}{'8 callers':>12}{'32 callers':>12}")
    print(f"{'pgbench plain debit (UPDATE + INSERT)':<44}"
          f"{results['pgbench 8']:>12,.0f}{results['pgbench 32']:>12,.0f}")
    print(f"{'db.credits.deduct_credits (public API)':<44}"
          f"{results['api 8']:>12,.0f}{results['api 32']:>12,.0f}")
    r8 = results["api 8"] / results["pgbench 8"]
    r32 = results["api 32"] / results["pgbench 32"]
    print(f"{'ratio api / pgbench':<44}{r8:>12.2f}{r32:>12.2f}")
    print(f"{'hot: pgbench plain debit on one account':<44}{'':>12}"
          f"{results['pgbench hot 32']:>12,.0f}")
    print(f"{'hot: deduct_credits on one account':<44}{'':>12}{results['api hot 32']:>12,.0f}")
    print(f"{'hot ratio':<44}{'':>12}{results['api hot 32'] / results['pgbench hot 32']:>12.2f}")
    if "api keys 32" in results:
        print(f"{'deduct_credits with idempotency keys':<44}{'':>12}"
              f"{results['api keys 32']:>12,.0f}")
    print(f"\nledger verify: {report.transactions} transactions, "
          f"{'clean' if report.ok else f'{len(report.problems)} PROBLEMS'}")
    print(f"target >= 0.80 at 32 callers: {'met' if r32 >= 0.8 else 'NOT met'} ({r32:.2f})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
