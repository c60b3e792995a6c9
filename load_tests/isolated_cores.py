"""Helpers for ``ledger_bench.py --isolated-cores``: a private PostgreSQL pinned to one core,
and the seed spec's ``deductCredits`` ported to asyncpg.

The server is ``tests/pgcluster.py``'s OwnedPostgres (initdb in a temporary directory, run as
the ``postgres`` OS user when we are root), started under ``taskset -c <cpu>`` so the postmaster
and every process it forks (backends, WAL writer, checkpointer, ...) inherit that affinity.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import subprocess
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from tests.pgcluster import OwnedPostgres, _as_postgres

#: postgresql.conf for the pinned server. fsync is set by the caller (and printed).
SERVER_SETTINGS = {
    "max_connections": "100",  # pools of 32 (one at a time) + pgbench's 32 + the admin's
    "shared_buffers": "256MB",
    "wal_buffers": "16MB",
    "max_wal_size": "2GB",  # no forced checkpoint inside a run
    "checkpoint_timeout": "15min",
    "synchronous_commit": "on",
}


SERVER_CPU, CLIENT_CPU = 0, 1


def create_pinned(cpu: int, *, fsync: bool) -> OwnedPostgres:
    """initdb a private cluster and start it with every server process on ``cpu``."""
    cluster = OwnedPostgres.create(None, **SERVER_SETTINGS, fsync="on" if fsync else "off")
    try:
        command = [
            "taskset",
            "-c",
            str(cpu),
            *_as_postgres(),
            str(cluster.bin_dir / "pg_ctl"),
            "-D",
            str(cluster.data_dir),
            "-l",
            str(cluster.log_file),
            "-w",
            "-t",
            "60",
            "start",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"pg_ctl start failed: {result.stdout}{result.stderr}\n{cluster.tail_log()}"
            )
    except BaseException:
        cluster.destroy()
        raise
    return cluster


def server_affinities(cluster: OwnedPostgres) -> dict[str, int]:
    """CPU list -> number of the cluster's processes with that affinity (postmaster + children)."""
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    seen: dict[str, int] = {}
    for pid in pids:
        try:
            cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(pid)))
        except OSError:  # exited meanwhile
            continue
        seen[cpus] = seen.get(cpus, 0) + 1
    return seen


def cpu_times() -> dict[int, tuple[int, int, int]]:
    """Per CPU, from /proc/stat: (busy, steal, total) jiffies; idle and iowait are not busy."""
    times: dict[int, tuple[int, int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (v[0] + v[1] + v[2] + v[5] + v[6], v[7], sum(v))
    return times


def _proc_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid`` (its own and its reaped children's), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def server_cpu(cluster: OwnedPostgres) -> float:
    """CPU seconds the cluster has used: the postmaster, its live children and (through the
    postmaster's cutime/cstime) every backend that has exited."""
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    total = _proc_cpu(postmaster)
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
        total += sum(_proc_cpu(int(p)) for p in children)
    return total


def client_cpu() -> float:
    """CPU seconds of this process (every thread) and its waited-for children (pgbench)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuWindow:
    """How busy each CPU was over a workload, and how much of that was ours.

    Everything else on the machine counts in "busy" too: taskset keeps our processes in place,
    it does not keep other processes off these CPUs."""

    def __init__(self, cluster: OwnedPostgres) -> None:
        self.cluster = cluster
        self.cpus = cpu_times()
        self.server = server_cpu(cluster)
        self.client = client_cpu()
        self.started = time.monotonic()

    async def report(self) -> str:
        await asyncio.sleep(0.3)  # let the postmaster reap the closed pool's backends
        after = cpu_times()
        wall = time.monotonic() - self.started
        ours = {
            SERVER_CPU: server_cpu(self.cluster) - self.server,
            CLIENT_CPU: client_cpu() - self.client,
        }
        who = {SERVER_CPU: "server", CLIENT_CPU: "clients"}
        parts = []
        for cpu, (busy, steal, total) in sorted(self.cpus.items()):
            elapsed = max(1, after[cpu][2] - total)
            part = f"cpu{cpu} {100 * (after[cpu][0] - busy) / elapsed:.0f}% busy"
            if cpu in ours:
                part += f" ({who[cpu]} {100 * ours[cpu] / wall:.0f}%"
            stolen = 100 * (after[cpu][1] - steal) / elapsed
            part += f", {stolen:.0f}% stolen" if stolen >= 1 else ""
            parts.append(part + (")" if cpu in ours else ""))
        return ", ".join(parts)


# --- the seed spec's deductCredits, ported to asyncpg ----------------------------------------
# The original phase-1 specification (TypeScript), "Credit Management Implementation":
# CreditManager.deductCredits -> isAdminUser (a pool query), then
# dbManager.executeUserTransaction -> getUserConnection (SET LOCAL app.current_user_id, then
# checkAdminUser, a second pool query) -> BEGIN -> SELECT * ... FOR UPDATE -> balance check in
# the client -> UPDATE -> INSERT ... RETURNING * -> COMMIT.
#
# What differs from the seed, and why:
# - Our schema numbers the ledger: credit_transactions.sequence_number is NOT NULL and unique per
#   account, and credit_accounts.last_sequence must follow it (`ledger verify` checks the chain).
#   The port takes last_sequence + 1 from the row it locked, writes it in the UPDATE and the
#   INSERT. balance_after is the seed's own newBalance. Everything else NOT NULL has a default.
# - `SET LOCAL app.current_user_id = $1` is not valid SQL (SET takes no parameters):
#   set_config('app.current_user_id', $1, true) is the same thing. The seed sends it before
#   BEGIN, where it lasts only for its own statement; the literal port keeps that order (the
#   round trip is what counts here), the one-transaction variant leaves it out.
# - checkAdminUser goes through the pool in the seed; here it runs on the connection already
#   held (same statement, same round trip; a second pool checkout per call can deadlock a pool
#   sized to the callers). isAdminUser does take its own checkout, as in the seed.
# - The pool does nothing on release, like node-postgres' Pool (asyncpg's default reset would be
#   one more round trip per checkout that the seed never paid).
# - It runs as the superuser that owns the tables, so RLS and column privileges do not apply; the
#   triggers and checks do (the hub's credit_transactions_stream outbox trigger of migration
#   0004, the row CHECK functions of 0002, foreign keys, unique indexes). Money is Decimal
#   (the seed used JS numbers); the markup is the seed's constant 5.0. session_id is NULL (the
#   seed passed a string; ours is a uuid referencing agent_sessions). The bench users are never
#   admins, so the seed's handleAdminBypass branch is not ported: an admin here is an error.
SEED_IS_ADMIN_USER = """
    SELECT ca.unlimited_credits, u.is_admin
      FROM credit_accounts ca
      JOIN users u ON ca.user_id = u.id
     WHERE ca.user_id = $1"""
SEED_SET_USER = "SELECT set_config('app.current_user_id', $1, true)"
SEED_CHECK_ADMIN_USER = "SELECT is_admin FROM users WHERE id = $1"
SEED_LOCK_ACCOUNT = "SELECT * FROM credit_accounts WHERE user_id = $1 FOR UPDATE"
SEED_UPDATE_BALANCE = """
    UPDATE credit_accounts
       SET current_balance = $1, lifetime_spent = lifetime_spent + $2, updated_at = NOW(),
           last_sequence = $4
     WHERE user_id = $3"""
SEED_INSERT_TRANSACTION = """
    INSERT INTO credit_transactions (
      user_id, account_id, transaction_type, amount, balance_after,
      claude_cost_usd, keen_markup_multiplier, session_id, description, sequence_number
    ) VALUES ($1, $2, 'usage', $3, $4, $5, $6, $7, $8, $9) RETURNING *"""
# The brief's condensed form: one admin check, inside the one transaction.
ONE_TX_CHECK_ADMIN = "SELECT is_admin, role FROM users WHERE id = $1"
SEED_MARKUP = Decimal("5.0")


class SeedAdminUser(Exception):
    """The seed would have taken handleAdminBypass; the bench never should."""


async def _charge(conn: Any, user: uuid.UUID, claude_cost: Decimal, description: str) -> Any:
    """The statements inside executeUserTransaction's BEGIN ... COMMIT."""
    credit_cost = claude_cost * SEED_MARKUP
    account = await conn.fetchrow(SEED_LOCK_ACCOUNT, user)
    if account is None:
        raise RuntimeError("Credit account not found")
    if account["current_balance"] < credit_cost:
        raise RuntimeError(f"Insufficient credits: {account['current_balance']} < {credit_cost}")
    new_balance = account["current_balance"] - credit_cost
    sequence = account["last_sequence"] + 1
    await conn.execute(SEED_UPDATE_BALANCE, new_balance, credit_cost, user, sequence)
    return await conn.fetchrow(
        SEED_INSERT_TRANSACTION,
        user,
        account["id"],
        -credit_cost,
        new_balance,
        claude_cost,
        SEED_MARKUP,
        None,
        description,
        sequence,
    )


async def seed_deduct_credits(
    pool: Any, user: uuid.UUID, claude_cost: Decimal, description: str
) -> Any:
    """The seed's deductCredits, literally: 8 round trips (2 before BEGIN, 2 checkouts)."""
    row = await pool.fetchrow(SEED_IS_ADMIN_USER, user)  # isAdminUser
    if row is not None and (row["unlimited_credits"] or row["is_admin"]):
        raise SeedAdminUser(str(user))
    async with pool.acquire() as conn:  # executeUserTransaction -> getUserConnection
        await conn.fetchval(SEED_SET_USER, str(user))
        if await conn.fetchval(SEED_CHECK_ADMIN_USER, user):  # checkAdminUser
            await conn.execute("SET LOCAL app.is_admin_user = 'true'")
        async with conn.transaction():
            return await _charge(conn, user, claude_cost, description)


async def one_tx_deduct_credits(
    pool: Any, user: uuid.UUID, claude_cost: Decimal, description: str
) -> Any:
    """The same deduction as one transaction: BEGIN, admin check, lock, UPDATE, INSERT,
    COMMIT (6 round trips, one checkout)."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(ONE_TX_CHECK_ADMIN, user)
        if row is None or row["is_admin"]:
            raise SeedAdminUser(str(user))
        return await _charge(conn, user, claude_cost, description)


async def _no_reset(conn: Any) -> None:
    return None


async def seed_pool(dsn: str, size: int) -> Any:
    return await asyncpg.create_pool(dsn, min_size=size, max_size=size, reset=_no_reset)


async def seed_run(
    pool: Any,
    users: list[uuid.UUID],
    callers: int,
    seconds: float,
    cost: Decimal,
    *,
    one_transaction: bool = False,
) -> float:
    deduct = one_tx_deduct_credits if one_transaction else seed_deduct_credits
    done = 0
    stop = time.perf_counter() + seconds

    async def caller(n: int) -> None:
        nonlocal done
        rng = random.Random(n)
        while time.perf_counter() < stop:
            await deduct(pool, rng.choice(users), cost, "bench")
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    return done / (time.perf_counter() - started)
