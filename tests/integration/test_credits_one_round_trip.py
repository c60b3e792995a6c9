"""The public deduction is one statement in its own implicit transaction (``db.user_call``).

The claims this rests on, each checked against real PostgreSQL: the acting user set by the
statement is what the function authorizes by (without it the function refuses), the setting
ends with the statement (nothing reaches the next statement or the next pool borrower, also
after a refusal), and the DAL sends exactly that one statement.
"""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import pytest

from keen_stream.dal.credits import SQL
from keen_stream.dal.database import USER_CALL_ARG, KeenDatabase
from keen_stream.dal.models import User
from keen_stream.errors import InsufficientCredits
from tests.conftest import make_settings, statements_sent
from tests.integration.credits_support import account, fund, ledger_state

D = Decimal
CONTEXT = "SELECT current_setting('app.current_user_id', true) AS user_setting, current_user"


async def test_a_deduction_sends_one_statement(fresh_dsn: str, db: KeenDatabase, alice: User):
    await fund(db, alice, "10")
    sent, tx = await statements_sent(
        fresh_dsn, lambda single: single.credits.deduct_credits(alice.id, D("1"), None, "one trip")
    )
    assert sent == [SQL["deduct_call"]]  # no BEGIN, no context statement, no COMMIT
    assert (tx.amount, tx.balance_after, tx.sequence_number) == (D("-5"), D("5"), 2)


async def test_the_function_takes_the_acting_user_from_the_statement(
    fresh_dsn: str, db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
):
    await fund(db, alice, "10")
    before = await ledger_state(owner_conn)
    conn = await asyncpg.connect(fresh_dsn)
    try:
        # The same call with the user as a plain argument and no context: refused, as for a
        # caller who is nobody. So the successful call below got its user from the statement.
        without_context = SQL["deduct_call"].replace(USER_CALL_ARG, "$1::uuid")
        with pytest.raises(asyncpg.PostgresError) as refused:
            await conn.fetchrow(without_context, str(alice.id), D("1"), None, "x", None)
        assert refused.value.sqlstate == "KS404"
        assert await ledger_state(owner_conn) == before

        row = await conn.fetchrow(
            SQL["deduct_call"], str(alice.id), D("1"), None, "with context", None
        )
        assert (row["user_id"], row["amount"], row["balance_after"]) == (alice.id, D("-5"), D("5"))
    finally:
        await conn.close()


async def test_the_acting_user_ends_with_the_statement(
    fresh_dsn: str, db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
):
    await fund(db, alice, "10")
    conn = await asyncpg.connect(fresh_dsn)
    try:
        login = await conn.fetchval("SELECT current_user")
        await conn.fetchrow(SQL["deduct_call"], str(alice.id), D("1"), None, "ok", None)
        after = await conn.fetchrow(CONTEXT)
        assert (after["user_setting"] or "", after["current_user"]) == ("", login)

        # A refused call (nothing written) leaves nothing behind either.
        with pytest.raises(asyncpg.PostgresError) as refused:
            await conn.fetchrow(SQL["deduct_call"], str(alice.id), D("100"), None, "no", None)
        assert refused.value.sqlstate == "KS402"
        after = await conn.fetchrow(CONTEXT)
        assert (after["user_setting"] or "", after["current_user"]) == ("", login)
        assert not conn.is_in_transaction()
        assert (await account(owner_conn, alice))["current_balance"] == D("5")
    finally:
        await conn.close()


async def test_nothing_reaches_the_next_borrower_of_the_connection(
    fresh_dsn: str, db: KeenDatabase, alice: User
):
    await fund(db, alice, "10")
    single = await KeenDatabase.connect(
        settings=make_settings(fresh_dsn, pool_min_size=1, pool_max_size=1), migrate=False
    )
    try:
        await single.credits.deduct_credits(alice.id, D("1"), None, "ok")
        with pytest.raises(InsufficientCredits):
            await single.credits.deduct_credits(alice.id, D("100"), None, "refused")
        async with single.pool.acquire() as conn:  # the only connection: the one just used
            after = await conn.fetchrow(CONTEXT)
        assert (after["user_setting"] or "") == ""
        # An anonymous tenant transaction on it sees no account at all.
        async with single.anonymous_transaction() as anonymous:
            assert await anonymous.fetchval("SELECT count(*) FROM credit_accounts") == 0
    finally:
        await single.close()


async def test_user_call_refuses_a_query_without_the_acting_user(db: KeenDatabase, alice: User):
    with pytest.raises(ValueError):
        await db.user_call(alice.id, "SELECT 1 WHERE $1::text IS NOT NULL")
