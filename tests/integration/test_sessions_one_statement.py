"""A progress report is one statement run as the tenant (``db.tenant_call``, migration 0006).

Why it matters: the stream releases an event only after every older transaction has ended, so
a report must not hold its transaction open while the client reads the result and sends COMMIT.
The claims, each against real PostgreSQL: the DAL sends exactly one statement; the function's
body runs as ``keen_app`` under RLS (without the role switch it refuses and writes nothing);
the role and the user end with the statement, after a refusal too, and never reach the next
borrower of the pooled connection.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from keen_stream.dal.database import TENANT_CALL_ARGS, KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.sessions import SQL
from keen_stream.errors import NotFound, SessionAlreadyEnded
from tests.conftest import make_settings, statements_sent
from tests.integration.credits_support import fund

CONTEXT = "SELECT current_setting('app.current_user_id', true) AS user_setting, current_user"


async def context_of(conn: asyncpg.Connection) -> tuple[str, str]:
    """The acting user ('' when none) and the role the connection's next statement runs as."""
    row = await conn.fetchrow(CONTEXT)
    return row["user_setting"] or "", row["current_user"]


COUNTERS = "SELECT iteration_count FROM agent_sessions WHERE session_id = $1"
NO_FILES: list[str] = []


async def start(db: KeenDatabase, user: User, handle: str) -> None:
    await db.sessions.create_session(
        user.id, session_handle=handle, vision="v", working_directory="/w", git_branch="main"
    )


def progress_args(user: User, handle: str) -> tuple[object, ...]:
    return (str(user.id), handle, None, 1, 0, 0, 0, NO_FILES, NO_FILES, NO_FILES)


async def test_a_progress_report_sends_one_statement(
    fresh_dsn: str, db: KeenDatabase, alice: User
) -> None:
    await start(db, alice, "one")
    sent, session = await statements_sent(
        fresh_dsn, lambda single: single.sessions.update_progress(alice.id, "one", iterations=2)
    )
    assert sent == [SQL["progress"]]  # no BEGIN, no context statement, no COMMIT
    assert session.iteration_count == 2


@pytest.mark.parametrize("role", [None, "keen_system"])
async def test_the_function_refuses_to_run_as_anyone_but_the_tenant(
    fresh_dsn: str,
    db: KeenDatabase,
    alice: User,
    owner_conn: asyncpg.Connection,
    role: str | None,
) -> None:
    """As the login role (here a superuser) or the system role, RLS would not filter the
    UPDATE: refused before it runs, nothing written."""
    await start(db, alice, "guarded")
    conn = await asyncpg.connect(fresh_dsn)
    try:
        if role is not None:
            await conn.execute(f"SET ROLE {role}")
        without_switch = SQL["progress"].replace(
            TENANT_CALL_ARGS, "'none', set_config('app.current_user_id', $1, true)::uuid"
        )
        with pytest.raises(asyncpg.PostgresError) as refused:
            await conn.fetchrow(without_switch, *progress_args(alice, "guarded"))
        assert refused.value.sqlstate == "42501"
        assert await owner_conn.fetchval(COUNTERS, "guarded") == 0
    finally:
        await conn.close()


async def test_the_body_runs_under_rls_as_the_acting_user(
    fresh_dsn: str, db: KeenDatabase, alice: User, bob: User, owner_conn: asyncpg.Connection
) -> None:
    """The statement names alice's session but acts as bob: RLS hides the row from bob, even
    though the function would also filter by the user id it is given."""
    await start(db, alice, "alices")
    conn = await asyncpg.connect(fresh_dsn)
    try:
        # Acting user ($11, bob) and the p_user argument ($1, alice) apart.
        as_bob_for_alice = (
            "SELECT * FROM keen_session_progress(set_config('role', 'keen_app', true)"
            " || set_config('app.current_user_id', $11, true), $1::uuid,"
            " $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        )
        row = await conn.fetchrow(as_bob_for_alice, *progress_args(alice, "alices"), str(bob.id))
        assert row is None
        assert await owner_conn.fetchval(COUNTERS, "alices") == 0
    finally:
        await conn.close()


async def test_the_tenant_context_ends_with_the_statement(
    fresh_dsn: str, db: KeenDatabase, alice: User
) -> None:
    await start(db, alice, "ctx")
    conn = await asyncpg.connect(fresh_dsn)
    try:
        login = await conn.fetchval("SELECT current_user")
        row = await conn.fetchrow(SQL["progress"], *progress_args(alice, "ctx"))
        assert row["iteration_count"] == 1
        assert await context_of(conn) == ("", login)

        await db.sessions.fail_session(alice.id, "ctx", error_message="stop")
        with pytest.raises(asyncpg.PostgresError) as refused:  # the tenant-only guard ran
            await conn.fetchrow(SQL["progress"], *progress_args(alice, "ctx"))
        assert refused.value.sqlstate == "KS442"
        assert await context_of(conn) == ("", login)
        assert not conn.is_in_transaction()
    finally:
        await conn.close()


async def test_nothing_reaches_the_next_borrower_of_the_connection(
    fresh_dsn: str, db: KeenDatabase, alice: User
) -> None:
    await start(db, alice, "pooled")
    single = await KeenDatabase.connect(
        settings=make_settings(fresh_dsn, pool_min_size=1, pool_max_size=1), migrate=False
    )
    try:
        await single.sessions.update_progress(alice.id, "pooled", iterations=1)
        with pytest.raises(NotFound):
            await single.sessions.update_progress(alice.id, "no-such-session", iterations=1)
        await single.sessions.fail_session(alice.id, "pooled", error_message="stop")
        with pytest.raises(SessionAlreadyEnded):
            await single.sessions.update_progress(alice.id, "pooled", iterations=1)
        async with single.pool.acquire() as conn:  # the only connection: the one just used
            assert await context_of(conn) == ("", await conn.fetchval("SELECT session_user"))
    finally:
        await single.close()


async def test_tenant_call_refuses_a_query_without_the_tenant_context(
    db: KeenDatabase, alice: User
) -> None:
    with pytest.raises(ValueError):
        await db.tenant_call(alice.id, "SELECT 1 WHERE $1::text IS NOT NULL")


async def test_the_one_statement_calls_work_for_a_login_role_that_is_not_a_superuser(
    fresh_dsn: str, pg_admin_dsn: str, db: KeenDatabase, alice: User
) -> None:
    """EXECUTE on the called function is checked as the login role, before the arguments
    switch roles: a plain login role with (inherited) membership in both roles, as the first
    migration grants it, can make all three kinds of call."""
    role = f"keen_login_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER INHERIT")
    await admin.execute(f"GRANT keen_app, keen_system TO {role}")
    try:
        await start(db, alice, "plain")
        await fund(db, alice, "10")
        parts = urlsplit(fresh_dsn)
        dsn = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
        async with await KeenDatabase.connect(settings=make_settings(dsn), migrate=False) as plain:
            assert await plain.pool.fetchval("SELECT current_user") == role
            session = await plain.sessions.update_progress(alice.id, "plain", iterations=3)
            single = await plain.credits.deduct_credits(alice.id, Decimal("0.1"), None, "one")
            together = await asyncio.gather(
                *(
                    plain.credits.deduct_credits(alice.id, Decimal("0.01"), None, f"b{i}")
                    for i in range(8)
                )
            )
            batches = plain.credits.batch_stats()["batches"]
        assert session.iteration_count == 3
        assert single.amount == Decimal("-0.5")
        assert len(together) == 8 and batches >= 1  # some went through the batch (system_call)
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
