-- keen_stream's schema, part 5 of 5: analytics (docs/sessions.md, docs/performance.md).
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

-- === Rollups: exact analytics at any size (migration 0011) ====================================
-- Sessions and ledger rows are summed per UTC hour of their start_time / created_at into
-- analytics_hourly. A window [p_from, p_to) is then the sum of the hours that lie wholly inside
-- it and are stored and clean, plus a live read of everything else (the partial hours at both
-- ends, hours not rolled yet, hours changed since their roll). Each stored row holds sums and
-- counts rather than averages, so any set of hours adds up to exactly what one live aggregate
-- over the same rows gives (numeric addition is exact; avg() is sum / count).
--
-- Late writes: a write to a session or ledger row marks its hour in analytics_dirty_hours when
-- that hour has already ended and been rolled; a marked hour is read live until the next roll
-- clears the mark.
-- The roll and the writers agree through an advisory lock per hour: writers take it shared
-- (after their change, before reading the clock), a roll takes it exclusively before it reads.
-- So a writer either finishes before the roll reads (the roll sees its change) or reads the
-- clock after the roll committed, past the hour's end, and marks the hour. Only rows' hours are
-- tracked: users are few and read live.

-- One UTC hour. NULL sums: no row of that kind (as sum() over nothing), so that combining
-- hours keeps the live computation's NULLs and scales.
CREATE TABLE analytics_hourly (
    hour_bucket TIMESTAMP WITH TIME ZONE PRIMARY KEY,
    total_sessions BIGINT NOT NULL,
    successful_sessions BIGINT NOT NULL,
    failed_sessions BIGINT NOT NULL,
    cancelled_sessions BIGINT NOT NULL,
    timed_out_sessions BIGINT NOT NULL,
    running_sessions BIGINT NOT NULL,
    admin_sessions BIGINT NOT NULL,
    ended_sessions BIGINT NOT NULL,
    -- sum(extract(epoch FROM end_time - start_time) / 60) over ended sessions, unrounded
    duration_minutes_sum NUMERIC,
    claude_costs_usd NUMERIC,
    credit_revenue NUMERIC,
    tokens NUMERIC,
    context_tokens NUMERIC,
    recursive_sessions BIGINT NOT NULL,
    recursion_depth_sum BIGINT,
    max_recursion_depth INTEGER,
    credits_purchased NUMERIC,
    credits_used NUMERIC,
    admin_bypass_transactions BIGINT NOT NULL,
    admin_bypass_claude_costs_usd NUMERIC,
    rolled_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT analytics_hourly_on_the_hour
        CHECK (hour_bucket = date_trunc('hour', hour_bucket, 'UTC'))
);

-- Hours changed after they ended, until their next roll. Written by the triggers below (as
-- keen_system), read and cleared by the roll.
CREATE TABLE analytics_dirty_hours (
    -- A key of its own (a logically replicated table needs one to publish the roll's deletes).
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hour_bucket TIMESTAMP WITH TIME ZONE NOT NULL,
    marked_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT clock_timestamp()
);
-- Not unique: a writer that finds no mark adds its own rather than wait, as ON CONFLICT would,
-- for another writer's uncommitted one (held until that writer commits, however long).
CREATE INDEX idx_analytics_dirty_hours_hour ON analytics_dirty_hours(hour_bucket);

ALTER TABLE analytics_hourly ENABLE ROW LEVEL SECURITY;
ALTER TABLE analytics_hourly FORCE ROW LEVEL SECURITY;
CREATE POLICY analytics_hourly_select ON analytics_hourly FOR SELECT TO keen_app
    USING ((SELECT keen_can_view_analytics()));
ALTER TABLE analytics_dirty_hours ENABLE ROW LEVEL SECURITY;
ALTER TABLE analytics_dirty_hours FORCE ROW LEVEL SECURITY;

GRANT SELECT ON analytics_hourly TO keen_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON analytics_hourly TO keen_system;
GRANT SELECT, INSERT, DELETE ON analytics_dirty_hours TO keen_system;

-- The advisory lock of one hour: (class, hours since the epoch). The two-key form cannot
-- collide with the single-bigint keys the ledger and the stream use.
CREATE FUNCTION keen_analytics_hour_key(p_hour timestamptz) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (floor(extract(epoch FROM p_hour) / 3600))::integer $$;
REVOKE ALL ON FUNCTION keen_analytics_hour_key(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_analytics_hour_key(timestamptz)
    TO keen_app, keen_system, keen_billing, keen_ledger;

-- Marks a rolled hour written to after it ended. The writers' roles hold EXECUTE (the trigger
-- below runs as them), so it refuses to run outside a trigger.
CREATE FUNCTION keen_analytics_mark_hour(p_hour timestamptz) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    v_hour timestamptz := date_trunc('hour', p_hour, 'UTC');
BEGIN
    -- The trigger's alone: called directly, any hour could be marked, and one in year 1,
    -- stored at the next roll, would start every later roll's walk there.
    IF pg_trigger_depth() = 0 THEN
        RAISE EXCEPTION 'analytics hours are marked by the write triggers only'
            USING ERRCODE = 'KS403';
    END IF;
    -- An hour never rolled is read live and rolled anyway: nothing to mark; a committed mark
    -- is enough. (Under the hour's lock, held by the calling trigger, no roll can store the hour
    -- or clear its marks meanwhile.) Another writer's uncommitted mark is not seen: a second mark.
    -- Only a fresh snapshot can tell: in REPEATABLE READ or SERIALIZABLE, always mark.
    IF current_setting('transaction_isolation') = 'read committed'
       AND (NOT EXISTS (SELECT FROM public.analytics_hourly a WHERE a.hour_bucket = v_hour)
            OR EXISTS (SELECT FROM public.analytics_dirty_hours d WHERE d.hour_bucket = v_hour))
    THEN
        RETURN;
    END IF;
    INSERT INTO public.analytics_dirty_hours (hour_bucket) VALUES (v_hour);
END $$;
ALTER FUNCTION keen_analytics_mark_hour(timestamptz) OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_analytics_mark_hour(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_analytics_mark_hour(timestamptz)
    TO keen_app, keen_system, keen_billing, keen_ledger;

-- On every write of a session or ledger row: hold the lock of the row's hour (old and new)
-- shared until commit, then, if that hour has ended by the clock, mark it. It runs on the
-- writers' hot path (every deduction), as the writer: SECURITY INVOKER with no pinned
-- search_path (a SET clause costs a configuration change per row; measured, the row cost fell
-- from ~25 to ~10 us), every name schema-qualified, and only the rare mark crosses into
-- keen_system's privileges. The clock, not now(): a transaction that began inside the hour may
-- write after the hour's roll.
CREATE FUNCTION keen_analytics_mark() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    old_at timestamptz;
    new_at timestamptz;
    at timestamptz;
    hour timestamptz;
    seen timestamptz;
BEGIN
    IF TG_TABLE_NAME = 'agent_sessions' THEN
        IF TG_OP <> 'INSERT' THEN old_at := OLD.start_time; END IF;
        IF TG_OP <> 'DELETE' THEN new_at := NEW.start_time; END IF;
    ELSE
        IF TG_OP <> 'INSERT' THEN old_at := OLD.created_at; END IF;
        IF TG_OP <> 'DELETE' THEN new_at := NEW.created_at; END IF;
    END IF;
    FOREACH at IN ARRAY ARRAY[old_at, new_at] LOOP
        CONTINUE WHEN at IS NULL;
        hour := pg_catalog.date_trunc('hour', at, 'UTC');
        CONTINUE WHEN hour IS NOT DISTINCT FROM seen;
        seen := hour;
        PERFORM pg_catalog.pg_advisory_xact_lock_shared(
            7246, public.keen_analytics_hour_key(hour));
        IF hour + interval '1 hour' <= pg_catalog.clock_timestamp() THEN
            PERFORM public.keen_analytics_mark_hour(hour);
        END IF;
    END LOOP;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION keen_analytics_mark() FROM PUBLIC;

CREATE TRIGGER agent_sessions_analytics_insert_delete AFTER INSERT OR DELETE ON agent_sessions
    FOR EACH ROW EXECUTE FUNCTION keen_analytics_mark();
-- Only updates of what the analytics read: progress reports and budget moves change tokens and
-- costs, but a heartbeat (last_activity_at) or a phase change costs no trigger call.
CREATE TRIGGER agent_sessions_analytics_update AFTER UPDATE ON agent_sessions
    FOR EACH ROW
    WHEN ((OLD.start_time, OLD.end_time, OLD.execution_status, OLD.is_admin_session,
           OLD.claude_cost_usd, OLD.keen_cost_credits, OLD.tokens_used, OLD.context_tokens_used,
           OLD.session_depth)
          IS DISTINCT FROM
          (NEW.start_time, NEW.end_time, NEW.execution_status, NEW.is_admin_session,
           NEW.claude_cost_usd, NEW.keen_cost_credits, NEW.tokens_used, NEW.context_tokens_used,
           NEW.session_depth))
    EXECUTE FUNCTION keen_analytics_mark();
-- The ledger is append-only; deleting a user still cascades through it.
CREATE TRIGGER credit_transactions_analytics AFTER INSERT OR UPDATE OR DELETE
    ON credit_transactions FOR EACH ROW EXECUTE FUNCTION keen_analytics_mark();

-- The combinable aggregates of the sessions and ledger rows of [p_from, p_to): what one
-- analytics_hourly row stores for its hour, and what the live part adds for each other range.
-- One range per call, its bounds plain parameters: joined to a set of ranges instead, the
-- ledger's BRIN index cannot serve the bounds and the planner reads the whole table.
CREATE FUNCTION keen_analytics_parts(p_from timestamptz, p_to timestamptz)
RETURNS TABLE (
    total_sessions bigint, successful_sessions bigint, failed_sessions bigint,
    cancelled_sessions bigint, timed_out_sessions bigint, running_sessions bigint,
    admin_sessions bigint, ended_sessions bigint, duration_minutes_sum numeric,
    claude_costs_usd numeric, credit_revenue numeric, tokens numeric, context_tokens numeric,
    recursive_sessions bigint, recursion_depth_sum bigint, max_recursion_depth integer,
    credits_purchased numeric, credits_used numeric, admin_bypass_transactions bigint,
    admin_bypass_claude_costs_usd numeric)
LANGUAGE sql STABLE SET search_path = pg_catalog, public, pg_temp
AS $$
    SELECT s.*, t.*
    FROM (
        SELECT count(*) AS n,
               count(*) FILTER (WHERE x.execution_status = 'completed') AS completed,
               count(*) FILTER (WHERE x.execution_status = 'failed') AS failed,
               count(*) FILTER (WHERE x.execution_status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE x.execution_status = 'timed_out') AS timed_out,
               count(*) FILTER (WHERE x.execution_status = 'running') AS running,
               count(*) FILTER (WHERE x.is_admin_session) AS admin,
               count(x.end_time) AS ended,
               sum(extract(epoch FROM x.end_time - x.start_time) / 60)
                   FILTER (WHERE x.end_time IS NOT NULL) AS minutes,
               sum(x.claude_cost_usd) AS usd,
               sum(x.keen_cost_credits) AS revenue,
               sum(x.tokens_used) AS tokens_sum,
               sum(x.context_tokens_used) AS context_sum,
               count(*) FILTER (WHERE x.session_depth > 0) AS recursive,
               sum(x.session_depth) FILTER (WHERE x.session_depth > 0) AS depth_sum,
               max(x.session_depth) FILTER (WHERE x.session_depth > 0) AS depth_max
          FROM public.agent_sessions x
         WHERE x.start_time >= p_from AND x.start_time < p_to
    ) s,
    (
        SELECT sum(c.amount) FILTER (WHERE c.transaction_type = 'purchase') AS purchased,
               sum(abs(c.amount)) FILTER (WHERE c.transaction_type = 'usage') AS used,
               count(*) FILTER (WHERE c.is_admin_bypass) AS bypasses,
               sum(c.claude_cost_usd) FILTER (WHERE c.is_admin_bypass) AS bypass_usd
          FROM public.credit_transactions c
         WHERE c.created_at >= p_from AND c.created_at < p_to
    ) t
$$;
REVOKE ALL ON FUNCTION keen_analytics_parts(timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_analytics_parts(timestamptz, timestamptz) TO keen_system;

-- keen_analytics_window's figures for [p_from, p_to), from the stored clean hours inside it and
-- a live read of the rest. Same type, same numbers; SECURITY INVOKER, for keen_system.
CREATE FUNCTION keen_analytics_rolled(p_from timestamptz, p_to timestamptz)
RETURNS keen_analytics_summary
LANGUAGE sql STABLE SET search_path = pg_catalog, public, pg_temp
AS $$
    WITH stored AS (
        SELECT h.*
          FROM public.analytics_hourly h
         WHERE h.hour_bucket >= p_from AND h.hour_bucket + interval '1 hour' <= p_to
           AND NOT EXISTS (SELECT FROM public.analytics_dirty_hours d
                            WHERE d.hour_bucket = h.hour_bucket)
    ),
    parts AS (
        SELECT total_sessions, successful_sessions, failed_sessions, cancelled_sessions,
               timed_out_sessions, running_sessions, admin_sessions, ended_sessions,
               duration_minutes_sum, claude_costs_usd, credit_revenue, tokens, context_tokens,
               recursive_sessions, recursion_depth_sum, max_recursion_depth, credits_purchased,
               credits_used, admin_bypass_transactions, admin_bypass_claude_costs_usd
          FROM stored
        UNION ALL
        -- The rest of the window: the ranges between the stored hours, each read live.
        SELECT p.*
          FROM unnest(tstzmultirange(tstzrange(p_from, p_to))
                      - (SELECT coalesce(range_agg(tstzrange(hour_bucket,
                                                             hour_bucket + interval '1 hour')),
                                         '{}')
                           FROM stored)) r,
               LATERAL public.keen_analytics_parts(lower(r), upper(r)) p
    )
    SELECT ROW(
        p_from, p_to,
        u.total_users, u.active_users, u.new_users,
        coalesce(sum(p.total_sessions), 0)::bigint,
        coalesce(sum(p.successful_sessions), 0)::bigint,
        coalesce(sum(p.failed_sessions), 0)::bigint,
        coalesce(sum(p.cancelled_sessions), 0)::bigint,
        coalesce(sum(p.timed_out_sessions), 0)::bigint,
        coalesce(sum(p.running_sessions), 0)::bigint,
        coalesce(sum(p.admin_sessions), 0)::bigint,
        -- avg() is numeric sum / count: the same division, so the same rounding
        round(sum(p.duration_minutes_sum) / nullif(sum(p.ended_sessions), 0), 2),
        coalesce(sum(p.claude_costs_usd), 0),
        coalesce(sum(p.credit_revenue), 0),
        coalesce(sum(p.tokens), 0),
        coalesce(sum(p.context_tokens), 0),
        coalesce(sum(p.recursive_sessions), 0)::bigint,
        round(sum(p.recursion_depth_sum) / nullif(sum(p.recursive_sessions), 0), 2),
        max(p.max_recursion_depth),
        coalesce(sum(p.credits_purchased), 0),
        coalesce(sum(p.credits_used), 0),
        coalesce(sum(p.admin_bypass_transactions), 0)::bigint,
        coalesce(sum(p.admin_bypass_claude_costs_usd), 0)
    )::public.keen_analytics_summary
    FROM parts p,
    (
        SELECT count(*) FILTER (WHERE created_at < p_to) AS total_users,
               count(*) FILTER (WHERE last_login_at >= p_from AND last_login_at < p_to)
                   AS active_users,
               count(*) FILTER (WHERE created_at >= p_from AND created_at < p_to)
                   AS new_users
          FROM public.users
    ) u
    GROUP BY u.total_users, u.active_users, u.new_users
$$;
REVOKE ALL ON FUNCTION keen_analytics_rolled(timestamptz, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_analytics_rolled(timestamptz, timestamptz) TO keen_system;

-- Roll one ended hour (or roll it again): its row is replaced by what its rows say now, and its
-- mark is cleared. Call it in a transaction of its own (a roll holding two hours' locks could
-- deadlock with a writer holding the other one). Returns false for an hour not ended yet,
-- or one its writers kept busy.
CREATE FUNCTION keen_analytics_roll_hour(p_hour timestamptz) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF p_hour <> date_trunc('hour', p_hour, 'UTC') THEN
        RAISE EXCEPTION 'not the start of a UTC hour: %', p_hour USING ERRCODE = '22023';
    END IF;
    IF p_hour + interval '1 hour' > clock_timestamp() THEN
        RETURN false;
    END IF;
    -- Its reads must come after the lock: a transaction snapshot (REPEATABLE READ) taken before
    -- would leave out a writer it waited for.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'an analytics roll runs in READ COMMITTED, not %',
            current_setting('transaction_isolation') USING ERRCODE = '25001';
    END IF;
    -- Wait for the hour's writers by retrying, not in the lock's queue: a queued exclusive
    -- request makes every later writer to the hour wait behind it, for as long as one writer
    -- keeps its transaction open. Still busy after 5 s: left to the next run (read live).
    FOR i IN 1 .. 250 LOOP
        EXIT WHEN pg_try_advisory_xact_lock(7246, public.keen_analytics_hour_key(p_hour));
        IF i = 250 THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.02);
    END LOOP;
    -- A new snapshot per statement from here (READ COMMITTED, VOLATILE): every writer that held
    -- the lock has committed and is seen.
    DELETE FROM public.analytics_dirty_hours WHERE hour_bucket = p_hour;
    INSERT INTO public.analytics_hourly AS a
    SELECT p_hour, p.*, clock_timestamp()
      FROM public.keen_analytics_parts(p_hour, p_hour + interval '1 hour') p
    ON CONFLICT (hour_bucket) DO UPDATE SET
        total_sessions = EXCLUDED.total_sessions,
        successful_sessions = EXCLUDED.successful_sessions,
        failed_sessions = EXCLUDED.failed_sessions,
        cancelled_sessions = EXCLUDED.cancelled_sessions,
        timed_out_sessions = EXCLUDED.timed_out_sessions,
        running_sessions = EXCLUDED.running_sessions,
        admin_sessions = EXCLUDED.admin_sessions,
        ended_sessions = EXCLUDED.ended_sessions,
        duration_minutes_sum = EXCLUDED.duration_minutes_sum,
        claude_costs_usd = EXCLUDED.claude_costs_usd,
        credit_revenue = EXCLUDED.credit_revenue,
        tokens = EXCLUDED.tokens,
        context_tokens = EXCLUDED.context_tokens,
        recursive_sessions = EXCLUDED.recursive_sessions,
        recursion_depth_sum = EXCLUDED.recursion_depth_sum,
        max_recursion_depth = EXCLUDED.max_recursion_depth,
        credits_purchased = EXCLUDED.credits_purchased,
        credits_used = EXCLUDED.credits_used,
        admin_bypass_transactions = EXCLUDED.admin_bypass_transactions,
        admin_bypass_claude_costs_usd = EXCLUDED.admin_bypass_claude_costs_usd,
        rolled_at = EXCLUDED.rolled_at;
    RETURN true;
END $$;
REVOKE ALL ON FUNCTION keen_analytics_roll_hour(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_analytics_roll_hour(timestamptz) TO keen_system;

-- The ended hours a roll should (re)compute: every hour from p_since when given (a backfill);
-- otherwise the hours never rolled, from the first user or session on, and the marked ones.
CREATE FUNCTION keen_analytics_hours_to_roll(p_since timestamptz)
RETURNS SETOF timestamptz
LANGUAGE sql STABLE SET search_path = pg_catalog, public, pg_temp
AS $$
    WITH bounds AS (
        SELECT date_trunc('hour', coalesce(p_since, least(
                   (SELECT min(created_at) FROM public.users),
                   (SELECT min(start_time) FROM public.agent_sessions),
                   (SELECT min(hour_bucket) FROM public.analytics_hourly))), 'UTC') AS first,
               date_trunc('hour', clock_timestamp(), 'UTC') - interval '1 hour' AS last
    )
    SELECT h FROM bounds b, generate_series(b.first, b.last, interval '1 hour') h
     WHERE p_since IS NOT NULL
        OR NOT EXISTS (SELECT FROM public.analytics_hourly a WHERE a.hour_bucket = h)
    UNION
    SELECT d.hour_bucket FROM public.analytics_dirty_hours d
     WHERE d.hour_bucket + interval '1 hour' <= clock_timestamp()
    ORDER BY 1
$$;
REVOKE ALL ON FUNCTION keen_analytics_hours_to_roll(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_analytics_hours_to_roll(timestamptz) TO keen_system;

-- Admin analytics: rolled hours plus the live rest (keen_analytics_rolled), after the check.
CREATE FUNCTION keen_admin_analytics(p_from timestamptz, p_to timestamptz)
RETURNS keen_analytics_summary
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF NOT public.keen_can_view_analytics() THEN
        RAISE EXCEPTION 'Insufficient privileges for analytics access'
            USING ERRCODE = 'KS403';
    END IF;
    RETURN public.keen_analytics_rolled(p_from, p_to);
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
