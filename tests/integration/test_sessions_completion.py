"""Ending sessions: the charge commits with the end state, exactly once; budgets for trees."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import SessionCompletion, SessionCreate, User
from keen_stream.errors import (
    InsufficientCredits,
    InvalidInput,
    SessionAlreadyEnded,
    SessionBudgetExceeded,
)


def new(session_id: str, parent: str | None = None) -> SessionCreate:
    return SessionCreate(
        session_handle=session_id,
        vision="v",
        working_directory="/tmp/w",
        git_branch="main",
        parent_session_handle=parent,
    )


async def charges(owner_conn: asyncpg.Connection, handle: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await owner_conn.fetch(
        """SELECT t.* FROM credit_transactions t JOIN agent_sessions s ON s.id = t.session_id
            WHERE s.session_id = $1 ORDER BY t.sequence_number""",
        handle,
    )
    return rows


async def row(owner_conn: asyncpg.Connection, handle: str) -> asyncpg.Record:
    return await owner_conn.fetchrow("SELECT * FROM agent_sessions WHERE session_id = $1", handle)


async def balance(owner_conn: asyncpg.Connection, user: User) -> Decimal:
    value: Decimal = await owner_conn.fetchval(
        "SELECT current_balance FROM credit_accounts WHERE user_id = $1", user.id
    )
    return value


async def test_complete_admin_session_lifecycle_with_bypass(
    db: KeenDatabase, admin: User, owner_conn: asyncpg.Connection
) -> None:
    # The seed's "complete admin session lifecycle with bypass", ported.
    session = await db.sessions.create_session(
        admin.id,
        SessionCreate(
            session_handle="admin_session_123",
            vision="Admin test execution",
            working_directory="/tmp/admin_test",
            git_branch="main",
        ),
    )
    assert session.is_admin_session is True
    assert session.bypass_credit_deduction is True

    high_claude_cost = Decimal("50.00")  # $50 of Claude = 250 credits for a paying user
    done = await db.sessions.complete_session(
        admin.id,
        session.session_handle,
        SessionCompletion(
            success=True,
            claude_cost_usd=high_claude_cost,
            files_created=("src/admin_test.ts",),
            completion_report={"summary": "Admin test completed successfully"},
        ),
    )
    assert done.execution_status == "completed" and done.success is True
    assert done.claude_cost_usd == high_claude_cost
    assert done.keen_cost_credits == Decimal(0)
    assert done.files_created == ["src/admin_test.ts"]
    assert done.completion_report == {"summary": "Admin test completed successfully"}
    assert done.end_time is not None

    account = await db.credits.get_balance(admin.id)
    assert account.unlimited is True
    assert account.current == Decimal(0)
    history = await db.credits.get_transaction_history(admin.id)
    bypass = [t for t in history if t.is_admin_bypass]
    assert len(bypass) == 1
    assert bypass[0].claude_cost_usd == high_claude_cost
    assert bypass[0].amount == Decimal(0)
    assert bypass[0].session_id == session.id


async def test_completion_charges_cost_times_markup_with_the_end_state(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.billing.purchase(alice.id, Decimal("100"), description="top-up")
    s = await db.sessions.create_session(alice.id, new("paid"))
    done = await db.sessions.complete_session(
        alice.id, "paid", success=True, claude_cost_usd=Decimal("2.000001")
    )
    assert done.keen_cost_credits == Decimal("10.000005")
    assert await balance(owner_conn, alice) == Decimal("89.999995")
    [charge] = await charges(owner_conn, "paid")
    assert charge["session_id"] == s.id
    assert charge["transaction_type"] == "usage"
    assert charge["amount"] == Decimal("-10.000005")
    assert charge["claude_cost_usd"] == Decimal("2.000001")


async def test_double_completion_charges_once_and_returns_the_stored_result(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.billing.purchase(alice.id, Decimal("100"), description="top-up")
    await db.sessions.create_session(alice.id, new("twice"))
    first = await db.sessions.complete_session(
        alice.id, "twice", success=True, claude_cost_usd=Decimal("1.5")
    )
    again = await db.sessions.complete_session(
        alice.id,
        "twice",
        success=True,
        claude_cost_usd=Decimal("1.5"),
        completion_report={"different": "report is ignored on a retry"},
    )
    assert again == first
    assert len(await charges(owner_conn, "twice")) == 1
    assert await balance(owner_conn, alice) == Decimal("92.5")


async def test_concurrent_completions_charge_once(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.billing.purchase(alice.id, Decimal("100"), description="top-up")
    await db.sessions.create_session(alice.id, new("race"))
    results = await asyncio.gather(
        *(
            db.sessions.complete_session(
                alice.id, "race", success=True, claude_cost_usd=Decimal("3")
            )
            for _ in range(6)
        )
    )
    assert len({r.updated_at for r in results}) == 1
    assert len(await charges(owner_conn, "race")) == 1
    assert await balance(owner_conn, alice) == Decimal("85")


async def test_a_different_outcome_on_an_ended_session_is_refused(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.billing.purchase(alice.id, Decimal("100"), description="top-up")
    await db.sessions.create_session(alice.id, new("ended"))
    await db.sessions.complete_session(alice.id, "ended", success=True, claude_cost_usd=Decimal(1))
    before = dict(await row(owner_conn, "ended"))
    attempts = [
        lambda: db.sessions.complete_session(
            alice.id, "ended", success=True, claude_cost_usd=Decimal(2)
        ),
        lambda: db.sessions.complete_session(
            alice.id, "ended", success=False, claude_cost_usd=Decimal(1)
        ),
        lambda: db.sessions.fail_session(
            alice.id, "ended", error_message="boom", claude_cost_usd=Decimal(1)
        ),
        lambda: db.sessions.cancel_session(alice.id, "ended", claude_cost_usd=Decimal(1)),
    ]
    for attempt in attempts:
        with pytest.raises(SessionAlreadyEnded) as err:
            await attempt()
        assert err.value.details["status"] == "completed"
    assert dict(await row(owner_conn, "ended")) == before
    assert len(await charges(owner_conn, "ended")) == 1


async def test_fail_and_cancel_charge_what_was_spent(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.billing.purchase(alice.id, Decimal("10"), description="top-up")
    await db.sessions.create_session(alice.id, new("f"))
    await db.sessions.create_session(alice.id, new("c"))
    await db.sessions.create_session(alice.id, new("free"))
    failed = await db.sessions.fail_session(
        alice.id, "f", error_message="tool crashed", claude_cost_usd=Decimal("0.4")
    )
    assert (failed.execution_status, failed.success) == ("failed", False)
    assert failed.error_message == "tool crashed"
    assert failed.keen_cost_credits == Decimal("2")
    cancelled = await db.sessions.cancel_session(
        alice.id, "c", claude_cost_usd="0.2", reason="user pressed stop"
    )
    assert (cancelled.execution_status, cancelled.keen_cost_credits) == ("cancelled", Decimal(1))
    # A zero-cost end writes no ledger row at all.
    await db.sessions.cancel_session(alice.id, "free")
    assert await charges(owner_conn, "free") == []
    assert await balance(owner_conn, alice) == Decimal("7")
    # The same failure retried is the stored result, not a second charge.
    again = await db.sessions.fail_session(
        alice.id, "f", error_message="tool crashed", claude_cost_usd=Decimal("0.4")
    )
    assert again == failed
    assert len(await charges(owner_conn, "f")) == 1


async def test_a_refused_charge_leaves_the_session_running_and_nothing_booked(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.billing.purchase(alice.id, Decimal("4"), description="top-up")
    await db.sessions.create_session(alice.id, new("broke"))
    before = dict(await row(owner_conn, "broke"))
    with pytest.raises(InsufficientCredits):
        await db.sessions.complete_session(
            alice.id, "broke", success=True, claude_cost_usd=Decimal(1)
        )  # 5 credits
    assert dict(await row(owner_conn, "broke")) == before
    assert await charges(owner_conn, "broke") == []
    await db.billing.purchase(alice.id, Decimal("1"), description="top-up")
    done = await db.sessions.complete_session(
        alice.id, "broke", success=True, claude_cost_usd=Decimal(1)
    )
    assert done.keen_cost_credits == Decimal(5)
    assert await balance(owner_conn, alice) == Decimal(0)


@pytest.mark.parametrize(
    "fields",
    [
        {"success": True, "claude_cost_usd": 1.5},
        {"success": True, "claude_cost_usd": Decimal("-1")},
        {"success": True, "claude_cost_usd": Decimal("0.0000001")},
        {"success": True, "claude_cost_usd": Decimal("NaN")},
        {"success": True, "claude_cost_usd": "lots"},
        {"success": "yes", "claude_cost_usd": Decimal(1)},
        {"success": True, "claude_cost_usd": Decimal(1), "credit_cost": Decimal(0)},
        {"success": True, "claude_cost_usd": Decimal(1), "files_created": ["a\x00"]},
        {"success": True, "claude_cost_usd": Decimal(1), "files_created": "a.py"},
        {"success": True, "claude_cost_usd": Decimal(1), "error_message": "e" * 10_001},
        {
            "success": True,
            "claude_cost_usd": Decimal(1),
            "completion_report": {"blob": "x" * 1_048_577},
        },
        {"success": True, "claude_cost_usd": Decimal(1), "completion_report": {"x": object()}},
    ],
)
async def test_bad_completion_input_is_refused_and_changes_nothing(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection, fields: dict[str, Any]
) -> None:
    await db.billing.purchase(alice.id, Decimal("100"), description="top-up")
    await db.sessions.create_session(alice.id, new("in"))
    before = dict(await row(owner_conn, "in"))
    with pytest.raises(InvalidInput):
        await db.sessions.complete_session(alice.id, "in", **fields)
    assert dict(await row(owner_conn, "in")) == before
    assert await charges(owner_conn, "in") == []


async def test_a_timed_out_session_cannot_be_completed(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.billing.purchase(alice.id, Decimal("100"), description="top-up")
    await db.sessions.create_session(alice.id, new("late"))
    await owner_conn.execute(
        "UPDATE agent_sessions SET last_activity_at = now() - interval '1 day'"
        " WHERE session_id = 'late'"
    )
    [swept] = await db.sessions.sweep_timed_out()
    assert swept.execution_status == "timed_out"
    with pytest.raises(SessionAlreadyEnded):
        await db.sessions.complete_session(
            alice.id, "late", success=True, claude_cost_usd=Decimal(1)
        )
    assert await charges(owner_conn, "late") == []


async def test_a_root_budget_caps_the_whole_tree(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.billing.purchase(alice.id, Decimal("1000"), description="top-up")
    await db.sessions.create_session(alice.id, new("swarm"))
    await db.sessions.set_budget(alice.id, "swarm", Decimal("12"))
    await db.sessions.create_session(alice.id, new("swarm.1", "swarm"))
    await db.sessions.create_session(alice.id, new("swarm.2", "swarm"))
    await db.sessions.create_session(alice.id, new("swarm.2.1", "swarm.2"))
    await db.sessions.complete_session(
        alice.id, "swarm.1", success=True, claude_cost_usd=Decimal(1)
    )
    await db.sessions.complete_session(
        alice.id, "swarm.2.1", success=True, claude_cost_usd=Decimal("1.4")
    )  # 12 of 12 used
    before = dict(await row(owner_conn, "swarm.2"))
    with pytest.raises(SessionBudgetExceeded):
        await db.sessions.complete_session(
            alice.id, "swarm.2", success=True, claude_cost_usd=Decimal("0.000001")
        )
    assert dict(await row(owner_conn, "swarm.2")) == before
    rollup = await db.sessions.get_tree_rollup(alice.id, "swarm")
    assert rollup.credit_budget == Decimal(12)
    assert rollup.budget_used == Decimal(12)
    assert rollup.keen_cost_credits == Decimal(12)
    assert rollup.claude_cost_usd == Decimal("2.4")
    assert (rollup.completed, rollup.running) == (2, 2)
    assert await balance(owner_conn, alice) == Decimal(988)
    # The budget cannot be lowered below what is used; raising it lets the tree go on.
    with pytest.raises(InvalidInput):
        await db.sessions.set_budget(alice.id, "swarm", Decimal(11))
    await db.sessions.set_budget(alice.id, "swarm", Decimal(20))
    await db.sessions.complete_session(
        alice.id, "swarm.2", success=True, claude_cost_usd=Decimal(1)
    )
    assert (await db.sessions.get_tree_rollup(alice.id, "swarm")).budget_used == Decimal(17)
