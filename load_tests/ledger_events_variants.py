"""What the event stream costs the ledger: four capture designs, one database, one run.

    python load_tests/ledger_events_variants.py [--dsn DSN] [--seconds 8] [--rounds 2]
                                                [--accounts 1000]

Makes a scratch database like ``ledger_bench.py`` (migrated to head, 1,000 funded accounts) and
runs the same two workloads under each variant, in rounds (every variant once per round, so
drift in the machine's load hits each alike):

- ``none``: the credit capture trigger disabled (the ledger alone; the baseline);
- ``capture``: the shipped trigger (one outbox row per ledger row; the after-commit NOTIFY from
  the DAL), no hub;
- ``hub``: the shipped design with a hub node (``keen-stream serve``) tailing the outbox: this
  is production;
- ``notify``: the trigger also calls ``pg_notify`` inside the writing transaction (the design
  the notes warn against: notifying commits serialize on a global lock), hub running.

Workloads: ``db.credits.deduct_credits`` from 32 asyncio callers (the public API: concurrent
calls share batched statements), and pgbench running the API's single-call SQL from 32
clients (one transaction per deduction, no Python). Printed per variant: tps and the ratio to
``none`` in the same round, plus pgbench's plain debit (UPDATE + INSERT) once per round, the
hub process's CPU and its listener backend's. Target: the shipped design (``hub``) keeps the
API at >= 0.8x of the ledger without events; printed both for the whole stream (hub / none:
the outbox row, its wake-up and the hub) and for the hub alone (hub / capture).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from statistics import mean

import asyncpg
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from keen_stream.dal.database import KeenDatabase  # noqa: E402
from keen_stream.settings import Settings  # noqa: E402
from load_tests import ledger_bench  # noqa: E402

VARIANTS = ("none", "capture", "hub", "notify")
CALLERS = 32

SHIPPED_CAPTURE = "SELECT pg_get_functiondef('keen_stream_capture_credit()'::regprocedure)"
# The notify variant is the shipped function with one more line.
SIGNAL = "PERFORM keen_stream_signal();"
IN_TRANSACTION_NOTIFY = SIGNAL + " PERFORM pg_notify('keen_stream_events', NEW.id::text);"
TRIGGER = "ALTER TABLE credit_transactions {} TRIGGER credit_transactions_stream"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


#: A line per connection would be measured too.
SERVE_QUIET = ("--log-level", "warning")


class Hub:
    """A ``keen-stream serve`` process on the scratch database, started and stopped per phase."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        if self.proc is not None:
            return
        port = free_port()
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "keen_stream", "serve", *SERVE_QUIET, "--port", str(port)],
            env={**os.environ, "KEEN_DATABASE_URL": self.dsn, "KEEN_POOL_MAX_SIZE": "4"},
            cwd=HERE.parent,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await asyncio.sleep(1.0)  # the listener connects after the server starts
                return
            except OSError:
                await asyncio.sleep(0.2)
        raise RuntimeError("the hub did not start")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 30)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


async def set_variant(owner: asyncpg.Connection, hub: Hub, variant: str, shipped: str) -> None:
    await owner.execute(TRIGGER.format("DISABLE" if variant == "none" else "ENABLE"))
    if SIGNAL not in shipped:
        raise RuntimeError("the capture function changed: update this benchmark's variants")
    notify = shipped.replace(SIGNAL, IN_TRANSACTION_NOTIFY)
    await owner.execute(notify if variant == "notify" else shipped)
    if variant in ("hub", "notify"):
        await hub.start()
    else:
        await hub.stop()


async def listener_pid(owner: asyncpg.Connection) -> int | None:
    pid = await owner.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'keen_stream_listener'"
        " AND datname = current_database()"
    )
    return int(pid) if pid is not None else None


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("KEEN_TEST_DATABASE_URL", "postgresql:///postgres")
    )
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accounts", type=int, default=1000)
    args = parser.parse_args()

    name = f"keen_ledger_events_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    dsn = await ledger_bench.create_scratch(args.dsn, name, args.accounts)
    hub = Hub(dsn)
    secs, n = args.seconds, args.accounts
    results: dict[str, dict[str, list[float]]] = {v: {} for v in (*VARIANTS, "plain")}
    print(
        f"ledger under four capture designs: {CALLERS} callers, {secs} s per workload, "
        f"{args.rounds} rounds, {n} accounts, {os.cpu_count()} CPUs"
    )
    try:
        settings = Settings(database_url=dsn, pool_min_size=CALLERS, pool_max_size=CALLERS)
        owner = await asyncpg.connect(dsn)
        shipped = await owner.fetchval(SHIPPED_CAPTURE)
        db = await KeenDatabase.connect(settings=settings, migrate=False)
        try:
            async with db.system_transaction() as conn:
                users = [r["user_id"] for r in await conn.fetch("SELECT user_id FROM bench_users")]
            gate = asyncio.Semaphore(CALLERS)

            async def fund(user: uuid.UUID) -> None:
                async with gate:
                    await db.billing.purchase(user, ledger_bench.START_BALANCE, description="f")

            await asyncio.gather(*(fund(u) for u in users))
            for round_no in range(1, args.rounds + 1):
                await set_variant(owner, hub, "none", shipped)
                plain = ledger_bench.pgbench(dsn, CALLERS, secs, n)
                results["plain"].setdefault("sql", []).append(plain)
                print(f"round {round_no}: pgbench plain debit {plain:,.0f} tps", flush=True)
                for variant in VARIANTS:
                    await set_variant(owner, hub, variant, shipped)
                    await ledger_bench.api_run(db, users, CALLERS, 1.0)  # warm up
                    lpid = await listener_pid(owner)
                    hub0, lst0, t0 = cpu_seconds(hub.pid), cpu_seconds(lpid), time.perf_counter()
                    api = await ledger_bench.api_run(db, users, CALLERS, secs)
                    sql = await asyncio.to_thread(
                        ledger_bench.pgbench, dsn, CALLERS, secs, n, ledger_bench.LEDGER_DEBIT
                    )
                    elapsed = time.perf_counter() - t0
                    hub_cpu = 100 * (cpu_seconds(hub.pid) - hub0) / elapsed
                    lst_cpu = 100 * (cpu_seconds(lpid) - lst0) / elapsed if lpid else 0.0
                    for key, value in (
                        ("api", api),
                        ("sql", sql),
                        ("hub", hub_cpu),
                        ("listener", lst_cpu),
                    ):
                        results[variant].setdefault(key, []).append(value)
                    print(
                        f"  {variant:<8} api {api:7,.0f} tps   api's SQL (pgbench) {sql:7,.0f} tps"
                        f"   hub process {hub_cpu:4.1f}% CPU, its listener backend {lst_cpu:4.1f}%",
                        flush=True,
                    )
            await set_variant(owner, hub, "capture", shipped)
            report = await db.credits.verify_ledger()
        finally:
            await hub.stop()
            await db.close()
            await owner.close()
    finally:
        await ledger_bench.drop_scratch(args.dsn, name)

    base_api, base_sql = results["none"]["api"], results["none"]["sql"]
    print(f"\n{'mean of rounds':<10}{'api tps':>10}{'÷ none':>8}{'SQL tps':>10}{'÷ none':>8}")
    for variant in VARIANTS:
        api_ratios = [a / b for a, b in zip(results[variant]["api"], base_api, strict=True)]
        sql_ratios = [a / b for a, b in zip(results[variant]["sql"], base_sql, strict=True)]
        print(
            f"{variant:<10}{mean(results[variant]['api']):>10,.0f}{mean(api_ratios):>8.2f}"
            f"{mean(results[variant]['sql']):>10,.0f}{mean(sql_ratios):>8.2f}"
            f"   (rounds: api {', '.join(f'{x:.2f}' for x in api_ratios)};"
            f" SQL {', '.join(f'{x:.2f}' for x in sql_ratios)})"
        )
    print(f"pgbench plain debit: {mean(results['plain']['sql']):,.0f} tps")
    print(
        f"ledger verify: {report.transactions} transactions, "
        f"{'clean' if report.ok else f'{len(report.problems)} PROBLEMS'}"
    )

    def ratio(variant: str, base: str) -> float:
        pairs = zip(results[variant]["api"], results[base]["api"], strict=True)
        return mean(a / b for a, b in pairs)

    whole, hub_alone = ratio("hub", "none"), ratio("hub", "capture")
    print(
        f"the event stream's whole cost (hub / none): {whole:.2f}; the hub's own (hub / capture):"
        f" {hub_alone:.2f}; target >= 0.80: {'met' if whole >= 0.8 else 'NOT met'} (whole),"
        f" {'met' if hub_alone >= 0.8 else 'NOT met'} (hub)"
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        sys.exit(asyncio.run(main()))
    sys.exit(uvloop.run(main()))
