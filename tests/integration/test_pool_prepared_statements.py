"""Prepared statements are session state too, and the reset keeps them (it must keep asyncpg's).

``RESET_SESSION`` leaves out ``DEALLOCATE ALL`` so that asyncpg's statement cache survives.
asyncpg runs a cached query by its statement *name*. ``DEALLOCATE`` and ``PREPARE`` need no
privilege at all, so SQL in one tenant's transaction, as ``keen_app`` (no ``RESET ROLE``), can
put its own statement under the name of one the DAL prepared: the next borrower of the
connection then runs it in its own context. This is the case the docs' "hard boundary" (a
login role of its own for code that runs tenant SQL, docs/schema.md) does not cover either:
the tenants of that pool run each other's statements. The reset now refuses a session with
SQL-level prepared statements, and the connection is closed instead of pooled.
"""

from __future__ import annotations

import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.users import SQL as USER_SQL
from keen_stream.errors import DatabaseError, KeenError
from tests.integration.test_pool_hygiene import single

__all__ = ["single"]  # the fixture, shared with the other pool tests


async def test_a_tenant_cannot_plant_a_statement_the_next_borrower_runs(
    single: KeenDatabase, alice: User, bob: User, owner_conn
) -> None:
    await single.users.get(bob.id)  # the DAL's statement is now prepared on the one connection
    async with single.user_transaction(alice.id) as conn:
        assert await conn.fetchval("SELECT current_user") == "keen_app"
        name = await conn.fetchval(
            "SELECT name FROM pg_prepared_statements WHERE statement = $1", USER_SQL["get"]
        )
        assert name is not None
        planted = USER_SQL["get"].replace(
            "SELECT",
            "WITH planted AS (UPDATE users SET display_name = 'written by alice'"
            " WHERE id = $1 RETURNING id) SELECT",
            1,
        )
        await conn.execute(f'DEALLOCATE "{name}"')
        await conn.execute(f'PREPARE "{name}"(uuid) AS {planted}')
    seen = await single.users.get(bob.id)  # bob's own call, in bob's context
    assert seen.id == bob.id
    assert (
        await owner_conn.fetchval("SELECT display_name FROM users WHERE id = $1", bob.id)
        != "written by alice"
    )


async def test_a_statement_a_tenant_deallocated_costs_one_retryable_call_not_the_connection(
    single: KeenDatabase, alice: User, bob: User
) -> None:
    """DEALLOCATE alone leaves nothing to run: the next use fails (26000), retryable, and that
    connection is closed, so the retry, and every later borrower, works."""
    await single.users.get(bob.id)
    async with single.user_transaction(alice.id) as conn:
        name = await conn.fetchval(
            "SELECT name FROM pg_prepared_statements WHERE statement = $1", USER_SQL["get"]
        )
        await conn.execute(f'DEALLOCATE "{name}"')
    with pytest.raises(DatabaseError) as raised:
        await single.users.get(bob.id)
    assert raised.value.retryable
    assert (await single.users.get(bob.id)).id == bob.id


async def _pid(db: KeenDatabase) -> int:
    async with db.pool.acquire() as conn:
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
        return pid


async def test_a_statement_prepared_in_a_rolled_back_savepoint_is_caught_too(
    single: KeenDatabase, alice: User
) -> None:
    before = await _pid(single)
    async with single.user_transaction(alice.id) as conn:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute("PREPARE planted AS SELECT 1")
                raise RuntimeError("roll back the savepoint")  # PREPARE is not transactional
    assert await _pid(single) != before


async def test_a_commit_that_fails_is_the_callers_failure_whatever_it_raises(
    single: KeenDatabase, alice: User, owner_conn
) -> None:
    """The reset's check answers in its command status, never by raising: an error from the
    COMMIT (here a deferred trigger's, with the SQLSTATE the check once used) is never taken
    for the check's and swallowed."""
    with pytest.raises(KeenError):
        async with single.user_transaction(alice.id) as conn:
            await conn.execute(
                "UPDATE users SET display_name = 'committed?' WHERE id = $1", alice.id
            )
            await conn.execute("RESET ROLE")  # the login role, to make a temp trigger
            await conn.execute("CREATE TEMP TABLE t (x int)")
            await conn.execute(
                "CREATE FUNCTION pg_temp.boom() RETURNS trigger LANGUAGE plpgsql AS"
                " $$BEGIN RAISE EXCEPTION 'at commit' USING ERRCODE = 'KS503'; END$$"
            )
            await conn.execute(
                "CREATE CONSTRAINT TRIGGER boom AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED"
                " FOR EACH ROW EXECUTE FUNCTION pg_temp.boom()"
            )
            await conn.execute("INSERT INTO t VALUES (1)")
    name = await owner_conn.fetchval("SELECT display_name FROM users WHERE id = $1", alice.id)
    assert name != "committed?"


async def test_health_recovers_from_a_statement_deallocated_under_it(
    single: KeenDatabase, alice: User
) -> None:
    assert (await single.health())["ok"]
    async with single.user_transaction(alice.id) as conn:
        for row in await conn.fetch(
            "SELECT name FROM pg_prepared_statements WHERE statement LIKE '%server_version%'"
        ):
            await conn.execute(f'DEALLOCATE "{row["name"]}"')
    first = await single.health()  # may fail once (26000): that connection is then closed
    assert first["ok"] or "InvalidSQLStatementName" in first["error"] or "26000" in first["error"]
    assert all([(await single.health())["ok"] for _ in range(3)])
