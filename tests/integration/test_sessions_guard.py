"""What tenant code cannot do to a session behind the DAO's back (raw SQL as keen_app)."""

from __future__ import annotations

from decimal import Decimal
from typing import TypeAlias

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from keen_stream.dal.models.sessions import SessionCompletion, SessionCreate
from keen_stream.errors import InsufficientPrivileges, KeenError

Owner: TypeAlias = asyncpg.Connection


async def _session(db: KeenDatabase, user: User, handle: str, parent: str | None = None):
    return await db.sessions.create_session(
        user.id,
        SessionCreate(
            session_handle=handle,
            vision="v",
            working_directory="/w",
            git_branch="main",
            parent_session_handle=parent,
        ),
    )


@pytest.mark.parametrize(
    "costs",
    [
        "claude_cost_usd = 1000, keen_cost_credits = 0",
        "claude_cost_usd = 0, keen_cost_credits = 999999",
    ],
)
async def test_ending_a_session_with_costs_the_ledger_did_not_charge_is_refused(
    db: KeenDatabase, owner_conn: Owner, alice: User, costs: str
) -> None:
    session = await _session(db, alice, "raw-end")
    with pytest.raises(InsufficientPrivileges, match="ledger"):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(
                f"UPDATE agent_sessions SET execution_status = 'completed', success = true,"
                f" end_time = now(), {costs} WHERE id = $1",
                session.id,
            )
    row = await owner_conn.fetchrow("SELECT * FROM agent_sessions WHERE id = $1", session.id)
    assert row["execution_status"] == "running"
    assert row["keen_cost_credits"] == 0


async def test_the_dao_end_still_records_the_ledger_charge(
    db: KeenDatabase, owner_conn: Owner, alice: User
) -> None:
    await db.billing.purchase(alice.id, Decimal("100"), description="top-up")
    await _session(db, alice, "dao-end")
    ended = await db.sessions.complete_session(
        alice.id, "dao-end", SessionCompletion(success=True, claude_cost_usd=Decimal("2.000000"))
    )
    assert ended.keen_cost_credits == Decimal("10.000000")
    assert ended.claude_cost_usd == Decimal("2.000000")


async def test_last_activity_cannot_be_pushed_into_the_future(
    db: KeenDatabase, owner_conn: Owner, alice: User
) -> None:
    session = await _session(db, alice, "immortal")
    async with db.user_transaction(alice.id) as conn:
        await conn.execute(
            "UPDATE agent_sessions SET last_activity_at = '2999-01-01' WHERE id = $1", session.id
        )
    in_future = await owner_conn.fetchval(
        "SELECT last_activity_at > now() + interval '1 minute' FROM agent_sessions WHERE id = $1",
        session.id,
    )
    assert in_future is False


async def test_budget_can_never_sit_below_what_was_used(
    db: KeenDatabase, owner_conn: Owner, alice: User
) -> None:
    session = await _session(db, alice, "budgeted")
    await db.sessions.set_budget(alice.id, "budgeted", Decimal("10"))
    await owner_conn.execute("UPDATE agent_sessions SET budget_used = 8 WHERE id = $1", session.id)
    with pytest.raises(KeenError):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(
                "UPDATE agent_sessions SET credit_budget = 5 WHERE id = $1", session.id
            )
    with pytest.raises(asyncpg.CheckViolationError):
        await owner_conn.execute(
            "UPDATE agent_sessions SET budget_used = 11 WHERE id = $1", session.id
        )
    assert await owner_conn.fetchval(
        "SELECT credit_budget FROM agent_sessions WHERE id = $1", session.id
    ) == Decimal("10.000000")
