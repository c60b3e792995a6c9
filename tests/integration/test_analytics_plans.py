"""The analytics' hot queries stay on their indexes.

The database gets the benchmark's data shape at 1% (load_tests/analytics_bench.py: 100 users,
~10,000 sessions and 50,000 ledger rows over 30 days, appended in time order as in production,
then VACUUM ANALYZE), and the planner is asked, with its default settings (sequential scans
allowed), for the plans of the statements that run per call. At this size reading a whole table
is already several times dearer than an hour's rows through an index, so a Seq Scan on
agent_sessions or credit_transactions is a real regression, not an artefact of a tiny table.

SQL-language functions plan their statements with the arguments as parameters (a generic plan),
so the function bodies are prepared as such (``plan_cache_mode = force_generic_plan``).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import asyncpg
import pytest

from keen_stream.dal.analytics import SQL
from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.users import upsert_super_admin
from keen_stream.settings import with_database
from load_tests.analytics_bench import Progress, generate
from tests.conftest import ADMIN_EMAIL, PASSWORD, copy_template, make_settings

BIG = ("agent_sessions", "credit_transactions")


@pytest.fixture(scope="module")
async def shaped_dsn(pg_admin_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """One database with the benchmark's shape at 1%, rolled up, for the whole module."""
    name = f"keen_plans_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    await copy_template(pg_admin_dsn, name, urlsplit(template_dsn).path.lstrip("/"))
    dsn = with_database(pg_admin_dsn, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await generate(conn, 0.01, Progress())
        finally:
            await conn.close()
        db = await KeenDatabase.connect(settings=make_settings(dsn), migrate=False)
        try:
            # The month's hours (users go back 60 days: rolling those too only costs time).
            await db.analytics.rollup(since=(datetime.now(UTC) - timedelta(days=31)).date())
        finally:
            await db.close()
        yield dsn
    finally:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def conn(shaped_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """The owner (superuser): for EXPLAIN of the functions' bodies (they run as keen_system,
    which bypasses RLS, so the owner plans them as they run)."""
    connection = await asyncpg.connect(shaped_dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def shaped_db(shaped_dsn: str) -> AsyncIterator[KeenDatabase]:
    database = await KeenDatabase.connect(settings=make_settings(shaped_dsn), migrate=False)
    try:
        yield database
    finally:
        await database.close()


def _literal(value: object) -> str:
    return "NULL" if value is None else f"'{value.isoformat()}'"  # type: ignore[attr-defined]


async def generic_plan(conn: asyncpg.Connection, function: str, *args: object) -> str:
    """The generic plan of ``function``'s body (its arguments as $1, $2, ...)."""
    row = await conn.fetchrow(
        "SELECT prosrc, proargnames FROM pg_proc WHERE proname = $1", function
    )
    body = row["prosrc"]
    for i, name in enumerate(row["proargnames"][: len(args)], start=1):
        body = re.sub(rf"\b{name}\b", f"${i}", body)
    types = ", ".join("timestamptz" for _ in args)
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    try:
        await conn.execute(f"PREPARE plan_probe({types}) AS {body}")
        values = ", ".join(_literal(a) for a in args)
        rows = await conn.fetch(f"EXPLAIN EXECUTE plan_probe({values})")
        return "\n".join(r[0] for r in rows)
    finally:
        await conn.execute("DEALLOCATE plan_probe")
        await conn.execute("RESET plan_cache_mode")


def no_seq_scan_on_big_tables(plan: str) -> None:
    for table in BIG:
        assert f"Seq Scan on {table}" not in plan, plan


async def test_an_hours_live_read_uses_the_time_indexes(conn: asyncpg.Connection) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
    plan = await generic_plan(conn, "keen_analytics_parts", hour, hour + timedelta(hours=1))
    no_seq_scan_on_big_tables(plan)
    assert "idx_agent_sessions_start" in plan, plan
    # The ledger has no btree on created_at (every index is paid by each deduction): its BRIN.
    assert "Bitmap Index Scan on idx_credit_transactions_created_at" in plan, plan


async def test_a_window_reads_the_stored_hours_and_no_big_table(conn: asyncpg.Connection) -> None:
    now = datetime.now(UTC)
    for days in (1, 7, 30):
        plan = await generic_plan(conn, "keen_analytics_rolled", now - timedelta(days=days), now)
        no_seq_scan_on_big_tables(plan)
        assert "analytics_hourly" in plan, plan
    plan = await generic_plan(conn, "keen_analytics_hours_to_roll", None)
    no_seq_scan_on_big_tables(plan)


async def test_user_usage_reads_only_the_users_rows_by_index(
    shaped_db: KeenDatabase, conn: asyncpg.Connection
) -> None:
    db = shaped_db
    user = str(await conn.fetchval("SELECT id FROM users WHERE username = 'ab_50'"))
    tz, today = "UTC", datetime.now(UTC).date()
    async with db.user_transaction(user) as tenant:
        for days in (1, 30):
            rows = await tenant.fetch(
                f"EXPLAIN {SQL['usage']}", user, tz, today - timedelta(days=days - 1), today
            )
            plan = "\n".join(r[0] for r in rows)
            no_seq_scan_on_big_tables(plan)
            assert "idx_agent_sessions_user_start" in plan, plan
            assert "idx_credit_transactions_sequence" in plan, plan
    usage = await db.analytics.get_user_usage(user, "month")
    assert usage.total_sessions > 0 and usage.total_credits_used > 0


async def test_the_admin_call_is_exact_on_the_benchmark_shape(shaped_db: KeenDatabase) -> None:
    db = shaped_db
    admin = await upsert_super_admin(db, ADMIN_EMAIL, PASSWORD)
    async with db.system_transaction() as conn:
        end = await conn.fetchval("SELECT now()")
        for days in (1, 7, 30):
            start = end - timedelta(days=days)
            live = await conn.fetchrow("SELECT * FROM keen_analytics_window($1, $2)", start, end)
            rolled = await conn.fetchrow("SELECT * FROM keen_analytics_rolled($1, $2)", start, end)
            assert dict(rolled) == dict(live)
            assert live["total_sessions"] > 0 and live["credits_used"] > 0
    month = await db.analytics.get_admin_analytics("month", actor_id=admin.id)
    assert month.session_metrics.total_sessions >= 9_000
