"""The hot session queries stay on their indexes (pgqueuer's test_query_plan_regression style).

The table gets a realistic shape (many users, trees, mostly ended sessions) and fresh
statistics, then the planner is asked, with its default settings, for the plan of the exact SQL
the DAO runs, as keen_app under RLS. Both a custom plan (the parameter values known) and the
generic plan a long-lived prepared statement may switch to are checked.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.sessions import SQL
from keen_stream.dal.users import upsert_super_admin
from keen_stream.settings import with_database
from tests.conftest import ADMIN_EMAIL, PASSWORD, copy_template, make_settings

USERS = 40
ROOTS_PER_USER = 60  # each root gets 2 children and 2 grandchildren: 5 sessions per tree


async def populate(owner_conn: asyncpg.Connection) -> dict[str, Any]:
    await owner_conn.execute(
        """INSERT INTO users (email, username, password_hash)
           SELECT 'plan' || g || '@example.com', 'plan_' || g, 'x'
             FROM generate_series(1, $1) g""",
        USERS,
    )
    await owner_conn.execute(
        """INSERT INTO agent_sessions (user_id, session_id, git_branch, vision,
                                       working_directory, start_time)
           SELECT u.id, u.username || '-r' || g, 'main', 'v', '/w',
                  now() - make_interval(mins => g * 7)
             FROM users u CROSS JOIN generate_series(1, $1) g""",
        ROOTS_PER_USER,
    )
    for level, parent_suffix in ((1, "-r"), (2, "-c")):
        await owner_conn.execute(
            f"""INSERT INTO agent_sessions (user_id, session_id, parent_session_id, git_branch,
                                           vision, working_directory, start_time)
               SELECT p.user_id, replace(p.session_id, '{parent_suffix}', '-c') || '.' || k,
                      p.id, 'main', 'v', '/w', p.start_time + make_interval(secs => k)
                 FROM agent_sessions p CROSS JOIN generate_series(1, 2 - {level - 1}) k
                WHERE p.session_depth = {level - 1}"""
        )
    # Most sessions have ended; a few are running, some of those idle.
    await owner_conn.execute(
        """UPDATE agent_sessions SET execution_status = 'completed', success = true,
                  end_time = start_time + interval '5 minutes'
            WHERE session_id NOT LIKE '%-r1' AND session_id NOT LIKE '%-r1.%'
              AND session_id NOT LIKE '%-c1.%'"""
    )
    await owner_conn.execute("ANALYZE agent_sessions")
    await owner_conn.execute("ANALYZE users")
    total = await owner_conn.fetchval("SELECT count(*) FROM agent_sessions")
    running = await owner_conn.fetchval(
        "SELECT count(*) FROM agent_sessions WHERE execution_status = 'running'"
    )
    user = await owner_conn.fetchrow("SELECT id, username FROM users WHERE username = 'plan_7'")
    cursor = await owner_conn.fetchrow(
        "SELECT start_time, id FROM agent_sessions WHERE session_id = 'plan_7-r30'"
    )
    return {
        "total": total,
        "running": running,
        "user_id": user["id"],
        "root": "plan_7-r5",
        "cursor": cursor,
    }


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


async def explain(
    db: KeenDatabase, user_id: uuid.UUID, sql: str, *args: Any, generic: bool = False
) -> list[dict[str, Any]]:
    async with db.user_transaction(user_id) as conn:
        if generic:
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        [doc] = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    return list(nodes(doc["Plan"]))


def on_sessions(plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in plan if n.get("Relation Name") == "agent_sessions"]


def assert_indexed(plan: list[dict[str, Any]], *indexes: str) -> None:
    scans = on_sessions(plan)
    assert scans, plan
    kinds = {n["Node Type"] for n in scans}
    assert "Seq Scan" not in kinds, f"sequential scan on agent_sessions: {kinds}"
    # Bitmap Index Scan nodes name the index but not the table.
    used = {n.get("Index Name") for n in plan} - {None}
    for index in indexes:
        assert index in used, f"{index} not used; scans use {used}"


@pytest.fixture(scope="module")
async def plan_db(pg_admin_dsn: str, template_dsn: str) -> AsyncIterator[KeenDatabase]:
    """One populated database for the whole module: filling it is the slow part."""
    template = urlsplit(template_dsn).path.lstrip("/")
    name = f"keen_plans_{os.getpid()}"
    admin_conn = await asyncpg.connect(pg_admin_dsn)
    try:
        await copy_template(pg_admin_dsn, name, template)
        dsn = with_database(pg_admin_dsn, name)
        owner = await asyncpg.connect(dsn)
        try:
            info = await populate(owner)
        finally:
            await owner.close()
        async with await KeenDatabase.connect(settings=make_settings(dsn), migrate=False) as db:
            db.plan_info = info  # type: ignore[attr-defined]
            db.plan_admin = await upsert_super_admin(db, ADMIN_EMAIL, PASSWORD)  # type: ignore[attr-defined]
            yield db
    finally:
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


@pytest.fixture
def db(plan_db: KeenDatabase) -> KeenDatabase:
    return plan_db


@pytest.fixture
def shaped(plan_db: KeenDatabase) -> dict[str, Any]:
    return plan_db.plan_info  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def admin(plan_db: KeenDatabase) -> User:
    return plan_db.plan_admin  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("generic", [False, True])
async def test_own_list_pages_walk_the_user_index_without_sorting(
    db: KeenDatabase, shaped: dict[str, Any], generic: bool
) -> None:
    assert shaped["total"] >= USERS * ROOTS_PER_USER * 5
    uid, cursor = shaped["user_id"], shaped["cursor"]
    for args in ((uid, None, None, None, 50), (uid, cursor["start_time"], cursor["id"], None, 50)):
        plan = await explain(db, uid, SQL["list_own"], *args, generic=generic)
        assert_indexed(plan, "idx_agent_sessions_user_start")
        assert "Sort" not in {n["Node Type"] for n in plan}
    # Filtered by status the planner may combine the user index with the running-sessions
    # index and sort the handful of rows left; either way it stays on the user index.
    plan = await explain(db, uid, SQL["list_own"], uid, None, None, "running", 20, generic=generic)
    assert_indexed(plan, "idx_agent_sessions_user_start")


@pytest.mark.parametrize("generic", [False, True])
async def test_admin_list_walks_the_start_time_index(
    db: KeenDatabase, admin: User, shaped: dict[str, Any], generic: bool
) -> None:
    cursor = shaped["cursor"]
    for args in ((None, None, None, 50), (cursor["start_time"], cursor["id"], None, 50)):
        plan = await explain(db, admin.id, SQL["list_all"], *args, generic=generic)
        assert_indexed(plan, "idx_agent_sessions_start")
        assert "Sort" not in {n["Node Type"] for n in plan}


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("query", ["tree", "rollup"])
async def test_tree_queries_follow_the_parent_index(
    db: KeenDatabase, shaped: dict[str, Any], generic: bool, query: str
) -> None:
    plan = await explain(db, shaped["user_id"], SQL[query], shaped["root"], generic=generic)
    assert "Recursive Union" in {n["Node Type"] for n in plan}
    assert_indexed(plan, "agent_sessions_session_id_key", "idx_agent_sessions_parent_session_id")


async def test_handle_lookups_use_the_unique_index(
    db: KeenDatabase, shaped: dict[str, Any]
) -> None:
    assert_indexed(
        await explain(db, shaped["user_id"], SQL["get"], "plan_7-r1"),
        "agent_sessions_session_id_key",
    )


@pytest.mark.parametrize("generic", [False, True])
async def test_progress_updates_through_the_unique_index(
    db: KeenDatabase, shaped: dict[str, Any], generic: bool
) -> None:
    """The progress UPDATE lives in a function (migration 0006), where EXPLAIN cannot see it:
    auto_explain, reporting to the client, shows the plan it actually ran with, as keen_app."""
    conn = await asyncpg.connect(db.dsn)
    plans: list[dict[str, Any]] = []

    def collect(_conn: object, message: Any) -> None:
        text = message.message
        if text.startswith("duration:") and "{" in text:
            plans.append(json.loads(text[text.index("{") :]))

    try:
        await conn.execute("LOAD 'auto_explain'")
        for setting in (
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_nested_statements = on",
            "auto_explain.log_level = notice",
            "auto_explain.log_format = json",
            "client_min_messages = notice",
        ):
            await conn.execute(f"SET {setting}")
        if generic:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.add_log_listener(collect)
        row = await conn.fetchrow(
            SQL["progress"], str(shaped["user_id"]), "plan_7-r1", None, 1, 0, 0, 0, [], [], []
        )
        assert row is not None and row["session_id"] == "plan_7-r1"
        await conn.execute("SELECT 1")  # log listeners run soon after: let them
    finally:
        await conn.close()
    updates = [
        list(nodes(p["Plan"]))
        for p in plans
        if p["Plan"]["Node Type"] == "ModifyTable" and "UPDATE" in p["Query Text"]
    ]
    assert updates, [p["Query Text"] for p in plans]
    assert_indexed(updates[0], "agent_sessions_session_id_key")


async def test_sweep_reads_only_running_sessions(db: KeenDatabase, shaped: dict[str, Any]) -> None:
    assert shaped["running"] * 10 < shaped["total"]
    async with db.system_transaction() as conn:
        [doc] = await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) {SQL['sweep']}", timedelta(minutes=30), "idle", 1000
        )
    plan = list(nodes(doc["Plan"]))
    assert "idx_agent_sessions_running_activity" in {n.get("Index Name") for n in plan}
    assert "Seq Scan" not in {n["Node Type"] for n in on_sessions(plan)}
