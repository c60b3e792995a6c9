"""Agent sessions: hierarchy invariants, lifecycle guard, keyset/tree/sweep indexes, analytics.

Revision ID: 0003_sessions
Revises: 0002_ledger
Create Date: 2026-11-25

What the schema guarantees from here on (docs/sessions.md explains each):
- ``root_session_id``, ``session_depth``, ``is_admin_session`` and ``bypass_credit_deduction``
  are derived by a BEFORE INSERT trigger from the parent row and the owner's account; a parent
  must belong to the same user and still be running.
- keen_app may insert only the caller-chosen columns and update only progress, outcome and budget
  columns; it may not delete sessions (they are history the ledger points at).
- Once a session has ended, keen_app cannot change it; counters never decrease; costs and the
  outcome are written only in the transition that ends a session.
- Cross-tenant analytics are read through SECURITY DEFINER functions that check the caller's
  privileges themselves (``keen_can_view_analytics()``).
"""

from alembic import op

revision = "0003_sessions"
down_revision = "0002_ledger"
branch_labels = None
depends_on = None

# Limits mirrored by keen_stream/dal/models/sessions.py (the DAL refuses earlier, with the field).
MAX_FILES = 10_000
MAX_REPORT_BYTES = 1_048_576

CONSTRAINTS = [
    # Rows written before this migration get their root (none exist in a fresh install).
    """
    WITH RECURSIVE r AS (
        SELECT id, id AS root FROM agent_sessions WHERE parent_session_id IS NULL
        UNION ALL
        SELECT c.id, r.root FROM agent_sessions c JOIN r ON c.parent_session_id = r.id
    )
    UPDATE agent_sessions s SET root_session_id = r.root
      FROM r WHERE s.id = r.id AND s.root_session_id IS DISTINCT FROM r.root
    """,
    "ALTER TABLE agent_sessions ALTER COLUMN root_session_id SET NOT NULL",
    # A root is its own root: the ledger finds a subtree's budget through this column.
    """
    ALTER TABLE agent_sessions ADD CONSTRAINT agent_sessions_root_check
        CHECK ((parent_session_id IS NULL) = (root_session_id = id))
    """,
    """
    ALTER TABLE agent_sessions ADD CONSTRAINT agent_sessions_budget_root_only
        CHECK (credit_budget IS NULL OR parent_session_id IS NULL)
    """,
    # The ledger takes budget with "budget_used + x <= credit_budget"; this holds every writer to
    # it, set_budget included.
    """
    ALTER TABLE agent_sessions ADD CONSTRAINT agent_sessions_budget_not_exceeded
        CHECK (credit_budget IS NULL OR budget_used <= credit_budget)
    """,
    # 'completed' means success; every other end is a failure; a running session has no verdict.
    """
    ALTER TABLE agent_sessions ADD CONSTRAINT agent_sessions_success_check
        CHECK (CASE execution_status
                   WHEN 'running' THEN success IS NULL
                   WHEN 'completed' THEN success IS TRUE
                   ELSE success IS FALSE
               END)
    """,
    f"""
    ALTER TABLE agent_sessions ADD CONSTRAINT agent_sessions_sizes_check
        CHECK (length(vision) BETWEEN 1 AND 100000
               AND length(working_directory) BETWEEN 1 AND 4096
               AND length(git_branch) >= 1
               AND (error_message IS NULL OR length(error_message) <= 10000)
               AND cardinality(files_created) <= {MAX_FILES}
               AND cardinality(files_modified) <= {MAX_FILES}
               AND cardinality(files_deleted) <= {MAX_FILES})
    """,
    f"""
    ALTER TABLE agent_sessions ADD CONSTRAINT agent_sessions_report_check
        CHECK (completion_report IS NULL
               OR (jsonb_typeof(completion_report) = 'object'
                   AND pg_column_size(completion_report) <= {MAX_REPORT_BYTES}))
    """,
]

INDEXES = [
    # Keyset pages of one user's sessions, newest first (scanned backwards).
    "CREATE INDEX idx_agent_sessions_user_start ON agent_sessions (user_id, start_time, id)",
    # The admin's everyone-list and the analytics windows.
    "CREATE INDEX idx_agent_sessions_start ON agent_sessions (start_time, id)",
    # The sweep reads only running sessions; ended ones (the vast majority) are not in it.
    """
    CREATE INDEX idx_agent_sessions_running_activity ON agent_sessions (last_activity_at)
        WHERE execution_status = 'running'
    """,
    # Superseded by the composites above (same leading columns).
    "DROP INDEX idx_agent_sessions_user_id",
    "DROP INDEX idx_agent_sessions_start_time",
    # Two-value and four-value columns no query filters on; each index is written on every
    # phase change and keeps such updates from being HOT.
    "DROP INDEX idx_agent_sessions_current_phase",
    "DROP INDEX idx_agent_sessions_is_admin",
]

FUNCTIONS = [
    # Derived columns are the database's to set, whoever inserts. SECURITY DEFINER so it reads
    # the parent and the owner's account whatever the inserting role may see.
    """
    CREATE FUNCTION keen_sessions_before_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    DECLARE
        p record;
        owner_admin boolean;
        owner_unlimited boolean;
    BEGIN
        IF NEW.parent_session_id IS NULL THEN
            NEW.session_depth := 0;
            NEW.root_session_id := NEW.id;
        ELSE
            SELECT s.user_id, s.session_depth, s.root_session_id, s.execution_status, s.session_id
              INTO p FROM public.agent_sessions s WHERE s.id = NEW.parent_session_id
               FOR SHARE;  -- waits for a concurrent end of the parent, then sees its status
            -- Another tenant's parent is reported exactly like a missing one.
            IF NOT FOUND OR p.user_id <> NEW.user_id THEN
                RAISE EXCEPTION 'no such parent session' USING ERRCODE = 'KS404',
                    DETAIL = json_build_object('field', 'parent_session_id')::text;
            END IF;
            IF p.execution_status <> 'running' THEN
                RAISE EXCEPTION 'parent session % has already ended (%)',
                    p.session_id, p.execution_status USING ERRCODE = 'KS442',
                    DETAIL = json_build_object('session_id', p.session_id,
                                               'status', p.execution_status)::text;
            END IF;
            NEW.session_depth := p.session_depth + 1;
            NEW.root_session_id := p.root_session_id;
        END IF;
        SELECT u.is_admin AND u.account_status = 'active' INTO owner_admin
          FROM public.users u WHERE u.id = NEW.user_id;
        SELECT a.unlimited_credits OR a.bypass_billing INTO owner_unlimited
          FROM public.credit_accounts a WHERE a.user_id = NEW.user_id;
        NEW.is_admin_session := coalesce(owner_admin, false);
        NEW.bypass_credit_deduction := NEW.is_admin_session OR coalesce(owner_unlimited, false);
        RETURN NEW;
    END $$
    """,
    # Column grants say which columns keen_app may touch; this says when.
    """
    CREATE FUNCTION keen_sessions_guard() RETURNS trigger
    LANGUAGE plpgsql AS $$
    DECLARE
        charged_credits numeric;
        charged_cost numeric;
    BEGIN
        IF current_user <> 'keen_app' THEN
            RETURN NEW;
        END IF;
        IF OLD.execution_status <> 'running' THEN
            RAISE EXCEPTION 'session % has already ended (%)', OLD.session_id,
                OLD.execution_status USING ERRCODE = 'KS442',
                DETAIL = json_build_object('session_id', OLD.session_id,
                                           'status', OLD.execution_status)::text;
        END IF;
        IF NEW.iteration_count < OLD.iteration_count
           OR NEW.tool_calls_count < OLD.tool_calls_count
           OR NEW.tokens_used < OLD.tokens_used
           OR NEW.context_tokens_used < OLD.context_tokens_used THEN
            RAISE EXCEPTION 'session counters never decrease' USING ERRCODE = 'KS400';
        END IF;
        IF NEW.execution_status = 'running'
           AND (NEW.claude_cost_usd, NEW.keen_cost_credits, NEW.completion_report,
                NEW.error_message)
               IS DISTINCT FROM
               (OLD.claude_cost_usd, OLD.keen_cost_credits, OLD.completion_report,
                OLD.error_message) THEN
            RAISE EXCEPTION 'costs and the outcome are written only when a session ends'
                USING ERRCODE = 'KS400';
        END IF;
        -- The sweep reads last_activity_at: a date in the future would make a session immortal.
        IF NEW.last_activity_at > now() THEN
            NEW.last_activity_at := now();
        END IF;
        IF NEW.execution_status <> 'running' THEN
            -- The costs a session ends with are what the ledger charged for its end (key
            -- session-end:<id>), nothing else: tenant code cannot end a session for free or
            -- inflate the revenue analytics read from these columns.
            SELECT coalesce(-sum(t.amount), 0), coalesce(sum(t.claude_cost_usd), 0)
              INTO charged_credits, charged_cost
              FROM public.credit_transactions t
             WHERE t.session_id = NEW.id AND t.idempotency_key = 'session-end:' || NEW.id::text;
            IF NEW.keen_cost_credits <> charged_credits OR NEW.claude_cost_usd <> charged_cost THEN
                RAISE EXCEPTION 'session costs must match the ledger charge for its end'
                    USING ERRCODE = 'KS403';
            END IF;
            NEW.end_time := now();
        END IF;
        RETURN NEW;
    END $$
    """,
    # Append the items not already present, in first-seen order. Evaluated inside the UPDATE, so
    # concurrent appends each see the row version they are applied to.
    """
    CREATE FUNCTION keen_append_distinct(existing text[], additions text[]) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT coalesce(existing, '{}') || ARRAY(
            SELECT a FROM unnest(additions) WITH ORDINALITY AS t(a, n)
             WHERE NOT (a = ANY (coalesce(existing, '{}')))
             GROUP BY a ORDER BY min(n))
    $$
    """,
    # One round trip that resolves the parent handle under RLS (so another tenant's parent is
    # simply not found), enforces the depth limit and inserts. SECURITY INVOKER: it runs as
    # keen_app, under the caller's RLS and column grants.
    """
    CREATE FUNCTION keen_session_create(
        p_user_id uuid, p_session_id text, p_parent text, p_git_branch text, p_vision text,
        p_working_directory text, p_streaming boolean, p_max_depth integer)
    RETURNS SETOF agent_sessions
    LANGUAGE plpgsql SET search_path = pg_catalog, public
    AS $$
    DECLARE
        parent_id uuid;
        parent_depth integer;
        created public.agent_sessions;
    BEGIN
        IF p_parent IS NOT NULL THEN
            SELECT s.id, s.session_depth INTO parent_id, parent_depth
              FROM public.agent_sessions s
             WHERE s.session_id = p_parent AND s.user_id = p_user_id;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'no such parent session %', p_parent USING ERRCODE = 'KS404',
                    DETAIL = json_build_object('field', 'parent_session_id')::text;
            END IF;
            IF parent_depth + 1 > p_max_depth THEN
                RAISE EXCEPTION 'session depth % would exceed the maximum %',
                    parent_depth + 1, p_max_depth USING ERRCODE = 'KS443',
                    DETAIL = json_build_object('depth', parent_depth + 1,
                                               'max_depth', p_max_depth)::text;
            END IF;
        END IF;
        INSERT INTO public.agent_sessions (user_id, session_id, parent_session_id, git_branch,
                                           vision, working_directory, streaming_enabled)
        VALUES (p_user_id, p_session_id, parent_id, p_git_branch, p_vision,
                p_working_directory, p_streaming)
        ON CONFLICT (session_id) DO NOTHING
        RETURNING * INTO created;
        IF created.id IS NULL THEN
            RAISE EXCEPTION 'session_id % is already taken', p_session_id
                USING ERRCODE = 'KS441',
                DETAIL = json_build_object('session_id', p_session_id)::text;
        END IF;
        RETURN NEXT created;
    END $$
    """,
]

TRIGGERS = [
    "CREATE TRIGGER agent_sessions_derive BEFORE INSERT ON agent_sessions "
    "FOR EACH ROW EXECUTE FUNCTION keen_sessions_before_insert()",
    "CREATE TRIGGER agent_sessions_guard BEFORE UPDATE ON agent_sessions "
    "FOR EACH ROW EXECUTE FUNCTION keen_sessions_guard()",
]

# The aggregates behind both the admin analytics call and the daily rollup, one row per window.
# Each aggregate reads its own table in its own subquery: the seed joined sessions and
# transactions on the user, which multiplies every sum by the other side's row count.
ANALYTICS = [
    """
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
    )
    """,
    # SECURITY INVOKER and executable only by keen_system: callers reach it through
    # keen_admin_analytics() (which checks privileges) or a system transaction (the rollup).
    """
    CREATE FUNCTION keen_analytics_window(p_from timestamptz, p_to timestamptz)
    RETURNS keen_analytics_summary
    LANGUAGE sql STABLE SET search_path = pg_catalog, public
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
    $$
    """,
    # The seed's verifyAdminUser, decided by the database: an active admin, or an active user
    # granted view_all_analytics.
    """
    CREATE FUNCTION keen_can_view_analytics() RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
        SELECT coalesce(
            (SELECT u.account_status = 'active'
                    AND (u.is_admin
                         OR u.admin_privileges -> 'view_all_analytics' = 'true'::jsonb)
               FROM public.users u WHERE u.id = public.keen_current_user_id()),
            false)
    $$
    """,
    """
    CREATE FUNCTION keen_admin_analytics(p_from timestamptz, p_to timestamptz)
    RETURNS keen_analytics_summary
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    BEGIN
        IF NOT public.keen_can_view_analytics() THEN
            RAISE EXCEPTION 'Insufficient privileges for analytics access'
                USING ERRCODE = 'KS403';
        END IF;
        RETURN public.keen_analytics_window(p_from, p_to);
    END $$
    """,
    # Materialized views have no RLS: the view belongs to keen_system (so the system job can
    # refresh it) and tenants read it only through this check.
    "ALTER MATERIALIZED VIEW admin_dashboard_metrics OWNER TO keen_system",
    """
    CREATE FUNCTION keen_admin_dashboard() RETURNS SETOF admin_dashboard_metrics
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    BEGIN
        IF NOT public.keen_can_view_analytics() THEN
            RAISE EXCEPTION 'Insufficient privileges for analytics access'
                USING ERRCODE = 'KS403';
        END IF;
        RETURN QUERY SELECT * FROM public.admin_dashboard_metrics m ORDER BY m.hour_bucket;
    END $$
    """,
    # daily_analytics follows the same rule as the live analytics.
    "DROP POLICY daily_analytics_select ON daily_analytics",
    "CREATE POLICY daily_analytics_select ON daily_analytics FOR SELECT TO keen_app "
    "USING ((SELECT keen_can_view_analytics()))",
]

GRANTS = [
    "REVOKE INSERT, UPDATE, DELETE ON agent_sessions FROM keen_app",
    "GRANT INSERT (user_id, session_id, parent_session_id, git_branch, vision, working_directory,"
    " streaming_enabled) ON agent_sessions TO keen_app",
    "GRANT UPDATE (current_phase, last_activity_at, iteration_count, tool_calls_count,"
    " tokens_used, context_tokens_used, files_modified, files_created, files_deleted, end_time,"
    " execution_status, success, error_message, completion_report, claude_cost_usd,"
    " keen_cost_credits, credit_budget, streaming_enabled, websocket_connections)"
    " ON agent_sessions TO keen_app",
    "REVOKE EXECUTE ON FUNCTION keen_sessions_before_insert(), keen_sessions_guard(),"
    " keen_append_distinct(text[], text[]),"
    " keen_session_create(uuid, text, text, text, text, text, boolean, integer),"
    " keen_analytics_window(timestamptz, timestamptz), keen_can_view_analytics(),"
    " keen_admin_analytics(timestamptz, timestamptz), keen_admin_dashboard() FROM PUBLIC",
    "ALTER FUNCTION keen_sessions_before_insert() OWNER TO keen_system",
    "ALTER FUNCTION keen_can_view_analytics() OWNER TO keen_system",
    "ALTER FUNCTION keen_admin_analytics(timestamptz, timestamptz) OWNER TO keen_system",
    "ALTER FUNCTION keen_admin_dashboard() OWNER TO keen_system",
    "GRANT EXECUTE ON FUNCTION keen_append_distinct(text[], text[]),"
    " keen_session_create(uuid, text, text, text, text, text, boolean, integer),"
    " keen_can_view_analytics(), keen_admin_analytics(timestamptz, timestamptz),"
    " keen_admin_dashboard() TO keen_app, keen_system",
    "GRANT EXECUTE ON FUNCTION keen_analytics_window(timestamptz, timestamptz) TO keen_system",
]

UPGRADE: list[str] = [*CONSTRAINTS, *INDEXES, *FUNCTIONS, *TRIGGERS, *ANALYTICS, *GRANTS]

DOWNGRADE: list[str] = [
    "REVOKE INSERT, UPDATE ON agent_sessions FROM keen_app",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON agent_sessions TO keen_app",
    "DROP POLICY daily_analytics_select ON daily_analytics",
    "CREATE POLICY daily_analytics_select ON daily_analytics FOR SELECT TO keen_app "
    "USING ((SELECT keen_is_admin()))",
    "DROP FUNCTION keen_admin_dashboard()",
    "ALTER MATERIALIZED VIEW admin_dashboard_metrics OWNER TO CURRENT_USER",
    "DROP FUNCTION keen_admin_analytics(timestamptz, timestamptz)",
    "DROP FUNCTION keen_can_view_analytics()",
    "DROP FUNCTION keen_analytics_window(timestamptz, timestamptz)",
    "DROP TYPE keen_analytics_summary",
    "DROP TRIGGER agent_sessions_guard ON agent_sessions",
    "DROP TRIGGER agent_sessions_derive ON agent_sessions",
    "DROP FUNCTION keen_session_create(uuid, text, text, text, text, text, boolean, integer)",
    "DROP FUNCTION keen_append_distinct(text[], text[])",
    "DROP FUNCTION keen_sessions_guard()",
    "DROP FUNCTION keen_sessions_before_insert()",
    "CREATE INDEX idx_agent_sessions_is_admin ON agent_sessions(is_admin_session)",
    "CREATE INDEX idx_agent_sessions_current_phase ON agent_sessions(current_phase)",
    "CREATE INDEX idx_agent_sessions_start_time ON agent_sessions(start_time)",
    "CREATE INDEX idx_agent_sessions_user_id ON agent_sessions(user_id)",
    "DROP INDEX idx_agent_sessions_running_activity",
    "DROP INDEX idx_agent_sessions_start",
    "DROP INDEX idx_agent_sessions_user_start",
    "ALTER TABLE agent_sessions DROP CONSTRAINT agent_sessions_report_check",
    "ALTER TABLE agent_sessions DROP CONSTRAINT agent_sessions_sizes_check",
    "ALTER TABLE agent_sessions DROP CONSTRAINT agent_sessions_success_check",
    "ALTER TABLE agent_sessions DROP CONSTRAINT agent_sessions_budget_not_exceeded",
    "ALTER TABLE agent_sessions DROP CONSTRAINT agent_sessions_budget_root_only",
    "ALTER TABLE agent_sessions DROP CONSTRAINT agent_sessions_root_check",
    "ALTER TABLE agent_sessions ALTER COLUMN root_session_id DROP NOT NULL",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
