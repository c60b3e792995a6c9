-- keen_stream's schema, part 2 of 5: agent sessions (docs/sessions.md).
--
-- What the schema guarantees:
-- - root_session_id, session_depth, is_admin_session and bypass_credit_deduction are derived
--   by a BEFORE INSERT trigger from the parent row and the owner's account; a parent must
--   belong to the same user and still be running.
-- - keen_app may insert only the caller-chosen columns and update only progress, outcome and
--   budget columns; it may not delete sessions (they are history the ledger points at).
-- - Once a session has ended, keen_app cannot change it; counters never decrease; costs and
--   the outcome are written only in the transition that ends a session.
-- Before the ledger: credit rows and holds reference agent_sessions. The stream's capture
-- triggers on this table are in events.sql, the analytics over it in analytics.sql.

CREATE TABLE agent_sessions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    session_id VARCHAR(64) NOT NULL,
    parent_session_id UUID REFERENCES agent_sessions(id),
    root_session_id UUID NOT NULL REFERENCES agent_sessions(id),
    session_depth INTEGER NOT NULL DEFAULT 0,
    git_branch VARCHAR(255) NOT NULL,
    vision TEXT NOT NULL,
    working_directory TEXT NOT NULL,
    current_phase VARCHAR(20) NOT NULL DEFAULT 'EXPLORE',
    start_time TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    end_time TIMESTAMP WITH TIME ZONE,
    last_activity_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    iteration_count INTEGER NOT NULL DEFAULT 0,
    tool_calls_count INTEGER NOT NULL DEFAULT 0,
    claude_cost_usd NUMERIC(18,6) NOT NULL DEFAULT 0,
    keen_cost_credits NUMERIC(18,6) NOT NULL DEFAULT 0,
    tokens_used BIGINT NOT NULL DEFAULT 0,
    context_tokens_used BIGINT NOT NULL DEFAULT 0,
    files_modified TEXT[] NOT NULL DEFAULT '{}',
    files_created TEXT[] NOT NULL DEFAULT '{}',
    files_deleted TEXT[] NOT NULL DEFAULT '{}',
    execution_status VARCHAR(20) NOT NULL DEFAULT 'running',
    success BOOLEAN,
    error_message TEXT,
    completion_report JSONB,
    streaming_enabled BOOLEAN NOT NULL DEFAULT TRUE,
    websocket_connections TEXT[] NOT NULL DEFAULT '{}',
    is_admin_session BOOLEAN NOT NULL DEFAULT FALSE,
    bypass_credit_deduction BOOLEAN NOT NULL DEFAULT FALSE,
    credit_budget NUMERIC(18,6),
    budget_used NUMERIC(18,6) NOT NULL DEFAULT 0,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    CONSTRAINT agent_sessions_session_id_key UNIQUE (session_id),
    CONSTRAINT agent_sessions_session_id_check CHECK (session_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    CONSTRAINT agent_sessions_current_phase_check
        CHECK (current_phase IN ('EXPLORE', 'PLAN', 'SUMMON', 'COMPLETE')),
    CONSTRAINT agent_sessions_execution_status_check
        CHECK (execution_status IN ('running', 'completed', 'failed', 'cancelled', 'timed_out')),
    CONSTRAINT agent_sessions_depth_check CHECK (session_depth >= 0),
    CONSTRAINT agent_sessions_parent_depth_check
        CHECK ((parent_session_id IS NULL) = (session_depth = 0)),
    -- A root is its own root: the ledger finds a subtree's budget through this column.
    CONSTRAINT agent_sessions_root_check
        CHECK ((parent_session_id IS NULL) = (root_session_id = id)),
    CONSTRAINT agent_sessions_counters_nonnegative
        CHECK (iteration_count >= 0 AND tool_calls_count >= 0 AND tokens_used >= 0
               AND context_tokens_used >= 0),
    CONSTRAINT agent_sessions_costs_nonnegative
        CHECK (claude_cost_usd >= 0 AND keen_cost_credits >= 0),
    CONSTRAINT agent_sessions_budget_check
        CHECK ((credit_budget IS NULL OR credit_budget > 0) AND budget_used >= 0),
    CONSTRAINT agent_sessions_budget_root_only
        CHECK (credit_budget IS NULL OR parent_session_id IS NULL),
    -- The ledger takes budget with "budget_used + x <= credit_budget"; this holds every writer
    -- to it, set_budget included.
    CONSTRAINT agent_sessions_budget_not_exceeded
        CHECK (credit_budget IS NULL OR budget_used <= credit_budget),
    CONSTRAINT agent_sessions_ended_check
        CHECK ((execution_status = 'running') = (end_time IS NULL)),
    -- 'completed' means success; every other end is a failure; a running session has no
    -- verdict.
    CONSTRAINT agent_sessions_success_check
        CHECK (CASE execution_status
                   WHEN 'running' THEN success IS NULL
                   WHEN 'completed' THEN success IS TRUE
                   ELSE success IS FALSE
               END),
    -- Limits mirrored by keen_stream/dal/models/sessions.py (the DAL refuses earlier, with the
    -- field): 10,000 files per list, a 1 MiB report.
    CONSTRAINT agent_sessions_sizes_check
        CHECK (length(vision) BETWEEN 1 AND 100000
               AND length(working_directory) BETWEEN 1 AND 4096
               AND length(git_branch) >= 1
               AND (error_message IS NULL OR length(error_message) <= 10000)
               AND cardinality(files_created) <= 10000
               AND cardinality(files_modified) <= 10000
               AND cardinality(files_deleted) <= 10000),
    CONSTRAINT agent_sessions_report_check
        CHECK (completion_report IS NULL
               OR (jsonb_typeof(completion_report) = 'object'
                   AND pg_column_size(completion_report) <= 1048576))
);
CREATE INDEX idx_agent_sessions_parent_session_id ON agent_sessions(parent_session_id);
CREATE INDEX idx_agent_sessions_root_session_id ON agent_sessions(root_session_id);
-- Keyset pages of one user's sessions, newest first (scanned backwards).
CREATE INDEX idx_agent_sessions_user_start ON agent_sessions (user_id, start_time, id);
-- The admin's everyone-list and the analytics windows.
CREATE INDEX idx_agent_sessions_start ON agent_sessions (start_time, id);
-- The sweep reads only running sessions; ended ones (the vast majority) are not in it.
CREATE INDEX idx_agent_sessions_running_activity ON agent_sessions (last_activity_at)
    WHERE execution_status = 'running';
-- No index on current_phase or is_admin_session: no query filters on them, and each index is
-- written on every phase change and keeps such updates from being HOT.

-- Derived columns are the database's to set, whoever inserts. SECURITY DEFINER so it reads
-- the parent and the owner's account whatever the inserting role may see.
CREATE FUNCTION keen_sessions_before_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
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
END $$;
ALTER FUNCTION keen_sessions_before_insert() OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_sessions_before_insert() FROM PUBLIC;

-- Column grants say which columns keen_app may touch; this says when.
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
END $$;
REVOKE ALL ON FUNCTION keen_sessions_guard() FROM PUBLIC;

CREATE TRIGGER agent_sessions_touch_updated_at BEFORE UPDATE ON agent_sessions
    FOR EACH ROW EXECUTE FUNCTION keen_touch_updated_at();
CREATE TRIGGER agent_sessions_derive BEFORE INSERT ON agent_sessions
    FOR EACH ROW EXECUTE FUNCTION keen_sessions_before_insert();
CREATE TRIGGER agent_sessions_guard BEFORE UPDATE ON agent_sessions
    FOR EACH ROW EXECUTE FUNCTION keen_sessions_guard();

-- Append the items not already present, in first-seen order. Evaluated inside the UPDATE, so
-- concurrent appends each see the row version they are applied to.
CREATE FUNCTION keen_append_distinct(existing text[], additions text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT coalesce(existing, '{}') || ARRAY(
        SELECT a FROM unnest(additions) WITH ORDINALITY AS t(a, n)
         WHERE NOT (a = ANY (coalesce(existing, '{}')))
         GROUP BY a ORDER BY min(n))
$$;
REVOKE ALL ON FUNCTION keen_append_distinct(text[], text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_append_distinct(text[], text[]) TO keen_app, keen_system;

-- One round trip that resolves the parent handle under RLS (so another tenant's parent is
-- simply not found), enforces the depth limit and inserts. SECURITY INVOKER: it runs as
-- keen_app, under the caller's RLS and column grants.
CREATE FUNCTION keen_session_create(
    p_user_id uuid, p_session_id text, p_parent text, p_git_branch text, p_vision text,
    p_working_directory text, p_streaming boolean, p_max_depth integer)
RETURNS SETOF agent_sessions
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
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
                DETAIL = json_build_object('field', 'parent_session_handle')::text;
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
END $$;
REVOKE ALL ON FUNCTION keen_session_create(uuid, text, text, text, text, text, boolean, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_session_create(uuid, text, text, text, text, text, boolean, integer)
    TO keen_app, keen_system;

-- A progress report in one statement, whose implicit transaction commits on the server as soon
-- as the statement ends: the stream releases an event only once every older transaction has
-- ended, so a progress transaction held open across a client round trip delayed every event.
-- It runs as the tenant, under RLS and the session guard: the caller switches the role and the
-- user in the call's own arguments (KeenDatabase.tenant_call: set_config('role', 'keen_app',
-- true) is p_role, evaluated before the body runs). SECURITY INVOKER, and it refuses to run as
-- anyone but keen_app: called without that switch it would not be filtered by RLS. Increments
-- and appends are computed on the row version the UPDATE changes, so concurrent reports each
-- add to the other's result. An ended session makes the guard trigger raise
-- SessionAlreadyEnded.
CREATE FUNCTION keen_session_progress(
    p_role text, p_user uuid, p_handle text, p_phase text,
    p_iterations integer, p_tool_calls integer, p_tokens bigint, p_context_tokens bigint,
    p_created text[], p_modified text[], p_deleted text[])
RETURNS SETOF agent_sessions
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    IF current_user <> 'keen_app' THEN
        RAISE EXCEPTION 'keen_session_progress runs only as keen_app (under RLS)'
            USING ERRCODE = '42501';
    END IF;
    RETURN QUERY
    UPDATE agent_sessions s SET
        current_phase = coalesce(p_phase, s.current_phase),
        iteration_count = s.iteration_count + p_iterations,
        tool_calls_count = s.tool_calls_count + p_tool_calls,
        tokens_used = s.tokens_used + p_tokens,
        context_tokens_used = s.context_tokens_used + p_context_tokens,
        files_created = keen_append_distinct(s.files_created, p_created),
        files_modified = keen_append_distinct(s.files_modified, p_modified),
        files_deleted = keen_append_distinct(s.files_deleted, p_deleted),
        last_activity_at = now()
    WHERE s.session_id = p_handle AND s.user_id = p_user
    RETURNING s.*;
END $$;
REVOKE ALL ON FUNCTION keen_session_progress(text, uuid, text, text, integer, integer, bigint, bigint, text[], text[], text[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_session_progress(text, uuid, text, text, integer, integer, bigint, bigint, text[], text[], text[])
    TO keen_app;

ALTER TABLE agent_sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE agent_sessions FORCE ROW LEVEL SECURITY;
CREATE POLICY agent_sessions_select ON agent_sessions FOR SELECT TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY agent_sessions_insert ON agent_sessions FOR INSERT TO keen_app
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY agent_sessions_update ON agent_sessions FOR UPDATE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY agent_sessions_delete ON agent_sessions FOR DELETE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));

-- keen_app may not delete sessions: they are history the ledger points at.
GRANT SELECT ON agent_sessions TO keen_app;
GRANT INSERT (user_id, session_id, parent_session_id, git_branch, vision, working_directory,
              streaming_enabled) ON agent_sessions TO keen_app;
GRANT UPDATE (current_phase, last_activity_at, iteration_count, tool_calls_count, tokens_used,
              context_tokens_used, files_modified, files_created, files_deleted, end_time,
              execution_status, success, error_message, completion_report, claude_cost_usd,
              keen_cost_credits, credit_budget, streaming_enabled, websocket_connections)
    ON agent_sessions TO keen_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON agent_sessions TO keen_system;
-- Session budgets: the ledger's functions (keen_ledger, ledger.sql) read sessions and take and
-- give back budget_used under the root row's lock.
GRANT SELECT, UPDATE (budget_used) ON agent_sessions TO keen_ledger;
