"""Admin analytics: the seed's AdminAnalyticsResult, with money as Decimal."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Literal

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
