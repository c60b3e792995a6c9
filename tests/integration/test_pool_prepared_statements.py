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
from keen_stream.errors import DatabaseError
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
