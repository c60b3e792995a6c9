-- keen_stream's schema, part 5 of 5: analytics (docs/sessions.md).
--
-- Cross-tenant aggregates are read through SECURITY DEFINER functions that check the caller's
-- privileges themselves (keen_can_view_analytics()): an active admin, or an active user granted
-- view_all_analytics.

-- The seed's verifyAdminUser, decided by the database.
CREATE FUNCTION keen_can_view_analytics() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
    SELECT coalesce(
        (SELECT u.account_status = 'active'
                AND (u.is_admin
                     OR u.admin_privileges -> 'view_all_analytics' = 'true'::jsonb)
           FROM public.users u WHERE u.id = public.keen_current_user_id()),
        false)
$$;
ALTER FUNCTION keen_can_view_analytics() OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_can_view_analytics() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_can_view_analytics() TO keen_app;

-- === The daily rollup =========================================================================
CREATE TABLE daily_analytics (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    date_bucket DATE NOT NULL,
    total_users INTEGER NOT NULL DEFAULT 0,
    active_users INTEGER NOT NULL DEFAULT 0,
    new_users INTEGER NOT NULL DEFAULT 0,
    total_sessions INTEGER NOT NULL DEFAULT 0,
    successful_sessions INTEGER NOT NULL DEFAULT 0,
    failed_sessions INTEGER NOT NULL DEFAULT 0,
    avg_session_duration_minutes NUMERIC(8,2),
    total_claude_costs_usd NUMERIC(18,6) NOT NULL DEFAULT 0,
    total_credit_revenue NUMERIC(18,6) NOT NULL DEFAULT 0,
    total_credits_purchased NUMERIC(18,6) NOT NULL DEFAULT 0,
    total_credits_used NUMERIC(18,6) NOT NULL DEFAULT 0,
    total_tokens_consumed BIGINT NOT NULL DEFAULT 0,
    context_tokens_used BIGINT NOT NULL DEFAULT 0,
    total_agents_spawned INTEGER NOT NULL DEFAULT 0,
    avg_recursion_depth NUMERIC(6,2),
    max_recursion_depth INTEGER,
    admin_sessions INTEGER NOT NULL DEFAULT 0,
    admin_bypass_transactions INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);
CREATE UNIQUE INDEX idx_daily_analytics_date ON daily_analytics(date_bucket);
CREATE INDEX idx_daily_analytics_created_at ON daily_analytics(created_at);
CREATE TRIGGER daily_analytics_touch_updated_at BEFORE UPDATE ON daily_analytics
    FOR EACH ROW EXECUTE FUNCTION keen_touch_updated_at();

-- Aggregates across tenants: readable by whoever may view analytics, written by the system.
ALTER TABLE daily_analytics ENABLE ROW LEVEL SECURITY;
ALTER TABLE daily_analytics FORCE ROW LEVEL SECURITY;
CREATE POLICY daily_analytics_select ON daily_analytics FOR SELECT TO keen_app
    USING ((SELECT keen_can_view_analytics()));

GRANT SELECT ON daily_analytics TO keen_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON daily_analytics TO keen_system;

-- === Live analytics ===========================================================================
-- The aggregates behind both the admin analytics call and the daily rollup, one row per window.
-- Each aggregate reads its own table in its own subquery: the seed joined sessions and
-- transactions on the user, which multiplies every sum by the other side's row count.
CREATE TYPE keen_analytics_summary AS (
    window_start timestamptz,
    window_end timestamptz,
    total_users bigint,
    active_users bigint,
    new_users bigint,
    total_sessions bigint,
    successful_sessions bigint,
    failed_sessions bigint,
    cancelled_sessions bigint,
    timed_out_sessions bigint,
    running_sessions bigint,
    admin_sessions bigint,
    avg_session_duration_minutes numeric,
    total_claude_costs_usd numeric,
    total_credit_revenue numeric,
    total_tokens numeric,
    context_tokens numeric,
    recursive_sessions bigint,
    avg_recursion_depth numeric,
    max_recursion_depth integer,
    credits_purchased numeric,
    credits_used numeric,
    admin_bypass_transactions bigint,
    admin_bypass_claude_costs_usd numeric
);

-- SECURITY INVOKER and executable only by keen_system: callers reach it through
-- keen_admin_analytics() (which checks privileges) or a system transaction (the rollup).
CREATE FUNCTION keen_analytics_window(p_from timestamptz, p_to timestamptz)
RETURNS keen_analytics_summary
LANGUAGE sql STABLE SET search_path = pg_catalog, public, pg_temp
AS $$
    SELECT ROW(
        p_from, p_to,
        u.total_users, u.active_users, u.new_users,
        s.total_sessions, s.successful_sessions, s.failed_sessions, s.cancelled_sessions,
        s.timed_out_sessions, s.running_sessions, s.admin_sessions,
        s.avg_session_duration_minutes, s.total_claude_costs_usd, s.total_credit_revenue,
        s.total_tokens, s.context_tokens, s.recursive_sessions, s.avg_recursion_depth,
        s.max_recursion_depth,
        t.credits_purchased, t.credits_used, t.admin_bypass_transactions,
        t.admin_bypass_claude_costs_usd
    )::public.keen_analytics_summary
    FROM (
        SELECT count(*) FILTER (WHERE created_at < p_to) AS total_users,
               count(*) FILTER (WHERE last_login_at >= p_from AND last_login_at < p_to)
                   AS active_users,
               count(*) FILTER (WHERE created_at >= p_from AND created_at < p_to)
                   AS new_users
          FROM public.users
    ) u,
    (
        SELECT count(*) AS total_sessions,
               count(*) FILTER (WHERE execution_status = 'completed') AS successful_sessions,
               count(*) FILTER (WHERE execution_status = 'failed') AS failed_sessions,
               count(*) FILTER (WHERE execution_status = 'cancelled') AS cancelled_sessions,
               count(*) FILTER (WHERE execution_status = 'timed_out') AS timed_out_sessions,
               count(*) FILTER (WHERE execution_status = 'running') AS running_sessions,
               count(*) FILTER (WHERE is_admin_session) AS admin_sessions,
               round(avg(extract(epoch FROM end_time - start_time) / 60)
                     FILTER (WHERE end_time IS NOT NULL), 2) AS avg_session_duration_minutes,
               coalesce(sum(claude_cost_usd), 0) AS total_claude_costs_usd,
               coalesce(sum(keen_cost_credits), 0) AS total_credit_revenue,
               coalesce(sum(tokens_used), 0) AS total_tokens,
               coalesce(sum(context_tokens_used), 0) AS context_tokens,
               count(*) FILTER (WHERE session_depth > 0) AS recursive_sessions,
               round(avg(session_depth) FILTER (WHERE session_depth > 0), 2)
                   AS avg_recursion_depth,
               max(session_depth) FILTER (WHERE session_depth > 0) AS max_recursion_depth
          FROM public.agent_sessions
         WHERE start_time >= p_from AND start_time < p_to
    ) s,
    (
        SELECT coalesce(sum(amount) FILTER (WHERE transaction_type = 'purchase'), 0)
                   AS credits_purchased,
               coalesce(sum(abs(amount)) FILTER (WHERE transaction_type = 'usage'), 0)
                   AS credits_used,
               count(*) FILTER (WHERE is_admin_bypass) AS admin_bypass_transactions,
               coalesce(sum(claude_cost_usd) FILTER (WHERE is_admin_bypass), 0)
                   AS admin_bypass_claude_costs_usd
          FROM public.credit_transactions
         WHERE created_at >= p_from AND created_at < p_to
    ) t
$$;
REVOKE ALL ON FUNCTION keen_analytics_window(timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_analytics_window(timestamptz, timestamptz) TO keen_system;

CREATE FUNCTION keen_admin_analytics(p_from timestamptz, p_to timestamptz)
RETURNS keen_analytics_summary
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF NOT public.keen_can_view_analytics() THEN
        RAISE EXCEPTION 'Insufficient privileges for analytics access'
            USING ERRCODE = 'KS403';
    END IF;
    RETURN public.keen_analytics_window(p_from, p_to);
END $$;
ALTER FUNCTION keen_admin_analytics(timestamptz, timestamptz) OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_admin_analytics(timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_admin_analytics(timestamptz, timestamptz) TO keen_app;

-- === The dashboard ============================================================================
-- The seed's dashboard view, over the 24 hours before each refresh. Materialized views have no
-- RLS: the view belongs to keen_system (so the system job can refresh it) and tenants read it
-- only through keen_admin_dashboard().
CREATE MATERIALIZED VIEW admin_dashboard_metrics AS
SELECT
    date_trunc('hour', s.start_time) AS hour_bucket,
    count(*) AS sessions_started,
    count(*) FILTER (WHERE s.success = true) AS sessions_completed,
    avg(s.keen_cost_credits) AS avg_credit_cost_per_session,
    sum(s.tokens_used) AS total_tokens,
    sum(s.context_tokens_used) AS total_context_tokens,
    count(*) FILTER (WHERE s.is_admin_session = true) AS admin_sessions,
    sum(s.claude_cost_usd) AS total_claude_costs,
    avg(s.session_depth) AS avg_recursion_depth
FROM agent_sessions s
WHERE s.start_time >= now() - interval '24 hours'
GROUP BY date_trunc('hour', s.start_time);
-- Unique so that REFRESH ... CONCURRENTLY works.
CREATE UNIQUE INDEX idx_admin_dashboard_metrics_hour ON admin_dashboard_metrics(hour_bucket);
ALTER MATERIALIZED VIEW admin_dashboard_metrics OWNER TO keen_system;

CREATE FUNCTION keen_admin_dashboard() RETURNS SETOF admin_dashboard_metrics
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF NOT public.keen_can_view_analytics() THEN
        RAISE EXCEPTION 'Insufficient privileges for analytics access'
            USING ERRCODE = 'KS403';
    END IF;
    RETURN QUERY SELECT * FROM public.admin_dashboard_metrics m ORDER BY m.hour_bucket;
END $$;
ALTER FUNCTION keen_admin_dashboard() OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_admin_dashboard() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_admin_dashboard() TO keen_app;
