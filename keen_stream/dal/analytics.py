"""Admin analytics (exact, from rollups plus a live tail), the dashboard view, a user's usage.

Cross-tenant aggregates never run as a tenant with a widened policy. Reads go through SECURITY
DEFINER functions (migration 0003) that first check ``keen_can_view_analytics()`` — an active
admin, or an active user granted ``admin_privileges.view_all_analytics`` — so the privilege
check and the aggregate are one statement and cannot be separated by a caller. The refresh and
the daily rollup are system jobs (``system_transaction``); they return nothing per tenant.

Every aggregate is computed from its own table in its own subquery
(``keen_analytics_window``): the seed joined sessions and transactions on the user, which
multiplied each sum by the number of rows on the other side.

How fresh each figure is (docs/performance.md, "Analytics at scale"):

- ``get_admin_analytics``: exact as of the call, whatever the rollups' state. Sessions and
  ledger rows are summed per UTC hour (``analytics_hourly``); a window adds the stored hours
  that lie inside it and have not been written to since their roll, and reads everything else
  live (the partial hours at both ends, hours not rolled yet, hours marked by a late write).
  Rolling only makes it faster. Users are few and always read live.
- ``daily_analytics`` (``get_daily_analytics``): as of the row's last roll. ``rollup`` rewrites
  the day of every hour it rolls, so a late write to a rolled day reaches its row at the next
  run (the hub's ``analytics_rollup_interval``); its user counts are as of that roll.
- ``get_dashboard``: as of the view's last refresh (``dashboard_refresh_interval``).
- ``get_user_usage``: live, under the user's own RLS.
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
    RollupReport,
    SessionMetrics,
    TimeRange,
    UsageDay,
    UserMetrics,
    UserUsage,
)
from keen_stream.dal.validation import parse_uuid
from keen_stream.errors import InsufficientPrivileges, InvalidInput, NotFound

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
    # The hours a rollup run computes: every ended hour since $1 (a backfill), or (NULL) those
    # never rolled and those written to after their roll.
    "hours_to_roll": "SELECT h FROM keen_analytics_hours_to_roll($1) h",
    # One hour per transaction (see keen_analytics_roll_hour); false if it has not ended, or
    # if its writers kept it busy (it is then left to the next run, read live meanwhile).
    "roll_hour": "SELECT keen_analytics_roll_hour($1)",
    # Two rolls of one day take turns, and the second reads after the first committed: a day row
    # computed from an older snapshot cannot overwrite a newer one.
    "lock_day": "SELECT pg_advisory_xact_lock(7247, $1::int)",
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
          FROM keen_analytics_rolled($1, $2) w
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
    # As the actor, under RLS: the user's row is visible to themselves and to admins only.
    "usage_zone": (
        "SELECT timezone, (now() AT TIME ZONE timezone)::date AS today FROM users WHERE id = $1"
    ),
    # $1 user, $2 time zone, $3 first local day, $4 last local day. The explicit user_id and
    # account filters keep each read on its index (RLS alone would filter every row).
    "usage": """
        WITH days AS (
            SELECT d::date AS day FROM generate_series($3::date, $4::date, interval '1 day') d
        ),
        bounds AS (
            SELECT $3::date::timestamp AT TIME ZONE $2 AS lo,
                   ($4::date + 1)::timestamp AT TIME ZONE $2 AS hi
        ),
        s AS (
            SELECT (x.start_time AT TIME ZONE $2)::date AS day, count(*) AS sessions,
                   sum(x.tokens_used) AS tokens, sum(x.context_tokens_used) AS context
              FROM agent_sessions x, bounds b
             WHERE x.user_id = $1 AND x.start_time >= b.lo AND x.start_time < b.hi
             GROUP BY 1
        ),
        t AS (
            SELECT (c.created_at AT TIME ZONE $2)::date AS day,
                   sum(-c.amount) FILTER (WHERE c.transaction_type = 'usage') AS used,
                   sum(c.amount) FILTER (WHERE c.transaction_type = 'refund') AS refunded,
                   sum(c.amount) FILTER (WHERE c.transaction_type = 'purchase') AS purchased
              FROM credit_transactions c, bounds b
             WHERE c.account_id = (SELECT a.id FROM credit_accounts a WHERE a.user_id = $1)
               AND c.user_id = $1 AND c.created_at >= b.lo AND c.created_at < b.hi
             GROUP BY 1
        )
        SELECT days.day, coalesce(s.sessions, 0) AS sessions,
               coalesce(s.tokens, 0) AS tokens_used, coalesce(s.context, 0) AS context_tokens_used,
               coalesce(t.used, 0) AS credits_used, coalesce(t.refunded, 0) AS credits_refunded,
               coalesce(t.purchased, 0) AS credits_purchased
          FROM days LEFT JOIN s USING (day) LEFT JOIN t USING (day)
         ORDER BY days.day""",
    "is_admin": "SELECT keen_is_admin()",
}


def _ratio(numerator: Decimal, denominator: Decimal) -> Decimal | None:
    return None if not denominator else (numerator / denominator).quantize(_RATIO)


def _window(time_range: object) -> timedelta:
    window = TIME_RANGES.get(time_range) if isinstance(time_range, str) else None
    if window is None:
        raise InvalidInput("time_range must be 'day', 'week' or 'month'", field="time_range")
    return window


def _check_date(value: object, what: str) -> date:
    if not isinstance(value, date) or isinstance(value, datetime):
        raise InvalidInput(f"{what} must be a date", field=what)
    return value


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time.min, tzinfo=UTC)
    return start, start + timedelta(days=1)


def _day_hours(day: date) -> list[datetime]:
    start, _ = _day_bounds(day)
    return [start + timedelta(hours=h) for h in range(24)]


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

        Exact as of the call: rolled hours plus a live read of the rest (module docstring).
        Raises InsufficientPrivileges unless the database says ``actor_id`` may view analytics.
        """
        uid = parse_uuid(actor_id, "actor_id")
        window = _window(time_range)
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

    async def rollup(self, *, since: date | None = None, day: date | None = None) -> RollupReport:
        """Roll hours into analytics_hourly and rewrite the daily_analytics rows of their days.

        Without arguments: every ended hour never rolled (from the first user or session on)
        and every hour written to after its roll; what the hub runs on its timer. ``since``:
        every ended hour from that UTC day on, again (a backfill). ``day``: that UTC day's
        ended hours. Idempotent: rolling an hour again writes the same figures. System job.
        """
        if since is not None and day is not None:
            raise InvalidInput("give since or day, not both", field="since")
        if day is not None:
            hours = _day_hours(_check_date(day, "day"))
        else:
            first = None if since is None else _day_bounds(_check_date(since, "since"))[0]
            async with self._db.system_transaction() as conn:
                hours = [r["h"] for r in await conn.fetch(SQL["hours_to_roll"], first)]
        rolled, days = await self._roll_hours(hours)
        if day is not None:
            days.add(day)
        for d in sorted(days):
            await self._write_day(d)
        return RollupReport(hours=rolled, days=sorted(days))

    async def _roll_hours(self, hours: list[datetime]) -> tuple[int, set[date]]:
        rolled, days = 0, set()
        for hour in hours:
            # One hour per transaction: a roll holds its hour's lock until it commits.
            async with self._db.system_transaction() as conn:
                if await conn.fetchval(SQL["roll_hour"], hour):
                    rolled += 1
                    days.add(hour.astimezone(UTC).date())
        return rolled, days

    async def _write_day(self, day: date) -> DailyAnalytics:
        start, end = _day_bounds(day)
        async with self._db.system_transaction() as conn:
            await conn.execute(SQL["lock_day"], (day - date(1970, 1, 1)).days)
            row = await conn.fetchrow(SQL["rollup_daily"], start, end, day)
        return DailyAnalytics.model_validate(dict(row))

    async def rollup_daily(self, day: date) -> DailyAnalytics:
        """Compute (or recompute) one UTC day: its ended hours, then its daily_analytics row.
        System job."""
        await self._roll_hours(_day_hours(_check_date(day, "day")))
        return await self._write_day(day)

    async def get_daily_analytics(
        self, first: date, last: date, *, actor_id: uuid.UUID | str
    ) -> list[DailyAnalytics]:
        """Stored daily rows from ``first`` to ``last`` inclusive. InsufficientPrivileges if not
        allowed (rather than the empty list RLS alone would give)."""
        uid = parse_uuid(actor_id, "actor_id")
        _check_date(first, "first")
        _check_date(last, "last")
        async with self._db.user_transaction(uid) as conn:
            if not await conn.fetchval(SQL["can_view"]):
                raise InsufficientPrivileges("Insufficient privileges for analytics access")
            rows = await conn.fetch(SQL["daily"], first, last)
        return [DailyAnalytics.model_validate(dict(r)) for r in rows]

    async def get_user_usage(
        self,
        user_id: uuid.UUID | str,
        time_range: TimeRange = "week",
        *,
        actor_id: uuid.UUID | str | None = None,
    ) -> UserUsage:
        """``user_id``'s sessions, tokens and credits per calendar day of their time zone, over
        the last 1, 7 or 30 days (today so far included). Live, under RLS as ``actor_id``
        (default: the user themselves): a user reads their own usage, an admin anyone's.

        Raises InsufficientPrivileges for another user's usage without being an admin, and
        NotFound when the user does not exist.
        """
        uid = parse_uuid(user_id, "user_id")
        actor = uid if actor_id is None else parse_uuid(actor_id, "actor_id")
        days = _window(time_range).days
        async with self._db.user_transaction(actor) as conn:
            zone = await conn.fetchrow(SQL["usage_zone"], uid)
            if zone is None:
                if actor != uid and not await conn.fetchval(SQL["is_admin"]):
                    raise InsufficientPrivileges("Insufficient privileges for this user's usage")
                raise NotFound(f"no user {uid}")
            tz, today = zone["timezone"], zone["today"]
            rows = await conn.fetch(SQL["usage"], uid, tz, today - timedelta(days=days - 1), today)
        usage = [UsageDay.model_validate(dict(r)) for r in rows]
        return UserUsage(
            user_id=uid,
            time_range=time_range,
            timezone=tz,
            days=usage,
            total_sessions=sum(d.sessions for d in usage),
            total_tokens_used=sum(d.tokens_used for d in usage),
            total_credits_used=sum((d.credits_used for d in usage), Decimal(0)),
        )
