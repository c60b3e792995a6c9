"""Ledger throughput: public-API deductions vs pgbench's plain debit, on the same server, same run.

    python load_tests/ledger_bench.py [--dsn DSN] [--seconds N] [--accounts N] [--keys]
                                      [--ledger-only] [--unbatched]
    python load_tests/ledger_bench.py --isolated-cores [--seconds N] [--accounts N]
                                      [--fsync on|off]

Creates a scratch database (migrated with keen_stream.migrate.upgrade, so any triggers later
migrations add are included), runs each workload for ``--seconds`` and drops the database.
Printed: tps of ``db.credits.deduct_credits`` at 8 and 32 concurrent callers over many accounts,
pgbench ``-M prepared`` running the plain debit (UPDATE one account row + INSERT one history
row) at 8 and 32 clients, their ratio (target: >= 0.8 at 32), pgbench running the very SQL the
API sends (to separate the server's work from the Python client's), and the hot case where
every caller deducts from one account. Absolute numbers drift between runs on shared machines:
read the ratios. ``--keys`` adds a run where every deduction carries an idempotency key;
``--ledger-only`` disables triggers other areas put on the ledger's tables; ``--unbatched`` adds
a run of the API with deduction batching off (``ledger_batch_max=1``), for comparison.

``--isolated-cores`` gives PostgreSQL a core of its own: a private cluster (initdb in a temporary
directory, ``tests/pgcluster.py``) started under ``taskset -c 0``, while this process
(``os.sched_setaffinity``) and pgbench (``taskset -c 1``) run on CPU 1. In the scratch database
there it measures pgbench's plain debit, ``db.credits.deduct_credits`` and the seed spec's
``deductCredits`` ported to asyncpg (``load_tests/isolated_cores.py``), at 8 and 32 callers,
with ratios against the plain debit of the same run; ``--dsn`` is not used.
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
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keen_stream.dal.credits import SQL
from keen_stream.dal.database import KeenDatabase
from keen_stream.migrate import upgrade
from keen_stream.settings import Settings, with_database

PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
COST = Decimal("0.001")  # 0.005 credits at the default 5x markup
START_BALANCE = Decimal(1_000_000)
SERVER_CPU, CLIENT_CPU = 0, 1  # --isolated-cores (as in load_tests/isolated_cores.py)

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
# The API's server-side work without the Python client: the very statement deduct_credits sends
# (one round trip, its own implicit transaction), with pgbench's variables for the parameters.
LEDGER_DEBIT = (
    "\\set aid random(1, {accounts})\n"
    + (
        SQL["deduct_call"]
        .replace("$1", "(SELECT user_id::text FROM bench_users WHERE aid = :aid)")
        .replace("$2", str(COST))
        .replace("$3", "NULL")
        .replace("$4", "'bench'")
        .replace("$5", "NULL")
        .replace("{", "{{")
        .replace("}", "}}")
    )
    + ";\n"
)

PGBENCH_TABLES = [
    "CREATE TABLE bench_accounts (aid integer PRIMARY KEY, balance numeric(18,6) NOT NULL)",
    "CREATE TABLE bench_history (aid integer NOT NULL, delta numeric(18,6) NOT NULL,"
    " mtime timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE bench_users AS"
    " SELECT row_number() OVER (ORDER BY user_id)::integer AS aid, user_id FROM credit_accounts",
    "ALTER TABLE bench_users ADD PRIMARY KEY (aid)",
    "GRANT SELECT ON bench_users TO keen_app, keen_system",
]


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


def pgbench(
    dsn: str,
    clients: int,
    seconds: int,
    accounts: int,
    script_text: str = PLAIN_DEBIT,
    prefix: Sequence[str] = (),
) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(script_text.format(accounts=accounts))
    try:
        out = subprocess.run(
            [
                *prefix,
                PGBENCH,
                "-n",
                "-M",
                "prepared",
                "-c",
                str(clients),
                "-j",
                "2",
                "-T",
                str(seconds),
                "-f",
                script.name,
                dsn,
            ],
            check=False,
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(script.name)
    match = re.search(r"tps = ([0-9.]+)", out.stdout)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
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


async def fund_accounts(settings: Settings) -> list[uuid.UUID]:
    """Credit every bench user START_BALANCE through the public API; their ids, by aid."""
    db = await KeenDatabase.connect(settings=settings, migrate=False)
    try:
        async with db.system_transaction() as conn:
            users = [
                row["user_id"]
                for row in await conn.fetch("SELECT user_id FROM bench_users ORDER BY aid")
            ]
        sem = asyncio.Semaphore(32)

        async def fund(user: uuid.UUID) -> None:
            async with sem:
                await db.billing.purchase(user, START_BALANCE, description="bench funds")

        await asyncio.gather(*(fund(u) for u in users))
    finally:
        await db.close()
    return users


async def api_tps(
    settings: Settings,
    callers: int,
    accounts: list[uuid.UUID],
    seconds: float,
    keys: bool = False,
    batch: bool = True,
) -> float:
    # A pool per run, closed before pgbench runs again: 2 x 32 connections could exceed
    # a shared server's max_connections.
    run_settings = settings if batch else settings.model_copy(update={"ledger_batch_max": 1})
    db = await KeenDatabase.connect(settings=run_settings, migrate=False)
    try:
        await api_run(db, accounts, callers, 1.0)  # warm statements and plan caches
        before = db.credits.batch_stats()
        tps = await api_run(db, accounts, callers, seconds, keys=keys)
        stats = {k: v - before[k] for k, v in db.credits.batch_stats().items()}
        size = stats["batched_items"] / stats["batches"] if stats["batches"] else 0
        print(
            f"  api, {callers} callers on {len(accounts)} account(s): {tps:,.0f}/s;"
            f" {stats['singles']:,} alone, {stats['batched_items']:,} in"
            f" {stats['batches']:,} batches (mean {size:.1f})",
            flush=True,
        )
        return tps
    finally:
        await db.close()


def parse_args() -> argparse.Namespace:
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
        "--unbatched", action="store_true", help="also run the API at 32 callers with batching off"
    )
    parser.add_argument(
        "--ledger-only",
        action="store_true",
        help="disable other areas' triggers on the ledger tables (measures the ledger alone)",
    )
    parser.add_argument(
        "--isolated-cores",
        action="store_true",
        help=f"a private PostgreSQL on CPU {SERVER_CPU}, every client on CPU {CLIENT_CPU}; "
        "API, plain debit and the seed spec's deduction",
    )
    parser.add_argument(
        "--fsync",
        choices=("on", "off"),
        default="on",
        help="the private server's fsync (--isolated-cores only; default on)",
    )
    return parser.parse_args()


async def main(args: argparse.Namespace) -> int:
    if args.isolated_cores:
        return await isolated_main(args)
    name = f"keen_ledger_bench_{os.getpid()}"
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(
        f"scratch database {name}; {args.seconds} s per run; {args.accounts} accounts; "
        f"event loop: {loop}"
    )
    dsn = await create_scratch(args.dsn, name, args.accounts, ledger_only=args.ledger_only)
    r: dict[str, float] = {}
    n, secs = args.accounts, args.seconds
    settings = Settings(database_url=dsn, pool_min_size=32, pool_max_size=32)
    try:
        users = await fund_accounts(settings)

        async def api(
            callers: int, accounts: list[uuid.UUID], keys: bool = False, batch: bool = True
        ) -> float:
            return await api_tps(settings, callers, accounts, secs, keys=keys, batch=batch)

        # Interleaved, so that drift in a shared machine's load hits every workload alike.
        for callers in (8, 32):
            r[f"pgbench {callers}"] = pgbench(dsn, callers, secs, n)
            r[f"api {callers}"] = await api(callers, users)
            r[f"sql {callers}"] = pgbench(dsn, callers, secs, n, LEDGER_DEBIT)
        r["pgbench hot"] = pgbench(dsn, 32, secs, 1)
        r["api hot"] = await api(32, users[:1])
        r["sql hot"] = pgbench(dsn, 32, secs, 1, LEDGER_DEBIT)
        if args.keys:
            r["api keys 32"] = await api(32, users, keys=True)
        if args.unbatched:
            r["api unbatched 32"] = await api(32, users, batch=False)
        db = await KeenDatabase.connect(settings=settings, migrate=False)
        try:
            report = await db.credits.verify_ledger()
        finally:
            await db.close()
    finally:
        await drop_scratch(args.dsn, name)

    def row(label: str, a: str, b: str, fmt: str = ",.0f") -> None:
        first = format(r[a], fmt) if a in r else ""
        print(f"{label:<52}{first:>11}{format(r[b], fmt):>11}")

    r.update(
        {
            "ratio 8": r["api 8"] / r["pgbench 8"],
            "ratio 32": r["api 32"] / r["pgbench 32"],
            "sql ratio 8": r["sql 8"] / r["pgbench 8"],
            "sql ratio 32": r["sql 32"] / r["pgbench 32"],
            "hot ratio": r["api hot"] / r["pgbench hot"],
            "sql hot ratio": r["sql hot"] / r["pgbench hot"],
        }
    )
    print(f"\n{'tps':<52}{'8 callers':>11}{'32 callers':>11}")
    row("pgbench plain debit (UPDATE + INSERT)", "pgbench 8", "pgbench 32")
    row("db.credits.deduct_credits (public API, Python)", "api 8", "api 32")
    row("  ratio api / plain debit (target >= 0.80 at 32)", "ratio 8", "ratio 32", ".2f")
    row("pgbench running the API's SQL (no Python)", "sql 8", "sql 32")
    row("  ratio api's SQL / plain debit", "sql ratio 8", "sql ratio 32", ".2f")
    print("hot case: every caller on one account")
    row("  pgbench plain debit", "", "pgbench hot")
    row("  db.credits.deduct_credits", "", "api hot")
    row("  ratio", "", "hot ratio", ".2f")
    row("  pgbench running the API's SQL", "", "sql hot")
    row("  ratio", "", "sql hot ratio", ".2f")
    if "api keys 32" in r:
        row("deduct_credits with idempotency keys", "", "api keys 32")
    if "api unbatched 32" in r:
        r["unbatched ratio"] = r["api unbatched 32"] / r["pgbench 32"]
        row("deduct_credits, batching off (KEEN_LEDGER_BATCH_MAX=1)", "", "api unbatched 32")
        row("  ratio", "", "unbatched ratio", ".2f")
    print(
        f"\nledger verify: {report.transactions} transactions, "
        f"{'clean' if report.ok else f'{len(report.problems)} PROBLEMS'}"
    )
    met = "met" if r["ratio 32"] >= 0.8 else "NOT met"
    print(f"target >= 0.80 x plain debit at 32 callers: {met} ({r['ratio 32']:.2f})")
    return 0 if report.ok else 1


async def isolated_main(args: argparse.Namespace) -> int:
    """--isolated-cores: PostgreSQL alone on SERVER_CPU, every client on CLIENT_CPU."""
    from load_tests.isolated_cores import (
        CpuWindow,
        create_pinned,
        seed_pool,
        seed_run,
        server_affinities,
    )

    n, secs = args.accounts, args.seconds
    pin = ["taskset", "-c", str(CLIENT_CPU)]
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    mine = sorted(os.sched_getaffinity(0))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"isolated cores: server on CPU {SERVER_CPU}; this process on CPU(s) {mine}, pgbench"
        f" under {' '.join(pin)}; {secs} s per run; {n} accounts; event loop: {loop};"
        f" load average {load}",
        flush=True,
    )
    cluster = create_pinned(SERVER_CPU, fsync=args.fsync == "on")
    r: dict[str, float] = {}
    try:
        pinned = ", ".join(f"{k} x{v}" for k, v in server_affinities(cluster).items())
        admin_dsn = f"postgresql://postgres@/postgres?host={cluster.socket_dir}&port={cluster.port}"
        conn = await asyncpg.connect(admin_dsn)
        try:
            shown = {
                k: await conn.fetchval(f"SHOW {k}")
                for k in (
                    "server_version",
                    "fsync",
                    "synchronous_commit",
                    "shared_buffers",
                    "max_connections",
                    "wal_buffers",
                    "max_wal_size",
                )
            }
        finally:
            await conn.close()
        print(f"private server {cluster.root} (unix socket), server processes' CPUs: {pinned}")
        print("  " + "; ".join(f"{k} = {v}" for k, v in shown.items()), flush=True)

        dsn = await create_scratch(admin_dsn, "keen_ledger_bench", n)
        settings = Settings(database_url=dsn, pool_min_size=32, pool_max_size=32)
        users = await fund_accounts(settings)

        async def seed(callers: int, one_transaction: bool) -> float:
            pool = await seed_pool(dsn, 32)
            try:
                await seed_run(pool, users, callers, 1.0, COST, one_transaction=one_transaction)
                tps = await seed_run(
                    pool, users, callers, secs, COST, one_transaction=one_transaction
                )
            finally:
                await pool.close()
            what = "one transaction" if one_transaction else "literal"
            print(f"  seed deductCredits ({what}), {callers} callers: {tps:,.0f}/s", flush=True)
            return tps

        # Interleaved, so that drift in a shared machine's load hits every workload alike. Each
        # line is followed by how busy each CPU was meanwhile and how much of it was ours (the
        # window includes the 1 s warm-up and the pool's connects).
        for callers in (8, 32):
            window = CpuWindow(cluster)
            r[f"pgbench {callers}"] = pgbench(dsn, callers, secs, n, prefix=pin)
            print(f"  pgbench plain debit, {callers} clients: {r[f'pgbench {callers}']:,.0f}/s")
            print(f"    {await window.report()}", flush=True)
            window = CpuWindow(cluster)
            r[f"api {callers}"] = await api_tps(settings, callers, users, secs)
            print(f"    {await window.report()}", flush=True)
            for key, one_transaction in (("seed", False), ("seed1", True)):
                window = CpuWindow(cluster)
                r[f"{key} {callers}"] = await seed(callers, one_transaction)
                print(f"    {await window.report()}", flush=True)
        db = await KeenDatabase.connect(settings=settings, migrate=False)
        try:
            report = await db.credits.verify_ledger()
        finally:
            await db.close()
    finally:
        cluster.destroy()

    for c in (8, 32):
        for k in ("api", "seed", "seed1"):
            r[f"{k} ratio {c}"] = r[f"{k} {c}"] / r[f"pgbench {c}"]
        r[f"api/seed {c}"] = r[f"api {c}"] / r[f"seed {c}"]

    def row(label: str, key: str, fmt: str = ",.0f") -> None:
        print(f"{label:<58}{format(r[key + ' 8'], fmt):>11}{format(r[key + ' 32'], fmt):>11}")

    print(
        f"\n{'tps (server alone on CPU 0, clients on CPU 1)':<58}{'8 callers':>11}"
        f"{'32 callers':>11}"
    )
    row("pgbench plain debit (UPDATE + INSERT), the baseline", "pgbench")
    row("db.credits.deduct_credits (public API, Python)", "api")
    row("  ratio / plain debit", "api ratio", ".2f")
    row("seed deductCredits ported literally (8 round trips)", "seed")
    row("  ratio / plain debit", "seed ratio", ".2f")
    row("seed deduction as one transaction (6 round trips)", "seed1")
    row("  ratio / plain debit", "seed1 ratio", ".2f")
    row("public API / seed literal", "api/seed", ".2f")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\nfsync = {shown['fsync']}, synchronous_commit = {shown['synchronous_commit']};"
        f" load average at the end {load}"
    )
    print(
        f"ledger verify: {report.transactions} transactions, "
        f"{'clean' if report.ok else f'{len(report.problems)} PROBLEMS'}"
    )
    return 0 if report.ok else 1


def run() -> int:
    args = parse_args()
    if args.isolated_cores:
        # Before the event loop and any thread exist: threads inherit the affinity.
        os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        import uvloop
    except ImportError:  # the plain asyncio loop still works, slower
        return asyncio.run(main(args))
    return uvloop.run(main(args))


if __name__ == "__main__":
    sys.exit(run())
