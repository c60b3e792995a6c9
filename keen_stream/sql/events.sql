-- keen_stream's schema, part 4 of 5: the event outbox for the streaming hub, hub nodes and
-- WebSocket connection records (docs/architecture.md has the long form).
--
-- - Triggers on agent_sessions and credit_transactions append a row to stream_events in the
--   writing transaction, so an event exists if and only if its change committed. They never
--   call pg_notify: a notifying transaction takes a cluster-wide lock through its commit. The
--   wake-up is sent after commit, outside the business transaction.
-- - Each row stores its position (xid8, column xid): the writing transaction's id plus the
--   cluster's offset (stream_state; 0 on the cluster that created the database). Readers
--   deliver in (xid, id) order and only rows whose position is below the "horizon" (the oldest
--   transaction of this database still running, shifted by the same offset), so a transaction
--   that holds an early id and commits late is waited for, never skipped. Restored on another
--   cluster, the first writer raises the offset so new positions continue above the restored
--   ones (migration 0009).
-- - id is drawn while the writer holds the entity's row lock (the session row; for credit rows,
--   the account row the ledger locks first), so it doubles as a per-entity version.

-- === Positions across clusters ================================================================
-- A position is the writing transaction's xid plus xid_offset. A transaction id belongs to one
-- cluster: restored from a dump on another cluster, the database keeps the old numbers while
-- the new cluster counts from wherever its initdb left them. The row says which cluster the
-- offset was set on (system_identifier) and which server start last confirmed it
-- (postmaster_start: comparing that variable is cheap; pg_control_system() reads the control
-- file, ~14 us). The schema seeds the row unclaimed (NULLs: the same on every cluster). The
-- hub's listener, `keen-stream backup` and `restore`, and else the first writer of a server
-- start that has not been seen call
-- keen_stream_claim(): same cluster, it records the start; another cluster, it raises the
-- offset so new positions start 2^32 above everything kept and records the skipped range:
-- cursors in (gap_from, gap_to) were issued by the old cluster after the backup was taken,
-- and a resume from one gets since_unknown.
CREATE TABLE stream_state (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    system_identifier BIGINT,
    postmaster_start TIMESTAMP WITH TIME ZONE,
    xid_offset BIGINT NOT NULL DEFAULT 0 CHECK (xid_offset >= 0),
    gap_from xid8,
    gap_to xid8,
    moved_at TIMESTAMP WITH TIME ZONE,
    CONSTRAINT stream_state_gap_check CHECK ((gap_from IS NULL) = (gap_to IS NULL))
);
INSERT INTO stream_state DEFAULT VALUES;

GRANT SELECT ON stream_state TO keen_app;
GRANT SELECT, UPDATE ON stream_state TO keen_system;

-- xid8 has no arithmetic; numeric carries the sum exactly.
CREATE FUNCTION keen_stream_shift(p_xid xid8, p_offset bigint) RETURNS xid8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (p_xid::text::numeric + p_offset)::text::xid8 $$;
REVOKE ALL ON FUNCTION keen_stream_shift(xid8, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_stream_shift(xid8, bigint) TO keen_app, keen_system;

-- The offset of this cluster, for readers (who cannot write the claim): NULL when the database
-- was restored on another cluster and no writer has claimed it yet. PL/pgSQL, not SQL: its
-- plans are cached for the session, where a SQL function with a FROM clause is planned again
-- in every transaction (that halved the listener's tail reads).
CREATE FUNCTION keen_stream_offset() RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    off bigint;
BEGIN
    SELECT s.xid_offset INTO off FROM public.stream_state s
     WHERE s.postmaster_start = pg_postmaster_start_time();
    IF NOT FOUND THEN
        SELECT s.xid_offset INTO off FROM public.stream_state s
         WHERE s.system_identifier = (SELECT c.system_identifier FROM pg_control_system() c);
    END IF;
    RETURN off;
END $$;
REVOKE ALL ON FUNCTION keen_stream_offset() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_stream_offset() TO keen_app, keen_system;

-- Confirm (or move) the offset for this server start; returns it. The row lock serializes
-- concurrent claimers: the second one finds the row already moved. A new cluster whose ids are
-- already past the new start needs no offset (it never goes below 0).
CREATE FUNCTION keen_stream_claim() RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    here bigint := (SELECT c.system_identifier FROM pg_control_system() c);
    state public.stream_state;
    top xid8;
    base numeric;
BEGIN
    SELECT * INTO STRICT state FROM public.stream_state FOR UPDATE;
    SELECT e.xid INTO top FROM public.stream_events e ORDER BY e.xid DESC LIMIT 1;
    top := greatest(top, state.gap_to,
                    (SELECT r.pruned_xid FROM public.stream_retention r), '0'::xid8);
    -- Never claimed (the row as the schema seeds it): the rows kept were written here with
    -- offset 0, unless they are ahead of this cluster's transaction ids.
    IF state.system_identifier IS DISTINCT FROM here AND (state.system_identifier IS NOT NULL
            OR top::text::numeric >= pg_current_xact_id()::text::numeric) THEN
        base := top::text::numeric + 4294967296;
        -- Relative to the oldest transaction still running, not to this one: a writer may
        -- hold an xid from before this claim and write its event after it. Every running
        -- and later transaction has an xid >= the snapshot's xmin, so every new position
        -- is >= base, outside the skipped range (a cursor there is refused as never issued).
        state.xid_offset := greatest(
            base - pg_snapshot_xmin(pg_current_snapshot())::text::numeric, 0);
        state.gap_from := top;
        state.gap_to := base::text::xid8;
        state.moved_at := now();
        RAISE NOTICE 'keen_stream: a new cluster; stream positions continue at %', base;
    END IF;
    UPDATE public.stream_state
       SET system_identifier = here, postmaster_start = pg_postmaster_start_time(),
           xid_offset = state.xid_offset, gap_from = state.gap_from,
           gap_to = state.gap_to, moved_at = state.moved_at;
    RETURN state.xid_offset;
END $$;
REVOKE ALL ON FUNCTION keen_stream_claim() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_stream_claim() TO keen_system;

-- The default of stream_events.xid: the calling transaction's position. One singleton read per
-- event; the claim runs once per server start.
CREATE FUNCTION keen_stream_next_position() RETURNS xid8
LANGUAGE plpgsql
AS $$
DECLARE
    off bigint;
BEGIN
    SELECT s.xid_offset INTO off FROM public.stream_state s
     WHERE s.postmaster_start = pg_postmaster_start_time();
    IF off IS NULL THEN
        off := public.keen_stream_claim();
    END IF;
    RETURN public.keen_stream_shift(pg_current_xact_id(), off);
END $$;
REVOKE ALL ON FUNCTION keen_stream_next_position() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_stream_next_position() TO keen_system;

-- === The outbox ===============================================================================
-- No foreign keys: each would add a lookup and a KEY SHARE lock on the users/sessions row to
-- every business write, and events are short-lived (pruned after the retention window).
-- The one index serves tailing, replay ranges and pruning (all in stream order).
CREATE TABLE stream_events (
    xid xid8 NOT NULL DEFAULT keen_stream_next_position(),
    id BIGINT GENERATED ALWAYS AS IDENTITY,
    user_id UUID NOT NULL,
    session_id UUID,
    root_session_id UUID,
    event_type VARCHAR(40) NOT NULL,
    payload JSONB NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    CONSTRAINT stream_events_pkey PRIMARY KEY (xid, id)
);

-- What pruning has removed: one watermark says what a resuming client can no longer get.
CREATE TABLE stream_retention (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    pruned_xid xid8 NOT NULL DEFAULT '0',
    pruned_id BIGINT NOT NULL DEFAULT 0,
    pruned_at TIMESTAMP WITH TIME ZONE
);
INSERT INTO stream_retention DEFAULT VALUES;

-- A tenant may read its own events (resume/replay runs as the user); admins read all.
-- keen_app has no INSERT/UPDATE/DELETE grant here (triggers write as keen_system); the
-- policies keep the one-policy-per-command rule, so a future grant cannot open the table.
ALTER TABLE stream_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE stream_events FORCE ROW LEVEL SECURITY;
CREATE POLICY stream_events_select ON stream_events FOR SELECT TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY stream_events_insert ON stream_events FOR INSERT TO keen_app
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY stream_events_update ON stream_events FOR UPDATE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY stream_events_delete ON stream_events FOR DELETE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));

GRANT SELECT ON stream_events, stream_retention TO keen_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON stream_events, stream_retention TO keen_system;

-- === Capture ==================================================================================
-- The after-commit wake-up's trigger. A DAL connection (started with keen.stream_signal=on)
-- gets one NOTICE per transaction that wrote events; after its commit the DAL sends a
-- coalesced NOTIFY from its own connection. Other clients (psql, other services) see
-- nothing; their events are found by the hub's fallback poll. The setting is transaction-
-- local, so it reads 'on' again in the next transaction.
CREATE FUNCTION keen_stream_signal() RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF current_setting('keen.stream_signal', true) = 'on' THEN
        PERFORM set_config('keen.stream_signal', 'sent', true);
        RAISE NOTICE 'keen_stream event' USING ERRCODE = 'KSE01';
    END IF;
END $$;
REVOKE ALL ON FUNCTION keen_stream_signal() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_stream_signal() TO keen_system;

-- SECURITY DEFINER (owned by keen_system): tenants get no INSERT on stream_events, so they
-- cannot forge events; the trigger writes on their behalf. Money goes out as strings.
CREATE FUNCTION keen_stream_capture_session() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    kind text;
    data jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        kind := 'session.created';
    ELSIF NEW.execution_status IS DISTINCT FROM OLD.execution_status THEN
        kind := CASE WHEN OLD.execution_status = 'running' THEN 'session.completed'
                     ELSE 'session.status_changed' END;
    ELSIF NEW.current_phase IS DISTINCT FROM OLD.current_phase THEN
        kind := 'session.phase_changed';
    ELSE
        kind := 'session.progress';
    END IF;
    data := jsonb_build_object(
        'session_handle', NEW.session_id,
        'parent_session_id', NEW.parent_session_id,
        'root_session_id', NEW.root_session_id,
        'depth', NEW.session_depth,
        'phase', NEW.current_phase,
        'status', NEW.execution_status,
        'iteration_count', NEW.iteration_count,
        'tool_calls_count', NEW.tool_calls_count,
        'tokens_used', NEW.tokens_used,
        'context_tokens_used', NEW.context_tokens_used,
        'claude_cost_usd', NEW.claude_cost_usd::text,
        'keen_cost_credits', NEW.keen_cost_credits::text,
        'credit_budget', NEW.credit_budget::text,
        'budget_used', NEW.budget_used::text,
        'files_modified', cardinality(NEW.files_modified),
        'files_created', cardinality(NEW.files_created),
        'files_deleted', cardinality(NEW.files_deleted),
        'start_time', NEW.start_time,
        'end_time', NEW.end_time,
        'is_admin_session', NEW.is_admin_session);
    IF TG_OP = 'INSERT' THEN
        data := data || jsonb_build_object('git_branch', NEW.git_branch);
    ELSIF kind = 'session.phase_changed' THEN
        data := data || jsonb_build_object('previous_phase', OLD.current_phase);
    END IF;
    IF NEW.execution_status <> 'running' THEN
        data := data || jsonb_build_object(
            'success', NEW.success, 'error_message', left(NEW.error_message, 500));
    END IF;
    INSERT INTO public.stream_events (user_id, session_id, root_session_id, event_type, payload)
    VALUES (NEW.user_id, NEW.id, coalesce(NEW.root_session_id, NEW.id), kind, data);
    PERFORM keen_stream_signal();
    RETURN NULL;
END $$;
ALTER FUNCTION keen_stream_capture_session() OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_stream_capture_session() FROM PUBLIC;

CREATE FUNCTION keen_stream_capture_credit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    root uuid;
BEGIN
    IF NEW.session_id IS NOT NULL THEN
        SELECT s.root_session_id INTO root
          FROM public.agent_sessions s WHERE s.id = NEW.session_id;
    END IF;
    INSERT INTO public.stream_events (user_id, session_id, root_session_id, event_type, payload)
    VALUES (NEW.user_id, NEW.session_id, coalesce(root, NEW.session_id),
            'credit.' || NEW.transaction_type,
            jsonb_build_object(
                'transaction_id', NEW.id,
                'account_id', NEW.account_id,
                'transaction_type', NEW.transaction_type,
                'amount', NEW.amount::text,
                'balance_after', NEW.balance_after::text,
                'claude_cost_usd', NEW.claude_cost_usd::text,
                'description', left(NEW.description, 200),
                'is_admin_bypass', NEW.is_admin_bypass,
                'created_at', NEW.created_at));
    PERFORM keen_stream_signal();
    RETURN NULL;
END $$;
ALTER FUNCTION keen_stream_capture_credit() OWNER TO keen_system;
REVOKE ALL ON FUNCTION keen_stream_capture_credit() FROM PUBLIC;

CREATE TRIGGER agent_sessions_stream_insert AFTER INSERT ON agent_sessions
    FOR EACH ROW WHEN (NEW.streaming_enabled)
    EXECUTE FUNCTION keen_stream_capture_session();
-- The WHEN clause is evaluated in C before any PL/pgSQL runs: updates that change nothing a
-- client shows (last_activity_at alone is a heartbeat, the streaming flags) cost no event and
-- no function call.
CREATE TRIGGER agent_sessions_stream_update AFTER UPDATE ON agent_sessions
    FOR EACH ROW WHEN (NEW.streaming_enabled AND (
        OLD.current_phase, OLD.execution_status, OLD.iteration_count, OLD.tool_calls_count,
        OLD.tokens_used, OLD.context_tokens_used, OLD.claude_cost_usd, OLD.keen_cost_credits,
        OLD.budget_used, OLD.credit_budget, OLD.success, OLD.error_message, OLD.end_time,
        OLD.files_modified, OLD.files_created, OLD.files_deleted
    ) IS DISTINCT FROM (
        NEW.current_phase, NEW.execution_status, NEW.iteration_count, NEW.tool_calls_count,
        NEW.tokens_used, NEW.context_tokens_used, NEW.claude_cost_usd, NEW.keen_cost_credits,
        NEW.budget_used, NEW.credit_budget, NEW.success, NEW.error_message, NEW.end_time,
        NEW.files_modified, NEW.files_created, NEW.files_deleted))
    EXECUTE FUNCTION keen_stream_capture_session();
CREATE TRIGGER credit_transactions_stream AFTER INSERT ON credit_transactions
    FOR EACH ROW EXECUTE FUNCTION keen_stream_capture_credit();

-- === Reading the stream =======================================================================
-- The delivery horizon, as a position: every transaction with a smaller xid has finished, and
-- no future transaction can get one, so rows below it are final. It is the oldest xid still
-- running in the statement's snapshot, skipping transactions that pg_stat_activity says belong
-- to another database (they cannot write our outbox): on a shared cluster someone else's long
-- transaction does not stall our stream. An xid we cannot place counts as ours (safe side).
-- Shifted by the cluster's offset; on an unclaimed restored database, just past the newest
-- row (all of them are final). STABLE: it must use the calling statement's snapshot, the one
-- the tail query reads with (a STABLE PL/pgSQL function runs in its caller's snapshot).
-- PL/pgSQL since 0009: its plans are cached for the session, where the SQL function was planned
-- again on every call (the listener calls it whenever committed rows wait).
CREATE FUNCTION keen_stream_horizon() RETURNS xid8
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    off bigint := keen_stream_offset();
    newest xid8;
    running xid8;
BEGIN
    IF off IS NULL THEN
        SELECT e.xid INTO newest FROM stream_events e ORDER BY e.xid DESC LIMIT 1;
        RETURN coalesce(keen_stream_shift(newest, 1), '0'::xid8);
    END IF;
    SELECT min(x) INTO running FROM pg_snapshot_xip(pg_current_snapshot()) AS x
     WHERE NOT EXISTS (
         SELECT 1 FROM pg_stat_get_activity(NULL) AS a
          WHERE a.backend_xid = x::xid
            AND a.datid <> (SELECT d.oid FROM pg_database d
                             WHERE d.datname = current_database()));
    RETURN keen_stream_shift(coalesce(running, pg_snapshot_xmax(pg_current_snapshot())), off);
END $$;
REVOKE ALL ON FUNCTION keen_stream_horizon() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_stream_horizon() TO keen_app, keen_system;

-- The tail's position in one call: the horizon and whether committed rows wait beyond it.
-- Fast path: the snapshot's xmin is a valid horizon (conservative), and when no committed row
-- waits at or beyond it there is nothing to gain from refining it, so the common case never
-- reads pg_stat_activity. The newest event's xid is read by a backward walk of the primary key,
-- a plan with no parameter: with "EXISTS (... WHERE xid >= horizon)" PL/pgSQL's cached generic
-- plan expected a third of the table to match and scanned the whole outbox whenever nothing
-- waited (the usual case), so every tail read grew with the retention window. STABLE: the
-- caller's snapshot.
CREATE FUNCTION keen_stream_position(OUT horizon xid8, OUT pending boolean)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    newest xid8;
    off bigint;
BEGIN
    -- No parameter in this plan, so no generic plan can turn it into a table scan.
    SELECT e.xid INTO newest FROM stream_events e ORDER BY e.xid DESC LIMIT 1;
    off := keen_stream_offset();
    IF off IS NULL THEN
        -- Restored on another cluster that no writer has claimed yet: every stored row is
        -- final, and the claim puts every new position above them.
        horizon := coalesce(keen_stream_shift(newest, 1), '0'::xid8);
        pending := false;
        RETURN;
    END IF;
    horizon := keen_stream_shift(pg_snapshot_xmin(pg_current_snapshot()), off);
    pending := coalesce(newest >= horizon, false);
    IF pending THEN
        horizon := keen_stream_horizon();
        pending := newest >= horizon;
    END IF;
END $$;
REVOKE ALL ON FUNCTION keen_stream_position() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_stream_position() TO keen_app, keen_system;

-- One batch of retention pruning. It deletes the longest prefix of the stream (in delivery
-- order) whose events are older than the window, so "pruned" is always a prefix and one
-- watermark says what a resuming client can no longer get. Returns rows deleted (0: done).
CREATE FUNCTION keen_stream_prune(p_keep interval, p_batch integer) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    cutoff timestamptz := now() - p_keep;
    horizon xid8 := keen_stream_horizon();
    stop_xid xid8;
    stop_id bigint;
    cut_xid xid8;
    cut_id bigint;
    deleted bigint;
BEGIN
    IF p_batch IS NULL OR p_batch < 1 OR p_keep IS NULL OR p_keep < interval '0' THEN
        RAISE EXCEPTION 'invalid prune arguments' USING ERRCODE = 'KS400';
    END IF;
    -- Another node is pruning: let it.
    IF NOT pg_try_advisory_xact_lock(7246815530011004) THEN
        RETURN 0;
    END IF;
    SELECT h.xid, h.id INTO stop_xid, stop_id
      FROM (SELECT e.xid, e.id, e.created_at FROM stream_events e
             ORDER BY e.xid, e.id LIMIT p_batch) h
     WHERE h.created_at >= cutoff OR h.xid >= horizon
     ORDER BY h.xid, h.id LIMIT 1;
    SELECT h.xid, h.id INTO cut_xid, cut_id
      FROM (SELECT e.xid, e.id FROM stream_events e
             ORDER BY e.xid, e.id LIMIT p_batch) h
     WHERE stop_xid IS NULL OR (h.xid, h.id) < (stop_xid, stop_id)
     ORDER BY h.xid DESC, h.id DESC LIMIT 1;
    IF cut_xid IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM stream_events e WHERE (e.xid, e.id) <= (cut_xid, cut_id);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    UPDATE stream_retention
       SET pruned_xid = cut_xid, pruned_id = cut_id, pruned_at = now()
     WHERE (pruned_xid, pruned_id) < (cut_xid, cut_id);
    RETURN deleted;
END $$;
REVOKE ALL ON FUNCTION keen_stream_prune(interval, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keen_stream_prune(interval, integer) TO keen_system;

-- === Hub nodes and connection records =========================================================
CREATE TABLE hub_nodes (
    id UUID PRIMARY KEY,
    hostname VARCHAR(255) NOT NULL,
    pid INTEGER NOT NULL,
    listen_address VARCHAR(255),
    started_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    last_heartbeat_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    stopped_at TIMESTAMP WITH TIME ZONE,
    status VARCHAR(10) NOT NULL DEFAULT 'running',
    CONSTRAINT hub_nodes_status_check CHECK (status IN ('running', 'stopped', 'dead')),
    CONSTRAINT hub_nodes_stopped_check CHECK ((status = 'running') = (stopped_at IS NULL))
);
CREATE INDEX idx_hub_nodes_running ON hub_nodes(last_heartbeat_at) WHERE status = 'running';

GRANT SELECT, INSERT, UPDATE, DELETE ON hub_nodes TO keen_system;

-- One row per WebSocket connection a hub node accepted (a tenant table).
CREATE TABLE websocket_connections (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    session_id UUID REFERENCES agent_sessions(id) ON DELETE CASCADE,
    connection_id VARCHAR(255) NOT NULL,
    client_ip INET NOT NULL,
    user_agent TEXT,
    client_type VARCHAR(50) NOT NULL,
    connected_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    last_ping_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    disconnected_at TIMESTAMP WITH TIME ZONE,
    subscribed_events TEXT[] NOT NULL DEFAULT '{}',
    session_filters UUID[],
    admin_connection BOOLEAN NOT NULL DEFAULT FALSE,
    can_view_all_sessions BOOLEAN NOT NULL DEFAULT FALSE,
    connection_status VARCHAR(20) NOT NULL DEFAULT 'active',
    hub_node_id UUID REFERENCES hub_nodes(id) ON DELETE SET NULL,
    token_id UUID REFERENCES auth_tokens(id) ON DELETE SET NULL,
    subscription_scope VARCHAR(10) NOT NULL DEFAULT 'none',
    close_code INTEGER,
    close_reason VARCHAR(123),
    CONSTRAINT websocket_connections_connection_id_key UNIQUE (connection_id),
    CONSTRAINT websocket_connections_status_check
        CHECK (connection_status IN ('active', 'disconnected', 'timed_out', 'reaped')),
    CONSTRAINT websocket_connections_user_agent_length CHECK (length(user_agent) <= 1024),
    CONSTRAINT websocket_connections_scope_check
        CHECK (subscription_scope IN ('none', 'mine', 'sessions', 'all')),
    CONSTRAINT websocket_connections_closed_check
        CHECK ((connection_status = 'active') = (disconnected_at IS NULL))
);
CREATE INDEX idx_websocket_connections_user_id ON websocket_connections(user_id);
CREATE INDEX idx_websocket_connections_admin ON websocket_connections(admin_connection);
CREATE INDEX idx_websocket_connections_open_by_node ON websocket_connections(hub_node_id)
    WHERE disconnected_at IS NULL;

ALTER TABLE websocket_connections ENABLE ROW LEVEL SECURITY;
ALTER TABLE websocket_connections FORCE ROW LEVEL SECURITY;
CREATE POLICY websocket_connections_select ON websocket_connections FOR SELECT TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY websocket_connections_insert ON websocket_connections FOR INSERT TO keen_app
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY websocket_connections_update ON websocket_connections FOR UPDATE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))
    WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));
CREATE POLICY websocket_connections_delete ON websocket_connections FOR DELETE TO keen_app
    USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()));

GRANT SELECT, INSERT, UPDATE, DELETE ON websocket_connections TO keen_app, keen_system;
