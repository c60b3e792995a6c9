"""Admin analytics: live platform metrics, the hourly dashboard view, the daily rollup.

Cross-tenant aggregates never run as a tenant with a widened policy. Reads go through SECURITY
DEFINER functions (migration 0003) that first check ``keen_can_view_analytics()`` — an active
admin, or an active user granted ``admin_privileges.view_all_analytics`` — so the privilege
check and the aggregate are one statement and cannot be separated by a caller. The refresh and
the daily rollup are system jobs (``system_transaction``); they return nothing per tenant.

Every aggregate is computed from its own table in its own subquery
(``keen_analytics_window``): the seed joined sessions and transactions on the user, which
multiplied each sum by the number of rows on the other side.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Final

from keen_stream.dal.models.analytics import (
    AdminAnalytics,
    ContextUsage,
    CostAnalysis,
    DailyAnalytics,
    DashboardHour,
    RecursionMetrics,
    SessionMetrics,
    TimeRange,
    UserMetrics,
)
from keen_stream.dal.validation import parse_uuid
from keen_stream.errors import InsufficientPrivileges, InvalidInput

if TYPE_CHECKING:
    import asyncpg

    from keen_stream.dal.database import KeenDatabase

#: The seed's day/week/month, as trailing windows ending now.
TIME_RANGES: Final[dict[str, timedelta]] = {
    "day": timedelta(days=1),
    "week": timedelta(days=7),
    "month": timedelta(days=30),
}
_RATIO: Final = Decimal("0.0001")

SQL: Final = {
    "admin_analytics": "SELECT * FROM keen_admin_analytics(now() - $1::interval, now())",
    "dashboard": "SELECT * FROM keen_admin_dashboard()",
    "refresh": "REFRESH MATERIALIZED VIEW CONCURRENTLY admin_dashboard_metrics",
    # One UTC day, [$1, $2). Re-running it for the same day replaces the row.
    "rollup_daily": """
        INSERT INTO daily_analytics AS d (
            date_bucket, total_users, active_users, new_users, total_sessions,
            successful_sessions, failed_sessions, avg_session_duration_minutes,
            total_claude_costs_usd, total_credit_revenue, total_credits_purchased,
            total_credits_used, total_tokens_consumed, context_tokens_used,
            total_agents_spawned, avg_recursion_depth, max_recursion_depth, admin_sessions,
            admin_bypass_transactions)
        SELECT $3::date, w.total_users, w.active_users, w.new_users, w.total_sessions,
               w.successful_sessions, w.failed_sessions, w.avg_session_duration_minutes,
               w.total_claude_costs_usd, w.total_credit_revenue, w.credits_purchased,
               w.credits_used, w.total_tokens, w.context_tokens, w.recursive_sessions,
               w.avg_recursion_depth, w.max_recursion_depth, w.admin_sessions,
               w.admin_bypass_transactions
          FROM keen_analytics_window($1, $2) w
        ON CONFLICT (date_bucket) DO UPDATE SET
            total_users = EXCLUDED.total_users,
            active_users = EXCLUDED.active_users,
            new_users = EXCLUDED.new_users,
            total_sessions = EXCLUDED.total_sessions,
            successful_sessions = EXCLUDED.successful_sessions,
            failed_sessions = EXCLUDED.failed_sessions,
            avg_session_duration_minutes = EXCLUDED.avg_session_duration_minutes,
            total_claude_costs_usd = EXCLUDED.total_claude_costs_usd,
            total_credit_revenue = EXCLUDED.total_credit_revenue,
            total_credits_purchased = EXCLUDED.total_credits_purchased,
            total_credits_used = EXCLUDED.total_credits_used,
            total_tokens_consumed = EXCLUDED.total_tokens_consumed,
            context_tokens_used = EXCLUDED.context_tokens_used,
            total_agents_spawned = EXCLUDED.total_agents_spawned,
            avg_recursion_depth = EXCLUDED.avg_recursion_depth,
            max_recursion_depth = EXCLUDED.max_recursion_depth,
            admin_sessions = EXCLUDED.admin_sessions,
            admin_bypass_transactions = EXCLUDED.admin_bypass_transactions
        RETURNING d.*""",
    # Through RLS: the daily_analytics policy admits only those keen_can_view_analytics() admits.
    "daily": """
        SELECT * FROM daily_analytics
         WHERE date_bucket >= $1 AND date_bucket <= $2 ORDER BY date_bucket""",
    "can_view": "SELECT keen_can_view_analytics()",
}


def _ratio(numerator: Decimal, denominator: Decimal) -> Decimal | None:
    return None if not denominator else (numerator / denominator).quantize(_RATIO)


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time.min, tzinfo=UTC)
    return start, start + timedelta(days=1)


def analytics_from_row(time_range: TimeRange, row: asyncpg.Record) -> AdminAnalytics:
    claude = row["total_claude_costs_usd"]
    revenue = row["total_credit_revenue"]
    tokens = int(row["total_tokens"])
    context = int(row["context_tokens"])
    return AdminAnalytics(
        time_range=time_range,
        window_start=row["window_start"],
        window_end=row["window_end"],
        user_metrics=UserMetrics(
            total_users=row["total_users"],
            active_users=row["active_users"],
            new_users=row["new_users"],
        ),
        session_metrics=SessionMetrics(
            total_sessions=row["total_sessions"],
            successful_sessions=row["successful_sessions"],
            failed_sessions=row["failed_sessions"],
            cancelled_sessions=row["cancelled_sessions"],
            timed_out_sessions=row["timed_out_sessions"],
            running_sessions=row["running_sessions"],
            admin_sessions=row["admin_sessions"],
            avg_session_duration_minutes=row["avg_session_duration_minutes"],
        ),
        recursion_metrics=RecursionMetrics(
            total_recursive_sessions=row["recursive_sessions"],
            avg_recursion_depth=row["avg_recursion_depth"],
            max_recursion_depth=row["max_recursion_depth"],
        ),
        cost_analysis=CostAnalysis(
            total_claude_costs=claude,
            total_credit_revenue=revenue,
            markup_effectiveness=_ratio(revenue, claude),
            credits_purchased=row["credits_purchased"],
            credits_used=row["credits_used"],
            admin_bypasses=row["admin_bypass_transactions"],
            admin_bypass_claude_costs=row["admin_bypass_claude_costs_usd"],
        ),
        context_usage=ContextUsage(
            total_tokens=tokens,
            context_tokens=context,
            context_utilization_rate=_ratio(Decimal(context), Decimal(tokens)),
        ),
    )


class AnalyticsDAO:
    """``db.analytics``."""

    def __init__(self, db: KeenDatabase) -> None:
        self._db = db

    async def get_admin_analytics(
        self, time_range: TimeRange = "day", *, actor_id: uuid.UUID | str
    ) -> AdminAnalytics:
        """Platform metrics over the trailing day, week (7 days) or month (30 days).

        Raises InsufficientPrivileges unless the database says ``actor_id`` may view analytics.
        """
        uid = parse_uuid(actor_id, "actor_id")
        window = TIME_RANGES.get(time_range) if isinstance(time_range, str) else None
        if window is None:
            raise InvalidInput("time_range must be 'day', 'week' or 'month'", field="time_range")
        async with self._db.user_transaction(uid) as conn:
            row = await conn.fetchrow(SQL["admin_analytics"], window)
        return analytics_from_row(time_range, row)

    async def get_dashboard(self, *, actor_id: uuid.UUID | str) -> list[DashboardHour]:
        """The hourly dashboard view as of its last refresh.

        Raises InsufficientPrivileges unless the database says ``actor_id`` may view analytics.
        """
        uid = parse_uuid(actor_id, "actor_id")
        async with self._db.user_transaction(uid) as conn:
            rows = await conn.fetch(SQL["dashboard"])
        return [DashboardHour.model_validate(dict(r)) for r in rows]

    async def refresh_dashboard(self) -> None:
        """Recompute the dashboard view without blocking its readers (CONCURRENTLY). System job."""
        async with self._db.system_transaction() as conn:
            await conn.execute(SQL["refresh"])

    async def rollup_daily(self, day: date) -> DailyAnalytics:
        """Compute (or recompute) the daily_analytics row of one UTC day. System job."""
        if not isinstance(day, date) or isinstance(day, datetime):
            raise InvalidInput("day must be a date", field="day")
        start, end = _day_bounds(day)
        async with self._db.system_transaction() as conn:
            row = await conn.fetchrow(SQL["rollup_daily"], start, end, day)
        return DailyAnalytics.model_validate(dict(row))

    async def get_daily_analytics(
        self, first: date, last: date, *, actor_id: uuid.UUID | str
    ) -> list[DailyAnalytics]:
        """Stored daily rows from ``first`` to ``last`` inclusive. InsufficientPrivileges if not
        allowed (rather than the empty list RLS alone would give)."""
        uid = parse_uuid(actor_id, "actor_id")
        for value, what in ((first, "first"), (last, "last")):
            if not isinstance(value, date) or isinstance(value, datetime):
                raise InvalidInput(f"{what} must be a date", field=what)
        async with self._db.user_transaction(uid) as conn:
            if not await conn.fetchval(SQL["can_view"]):
                raise InsufficientPrivileges("Insufficient privileges for analytics access")
            rows = await conn.fetch(SQL["daily"], first, last)
        return [DailyAnalytics.model_validate(dict(r)) for r in rows]
