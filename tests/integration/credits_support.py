"""Helpers shared by the credit-ledger tests (tests/integration/test_credits*.py)."""

from __future__ import annotations

import itertools
import uuid
from decimal import Decimal
from typing import Any

import asyncpg

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User

_handles = itertools.count()

# Everything a money call could write: "nothing written" means none of this changed.
LEDGER_STATE = """
    SELECT (SELECT count(*) FROM credit_transactions) AS transactions,
           (SELECT count(*) FROM credit_holds) AS holds,
           (SELECT count(*) FROM credit_auto_recharge_requests) AS recharge_requests,
           (SELECT coalesce(sum(current_balance), 0) FROM credit_accounts) AS balances,
           (SELECT coalesce(sum(held_amount), 0) FROM credit_accounts) AS held,
           (SELECT coalesce(sum(lifetime_spent), 0) FROM credit_accounts) AS spent,
           (SELECT coalesce(sum(last_sequence), 0) FROM credit_accounts) AS sequences,
           (SELECT coalesce(sum(budget_used), 0) FROM agent_sessions) AS budgets_used
"""


async def ledger_state(owner_conn: asyncpg.Connection) -> dict[str, Any]:
    return dict(await owner_conn.fetchrow(LEDGER_STATE))


async def fund(db: KeenDatabase, user: User, amount: str) -> None:
    """A paid purchase, as the payment webhook records it (the billing context)."""
    await db.billing.purchase(user.id, Decimal(amount), description="test funds")


async def make_session(
    owner_conn: asyncpg.Connection,
    user: User,
    *,
    parent: uuid.UUID | None = None,
    budget: str | None = None,
    handle: str | None = None,
) -> asyncpg.Record:
    """An agent_sessions row (the sessions migration derives root/depth on insert)."""
    handle = handle or f"sess_{next(_handles)}_{uuid.uuid4().hex[:6]}"
    return await owner_conn.fetchrow(
        """
        INSERT INTO agent_sessions (user_id, session_id, parent_session_id, git_branch, vision,
                                    working_directory, credit_budget)
        VALUES ($1, $2, $3, 'main', 'test', '/tmp', $4::numeric)
        RETURNING id, session_id, root_session_id, credit_budget, budget_used""",
        user.id,
        handle,
        parent,
        budget,
    )


async def budget_used(owner_conn: asyncpg.Connection, session_id: uuid.UUID) -> Decimal:
    value = await owner_conn.fetchval(
        "SELECT budget_used FROM agent_sessions WHERE id = $1", session_id
    )
    return Decimal(value)


async def account(owner_conn: asyncpg.Connection, user: User) -> asyncpg.Record:
    return await owner_conn.fetchrow("SELECT * FROM credit_accounts WHERE user_id = $1", user.id)
