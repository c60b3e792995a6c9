"""Admin analytics: the seed's AdminAnalyticsResult, with money as Decimal."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict

TimeRange = Literal["day", "week", "month"]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class UserMetrics(_Out):
    #: Users registered before the end of the window.
    total_users: int
    #: Users whose last login falls in the window (only the last login is stored).
    active_users: int
    new_users: int


class SessionMetrics(_Out):
    """Sessions started in the window, by how they stand now."""

    total_sessions: int
    successful_sessions: int
    failed_sessions: int
    cancelled_sessions: int
    timed_out_sessions: int
    running_sessions: int
    admin_sessions: int
    avg_session_duration_minutes: Decimal | None


class RecursionMetrics(_Out):
    """Sub-agent sessions (depth > 0) started in the window."""

    total_recursive_sessions: int
    avg_recursion_depth: Decimal | None
    max_recursion_depth: int | None


class CostAnalysis(_Out):
    total_claude_costs: Decimal
    #: Credits charged for sessions started in the window (their keen_cost_credits).
    total_credit_revenue: Decimal
    #: Revenue per USD of Claude cost (4 places); None when there was no cost.
    markup_effectiveness: Decimal | None
    #: From the ledger: purchases and usage charges booked in the window.
    credits_purchased: Decimal
    credits_used: Decimal
    admin_bypasses: int
    admin_bypass_claude_costs: Decimal


class ContextUsage(_Out):
    total_tokens: int
    context_tokens: int
    #: context_tokens / total_tokens (4 places); None when no tokens were used.
    context_utilization_rate: Decimal | None


class AdminAnalytics(_Out):
    time_range: TimeRange
    window_start: datetime
    window_end: datetime
    user_metrics: UserMetrics
    session_metrics: SessionMetrics
    recursion_metrics: RecursionMetrics
    cost_analysis: CostAnalysis
    context_usage: ContextUsage


class DashboardHour(_Out):
    """One row of the admin_dashboard_metrics materialized view (last 24 h at refresh)."""

    hour_bucket: datetime
    sessions_started: int
    sessions_completed: int
    avg_credit_cost_per_session: Decimal | None
    total_tokens: int
    total_context_tokens: int
    admin_sessions: int
    total_claude_costs: Decimal
    avg_recursion_depth: Decimal | None


class DailyAnalytics(_Out):
    """A daily_analytics row (one UTC day)."""

    date_bucket: date
    total_users: int
    active_users: int
    new_users: int
    total_sessions: int
    successful_sessions: int
    failed_sessions: int
    avg_session_duration_minutes: Decimal | None
    total_claude_costs_usd: Decimal
    total_credit_revenue: Decimal
    total_credits_purchased: Decimal
    total_credits_used: Decimal
    total_tokens_consumed: int
    context_tokens_used: int
    total_agents_spawned: int
    avg_recursion_depth: Decimal | None
    max_recursion_depth: int | None
    admin_sessions: int
    admin_bypass_transactions: int
    created_at: datetime
    updated_at: datetime


class RollupReport(_Out):
    """What one ``db.analytics.rollup`` run (re)computed."""

    #: UTC hours whose analytics_hourly row was written (new, re-rolled after a late write, or
    #: forced by a backfill).
    hours: int
    #: UTC days whose daily_analytics row was rewritten (the days of those hours).
    days: list[date]


class UsageDay(_Out):
    """One calendar day of a user's usage, in the user's own time zone."""

    day: date
    #: Sessions started that day.
    sessions: int
    tokens_used: int
    context_tokens_used: int
    #: From the user's ledger: usage charges (positive), refunds and purchases booked that day.
    credits_used: Decimal
    credits_refunded: Decimal
    credits_purchased: Decimal


class UserUsage(_Out):
    """A user's own spend, sessions and tokens per day (``db.analytics.get_user_usage``)."""

    user_id: UUID
    time_range: TimeRange
    #: The user's time zone (users.timezone): the days below are its calendar days.
    timezone: str
    #: The last 1, 7 or 30 days, oldest first, today (so far) last; days without use are zeros.
    days: list[UsageDay]
    total_sessions: int
    total_tokens_used: int
    total_credits_used: Decimal
