"""A pooled connection hands nothing from one borrower to the next.

Each test uses a pool of one connection, so the next borrower is the very same backend (the pid
is checked). "Nothing" is read off the session itself: roles, settings, temporary objects,
advisory locks, LISTEN registrations, open cursors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from keen_stream.dal.database import TENANT_CALL_ARGS, USER_CALL_ARG, KeenDatabase
from keen_stream.dal.models import User
from keen_stream.settings import Settings
from tests.conftest import statements_sent

SESSION_STATE = """
    SELECT pg_backend_pid() AS pid, current_user AS role, session_user AS login,
           current_setting('role') AS role_setting,
           coalesce(current_setting('app.current_user_id', true), '') AS acting_user,
           current_setting('search_path') AS search_path,
           current_setting('statement_timeout') AS statement_timeout,
           current_setting('keen.stream_signal', true) AS stream_signal,
           (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())
               AS temp_tables,
           (SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema())
               AS temp_functions,
           (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                                            AND pid = pg_backend_pid()) AS advisory_locks,
           (SELECT count(*) FROM pg_listening_channels()) AS channels,
           (SELECT count(*) FROM pg_cursors) AS cursors
"""

# What SQL in a tenant transaction can leave on its session. It starts by stepping back to
# the login role (RESET ROLE), which tenant SQL can always do: the role switch guards against
# mistakes, not against hostile SQL (docs/schema.md).
LEFTOVERS = [
    "RESET ROLE",
    "CREATE TEMP TABLE leftover_table (x int)",
    "CREATE FUNCTION pg_temp.leftover_function() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "SELECT set_config('app.current_user_id', '00000000-0000-0000-0000-000000000001', false)",
    "SET search_path = pg_temp, public",
    "SET statement_timeout = 1234",
    "SELECT set_config('keen.stream_signal', 'off', false)",
    "SELECT pg_advisory_lock(424242)",
    "LISTEN leftover_channel",
    "DECLARE leftover_cursor CURSOR WITH HOLD FOR SELECT 1",
    # Last: a session-level SET ROLE, so the next borrower would run as keen_system (BYPASSRLS).
    "SET ROLE keen_system",
]


@pytest.fixture
async def single(settings: Settings) -> AsyncIterator[KeenDatabase]:
    database = await KeenDatabase.connect(
        settings=settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1}),
        migrate=False,
    )
    try:
        yield database
    finally:
        await database.close()


async def _state(db: KeenDatabase) -> dict[str, object]:
    async with db.pool.acquire() as conn:
        return dict(await conn.fetchrow(SESSION_STATE))


async def _leave_everything(conn: asyncpg.Connection) -> None:
    for statement in LEFTOVERS:
        await conn.execute(statement)
    dirty = dict(await conn.fetchrow(SESSION_STATE))
    # The leftovers are really there while the transaction runs.
    assert dirty["role"] == "keen_system" and dirty["temp_tables"] == 1
    assert dirty["advisory_locks"] == 1 and dirty["channels"] == 0  # LISTEN waits for COMMIT


async def test_a_committed_tenant_transaction_hands_nothing_to_the_next_borrower(
    single: KeenDatabase, alice: User
):
    before = await _state(single)
    async with single.user_transaction(alice.id) as conn:
        await _leave_everything(conn)
    after = await _state(single)
    assert after["pid"] == before["pid"]
    assert after == before


async def test_a_failed_tenant_transaction_hands_nothing_to_the_next_borrower(
    single: KeenDatabase, alice: User
):
    before = await _state(single)
    with pytest.raises(ZeroDivisionError):
        async with single.user_transaction(alice.id) as conn:
            await _leave_everything(conn)
            raise ZeroDivisionError  # the caller's own failure: the error path resets too
    assert await _state(single) == before


async def test_the_system_and_anonymous_contexts_hand_nothing_on_either(
    single: KeenDatabase,
):
    before = await _state(single)
    async with single.system_transaction() as conn:
        await _leave_everything(conn)
    assert await _state(single) == before
    async with single.anonymous_transaction() as conn:
        await _leave_everything(conn)
    assert await _state(single) == before


async def test_code_borrowing_the_pool_directly_hands_nothing_on(single: KeenDatabase):
    before = await _state(single)
    async with single.pool.acquire() as conn, conn.transaction():
        await _leave_everything(conn)
    assert await _state(single) == before


async def test_a_session_authorization_change_is_undone_too(single: KeenDatabase, alice: User):
    before = await _state(single)
    async with single.pool.acquire() as conn:
        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = session_user"):
            pytest.skip("SET SESSION AUTHORIZATION needs a superuser login")
    async with single.user_transaction(alice.id) as conn:
        await conn.execute("RESET ROLE")
        await conn.execute("SET SESSION AUTHORIZATION keen_system")
        assert await conn.fetchval("SELECT session_user") == "keen_system"
    assert await _state(single) == before


async def test_the_next_one_statement_call_runs_clean(single: KeenDatabase, alice: User):
    """The hot paths send no reset of their own: they rely on every borrower before them."""
    before = await _state(single)
    async with single.user_transaction(alice.id) as conn:
        await _leave_everything(conn)
    row = await single.user_call(
        alice.id,
        f"SELECT {USER_CALL_ARG} AS acting, current_user AS role,"
        " current_setting('search_path') AS search_path,"
        " (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) AS temp",
    )
    assert row is not None
    assert row["acting"] == alice.id and row["role"] != "keen_system" and row["temp"] == 0
    assert row["search_path"] == before["search_path"]
    row = await single.tenant_call(alice.id, f"SELECT {TENANT_CALL_ARGS}, current_user AS role")
    assert row is not None and row["role"] == "keen_app"


async def test_a_tenant_transaction_resets_in_its_commit_message(fresh_dsn: str, alice: User):
    """The reset costs no round trip: it travels with the COMMIT, in one message."""
    from keen_stream.dal.database import RESET_SESSION

    async def read(single: KeenDatabase) -> int:
        async with single.user_transaction(alice.id) as conn:
            return int(await conn.fetchval("SELECT 1"))

    sent, _ = await statements_sent(fresh_dsn, read)
    assert sent[0].startswith("BEGIN")
    assert sent[2:] == ["SELECT 1", f"COMMIT; {RESET_SESSION}"]

    async def fail(single: KeenDatabase) -> None:
        with pytest.raises(ZeroDivisionError):
            async with single.user_transaction(alice.id) as conn:
                await conn.fetchval("SELECT 1")
                raise ZeroDivisionError

    sent, _ = await statements_sent(fresh_dsn, fail)
    assert sent[2:] == ["SELECT 1", f"ROLLBACK; {RESET_SESSION}"]


async def test_savepoints_still_nest_inside_a_tenant_transaction(
    db: KeenDatabase, alice: User, owner_conn
):
    async with db.user_transaction(alice.id) as conn:
        await conn.execute("UPDATE users SET display_name = 'kept' WHERE id = $1", alice.id)
        with pytest.raises(asyncpg.PostgresError):
            async with conn.transaction():
                await conn.execute(
                    "UPDATE users SET display_name = 'undone' WHERE id = $1", alice.id
                )
                await conn.execute("SELECT 1 / 0")
        assert (
            await conn.fetchval("SELECT display_name FROM users WHERE id = $1", alice.id) == "kept"
        )
    assert (
        await owner_conn.fetchval("SELECT display_name FROM users WHERE id = $1", alice.id)
        == "kept"
    )
