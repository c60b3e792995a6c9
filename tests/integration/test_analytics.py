"""Admin analytics: access decided by the database, aggregates that do not double count."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import SessionCreate, User
from keen_stream.errors import InsufficientPrivileges, InvalidInput


def new(session_id: str, parent: str | None = None) -> SessionCreate:
    return SessionCreate(
        session_handle=session_id,
        vision="v",
        working_directory="/w",
        git_branch="main",
        parent_session_handle=parent,
    )


async def set_outcome(
    owner_conn: asyncpg.Connection,
    handle: str,
    status: str,
    usd: str,
    credits: str,
    tokens: int,
    context: int,
) -> None:
    """Arrange an ended session's figures directly (the ledger is not under test here)."""
    await owner_conn.execute(
        """UPDATE agent_sessions SET execution_status = $2::text,
               success = ($2::text = 'completed'),
               end_time = start_time + interval '30 minutes', claude_cost_usd = $3,
               keen_cost_credits = $4, tokens_used = $5, context_tokens_used = $6
           WHERE session_id = $1""",
        handle,
        status,
        Decimal(usd),
        Decimal(credits),
        tokens,
        context,
    )


async def backdate_ledger(owner_conn: asyncpg.Connection, user: User, days: int) -> None:
    """Move a user's ledger rows into the past (the append-only trigger is skipped for this)."""
    await owner_conn.execute("SET session_replication_role = replica")
    try:
        await owner_conn.execute(
            "UPDATE credit_transactions SET created_at = created_at - make_interval(days => $2)"
            " WHERE user_id = $1",
            user.id,
            days,
        )
    finally:
        await owner_conn.execute("SET session_replication_role = DEFAULT")


async def test_analytics_accessible_only_to_admin_users(
    db: KeenDatabase, admin: User, alice: User
) -> None:
    # The seed's "analytics accessible only to admin users", ported.
    result = await db.analytics.get_admin_analytics(actor_id=admin.id)
    assert result.user_metrics is not None
    assert result.cost_analysis is not None
    with pytest.raises(InsufficientPrivileges, match="Insufficient privileges"):
        await db.analytics.get_admin_analytics(actor_id=alice.id)


async def test_view_all_analytics_privilege_and_inactive_admins(
    db: KeenDatabase, admin: User, alice: User, bob: User, owner_conn: asyncpg.Connection
) -> None:
    await owner_conn.execute(
        """UPDATE users SET admin_privileges = '{"view_all_analytics": true}' WHERE id = $1""",
        alice.id,
    )
    await owner_conn.execute(
        """UPDATE users SET admin_privileges = '{"view_all_analytics": "yes"}' WHERE id = $1""",
        bob.id,
    )
    assert (await db.analytics.get_admin_analytics("week", actor_id=alice.id)).time_range == "week"
    with pytest.raises(InsufficientPrivileges):
        await db.analytics.get_admin_analytics(actor_id=bob.id)
    await owner_conn.execute(
        "UPDATE users SET account_status = 'suspended' WHERE id = $1", admin.id
    )
    with pytest.raises(InsufficientPrivileges):
        await db.analytics.get_admin_analytics(actor_id=admin.id)
    with pytest.raises(InsufficientPrivileges):
        await db.analytics.get_admin_analytics(actor_id="00000000-0000-0000-0000-000000000000")


async def test_a_tenant_cannot_reach_the_aggregates_around_the_check(
    db: KeenDatabase, alice: User
) -> None:
    for sql in (
        "SELECT * FROM keen_analytics_window(now() - interval '1 day', now())",
        "SELECT * FROM admin_dashboard_metrics",
        "REFRESH MATERIALIZED VIEW admin_dashboard_metrics",
    ):
        with pytest.raises(InsufficientPrivileges):
            async with db.user_transaction(alice.id) as conn:
                await conn.fetch(sql)


async def test_sums_are_not_multiplied_by_the_other_tables_rows(
    db: KeenDatabase, admin: User, alice: User, bob: User, owner_conn: asyncpg.Connection
) -> None:
    # alice: 2 sessions and 3 ledger rows. The seed's LEFT JOIN of both on the user gives six
    # rows for alice, tripling her session sums and doubling her ledger sums.
    await db.sessions.create_session(alice.id, new("a1"))
    await db.sessions.create_session(alice.id, new("a1.sub", "a1"))
    await db.sessions.create_session(bob.id, new("b1"))
    await db.sessions.create_session(admin.id, new("adm"))
    await set_outcome(owner_conn, "a1", "completed", "1.500001", "7.500005", 1000, 250)
    await set_outcome(owner_conn, "a1.sub", "failed", "2.5", "12.5", 3000, 750)
    await set_outcome(owner_conn, "b1", "completed", "0.1", "0.5", 10, 0)
    await set_outcome(owner_conn, "adm", "completed", "50", "0", 6000, 1000)
    await db.billing.purchase(alice.id, Decimal("100"), description="top-up")
    await db.billing.purchase(alice.id, Decimal("50.25"), description="top-up")
    usage = await db.credits.deduct_credits(alice.id, Decimal("1.500001"), "a1", "model call")
    assert usage.amount == Decimal("-7.500005")
    await db.credits.deduct_credits(admin.id, Decimal("50"), "adm", "model call")
    # Outside the day window: counted by week, not by day.
    await db.billing.purchase(bob.id, Decimal("10"), description="top-up")
    await backdate_ledger(owner_conn, bob, days=3)

    day = await db.analytics.get_admin_analytics("day", actor_id=admin.id)
    s, c, r, x = day.session_metrics, day.cost_analysis, day.recursion_metrics, day.context_usage
    assert day.user_metrics.total_users == 3
    assert day.user_metrics.new_users == 3
    assert (s.total_sessions, s.successful_sessions, s.failed_sessions) == (4, 3, 1)
    assert (s.running_sessions, s.admin_sessions) == (0, 1)
    assert s.avg_session_duration_minutes == Decimal("30.00")
    assert c.total_claude_costs == Decimal("54.100001")
    assert c.total_credit_revenue == Decimal("20.500005")
    assert c.credits_purchased == Decimal("150.25")
    assert c.credits_used == Decimal("7.500005")
    assert (c.admin_bypasses, c.admin_bypass_claude_costs) == (1, Decimal("50"))
    assert c.markup_effectiveness == Decimal("0.3789")  # 20.500005 / 54.100001
    assert (r.total_recursive_sessions, r.max_recursion_depth) == (1, 1)
    assert r.avg_recursion_depth == Decimal("1.00")
    assert (x.total_tokens, x.context_tokens) == (10010, 2000)
    assert x.context_utilization_rate == Decimal("0.1998")
    for value in (c.total_claude_costs, c.total_credit_revenue, c.credits_purchased):
        assert isinstance(value, Decimal)

    week = await db.analytics.get_admin_analytics("week", actor_id=admin.id)
    assert week.cost_analysis.credits_purchased == Decimal("160.25")
    assert week.session_metrics.total_sessions == 4


async def test_empty_platform_gives_zeros_not_errors(db: KeenDatabase, admin: User) -> None:
    result = await db.analytics.get_admin_analytics("month", actor_id=admin.id)
    assert result.session_metrics.total_sessions == 0
    assert result.cost_analysis.total_claude_costs == Decimal(0)
    assert result.cost_analysis.markup_effectiveness is None
    assert result.context_usage.context_utilization_rate is None
    assert result.recursion_metrics.max_recursion_depth is None
    with pytest.raises(InvalidInput):
        await db.analytics.get_admin_analytics("year", actor_id=admin.id)  # type: ignore[arg-type]


async def test_dashboard_refreshes_concurrently_and_is_admin_only(
    db: KeenDatabase, admin: User, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.sessions.create_session(alice.id, new("d1"))
    await db.sessions.create_session(alice.id, new("d2"))
    await set_outcome(owner_conn, "d1", "completed", "1.25", "6.25", 100, 10)
    assert await db.analytics.get_dashboard(actor_id=admin.id) == []  # not refreshed yet
    await db.analytics.refresh_dashboard()
    hours = await db.analytics.get_dashboard(actor_id=admin.id)
    assert sum(h.sessions_started for h in hours) == 2
    assert sum(h.sessions_completed for h in hours) == 1
    assert sum((h.total_claude_costs for h in hours), Decimal(0)) == Decimal("1.25")
    with pytest.raises(InsufficientPrivileges):
        await db.analytics.get_dashboard(actor_id=alice.id)


async def test_daily_rollup_upserts_one_row_per_day(
    db: KeenDatabase, admin: User, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.sessions.create_session(alice.id, new("r1"))
    await db.sessions.create_session(alice.id, new("r1.a", "r1"))
    await set_outcome(owner_conn, "r1", "completed", "2", "10", 500, 50)
    await db.billing.purchase(alice.id, Decimal("20"), description="top-up")
    today = datetime.now(UTC).date()
    first = await db.analytics.rollup_daily(today)
    assert (first.total_sessions, first.successful_sessions) == (2, 1)
    assert first.total_claude_costs_usd == Decimal("2")
    assert first.total_credits_purchased == Decimal("20")
    assert (first.total_agents_spawned, first.max_recursion_depth) == (1, 1)
    await set_outcome(owner_conn, "r1.a", "failed", "1", "5", 10, 0)
    second = await db.analytics.rollup_daily(today)
    assert second.total_claude_costs_usd == Decimal("3")
    assert second.failed_sessions == 1
    yesterday = await db.analytics.rollup_daily(today - timedelta(days=1))
    assert yesterday.total_sessions == 0
    assert await owner_conn.fetchval("SELECT count(*) FROM daily_analytics") == 2
    rows = await db.analytics.get_daily_analytics(
        today - timedelta(days=7), today, actor_id=admin.id
    )
    assert [r.date_bucket for r in rows] == [today - timedelta(days=1), today]
    with pytest.raises(InsufficientPrivileges):
        await db.analytics.get_daily_analytics(today, today, actor_id=alice.id)
    with pytest.raises(InvalidInput):
        await db.analytics.rollup_daily("2026-01-01")  # type: ignore[arg-type]
