"""Event outbox for the streaming hub: capture triggers, hub nodes, connection records, pruning.

Revision ID: 0004_events
Revises: 0003_sessions
Create Date: 2026-11-25

Design (docs/architecture.md has the long form):
- Triggers on agent_sessions and credit_transactions append a row to ``stream_events`` in the
  writing transaction, so an event exists if and only if its change committed. They never call
  pg_notify: a notifying transaction takes a cluster-wide lock through its commit
  (docs/architecture.md). The wake-up is sent after commit, outside the business transaction.
- Each row stores its transaction id (xid8). Readers deliver in (xid, id) order and only rows
  whose xid is below the "horizon" (the oldest transaction of this database still running), so
  a transaction that holds an early id and commits late is waited for, never skipped.
- ``id`` is drawn while the writer holds the entity's row lock (the session row; for credit
  rows, the account row the ledger locks first), so it doubles as a per-entity version.
"""

from alembic import op

revision = "0004_events"
down_revision = "0003_sessions"
branch_labels = None
depends_on = None

TABLES = [
    """
    CREATE TABLE stream_events (
        xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        id BIGINT GENERATED ALWAYS AS IDENTITY,
        user_id UUID NOT NULL,
        session_id UUID,
        root_session_id UUID,
        event_type VARCHAR(40) NOT NULL,
        payload JSONB NOT NULL,
        created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
        CONSTRAINT stream_events_pkey PRIMARY KEY (xid, id)
    )
    """,
    # No foreign keys: each would add a lookup and a KEY SHARE lock on the users/sessions row to
    # every business write, and events are short-lived (pruned after the retention window).
    # The one index serves tailing, replay ranges and pruning (all in stream order).
    """
    CREATE TABLE stream_retention (
        singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
        pruned_xid xid8 NOT NULL DEFAULT '0',
        pruned_id BIGINT NOT NULL DEFAULT 0,
        pruned_at TIMESTAMP WITH TIME ZONE
    )
    """,
    "INSERT INTO stream_retention DEFAULT VALUES",
    """
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
    )
    """,
    "CREATE INDEX idx_hub_nodes_running ON hub_nodes(last_heartbeat_at) WHERE status = 'running'",
    """
    ALTER TABLE websocket_connections
        ADD COLUMN hub_node_id UUID REFERENCES hub_nodes(id) ON DELETE SET NULL,
        ADD COLUMN token_id UUID REFERENCES auth_tokens(id) ON DELETE SET NULL,
        ADD COLUMN subscription_scope VARCHAR(10) NOT NULL DEFAULT 'none',
        ADD COLUMN close_code INTEGER,
        ADD COLUMN close_reason VARCHAR(123),
        ADD CONSTRAINT websocket_connections_scope_check
            CHECK (subscription_scope IN ('none', 'mine', 'sessions', 'all')),
        ADD CONSTRAINT websocket_connections_closed_check
            CHECK ((connection_status = 'active') = (disconnected_at IS NULL))
    """,
    "CREATE INDEX idx_websocket_connections_open_by_node ON websocket_connections(hub_node_id)"
    " WHERE disconnected_at IS NULL",
]

# Session columns whose change is an event; last_activity_at alone is not (it is a heartbeat).
_SESSION_STATE = (
    "current_phase, execution_status, iteration_count, tool_calls_count, tokens_used,"
    " context_tokens_used, claude_cost_usd, keen_cost_credits, budget_used, credit_budget,"
    " success, error_message, end_time, files_modified, files_created, files_deleted"
)
_OLD_STATE = ", ".join(f"OLD.{c.strip()}" for c in _SESSION_STATE.split(","))
_NEW_STATE = ", ".join(f"NEW.{c.strip()}" for c in _SESSION_STATE.split(","))

FUNCTIONS = [
    # The after-commit wake-up's trigger. A DAL connection (started with keen.stream_signal=on)
    # gets one NOTICE per transaction that wrote events; after its commit the DAL sends a
    # coalesced NOTIFY from its own connection. Other clients (psql, other services) see
    # nothing; their events are found by the hub's fallback poll. The setting is transaction-
    # local, so it reads 'on' again in the next transaction.
    """
    CREATE FUNCTION keen_stream_signal() RETURNS void
    LANGUAGE plpgsql
    AS $$
    BEGIN
        IF current_setting('keen.stream_signal', true) = 'on' THEN
            PERFORM set_config('keen.stream_signal', 'sent', true);
            RAISE NOTICE 'keen_stream event' USING ERRCODE = 'KSE01';
        END IF;
    END $$
    """,
    # SECURITY DEFINER (owned by keen_system): tenants get no INSERT on stream_events, so they
    # cannot forge events; the trigger writes on their behalf. Money goes out as strings.
    """
    CREATE FUNCTION keen_stream_capture_session() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
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
            'session_key', NEW.session_id,
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
    END $$
    """,
    """
    CREATE FUNCTION keen_stream_capture_credit() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
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
    END $$
    """,
    # The delivery horizon: every transaction with a smaller xid has finished, and no future
    # transaction can get one, so rows below it are final. It is the oldest xid still running
    # in the statement's snapshot, skipping transactions that pg_stat_activity says belong to
    # another database (they cannot write our outbox): on a shared cluster someone else's long
    # transaction does not stall our stream. An xid we cannot place counts as ours (safe side).
    # STABLE: it must use the calling statement's snapshot, the one the tail query reads with.
    """
    CREATE FUNCTION keen_stream_horizon() RETURNS xid8
    LANGUAGE sql STABLE
    AS $$
        SELECT coalesce(
            (SELECT min(x) FROM pg_snapshot_xip(pg_current_snapshot()) AS x
              WHERE NOT EXISTS (
                  SELECT 1 FROM pg_stat_get_activity(NULL) AS a
                   WHERE a.backend_xid = x::xid
                     AND a.datid <> (SELECT d.oid FROM pg_database d
                                      WHERE d.datname = current_database()))),
            pg_snapshot_xmax(pg_current_snapshot()))
    $$
    """,
    # The tail's position in one call: the horizon and whether committed rows wait beyond it.
    # Fast path: the snapshot's xmin is a valid horizon (conservative), and when no committed
    # row waits at or beyond it there is nothing to gain from refining it, so the common case
    # costs one index probe and never reads pg_stat_activity. STABLE: the caller's snapshot.
    """
    CREATE FUNCTION keen_stream_position(OUT horizon xid8, OUT pending boolean)
    LANGUAGE plpgsql STABLE
    AS $$
    BEGIN
        horizon := pg_snapshot_xmin(pg_current_snapshot());
        pending := EXISTS (SELECT 1 FROM stream_events e WHERE e.xid >= horizon);
        IF pending THEN
            horizon := keen_stream_horizon();
            pending := EXISTS (SELECT 1 FROM stream_events e WHERE e.xid >= horizon);
        END IF;
    END $$
    """,
    # One batch of retention pruning. It deletes the longest prefix of the stream (in delivery
    # order) whose events are older than the window, so "pruned" is always a prefix and one
    # watermark says what a resuming client can no longer get. Returns rows deleted (0: done).
    """
    CREATE FUNCTION keen_stream_prune(p_keep interval, p_batch integer) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, public
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
    END $$
    """,
]

TRIGGERS = [
    "CREATE TRIGGER agent_sessions_stream_insert AFTER INSERT ON agent_sessions"
    " FOR EACH ROW WHEN (NEW.streaming_enabled)"
    " EXECUTE FUNCTION keen_stream_capture_session()",
    # The WHEN clause is evaluated in C before any PL/pgSQL runs: updates that change nothing a
    # client shows (last_activity_at, streaming flags) cost no event and no function call.
    f"CREATE TRIGGER agent_sessions_stream_update AFTER UPDATE ON agent_sessions"
    f" FOR EACH ROW WHEN (NEW.streaming_enabled AND ({_OLD_STATE}) IS DISTINCT FROM ({_NEW_STATE}))"
    f" EXECUTE FUNCTION keen_stream_capture_session()",
    "CREATE TRIGGER credit_transactions_stream AFTER INSERT ON credit_transactions"
    " FOR EACH ROW EXECUTE FUNCTION keen_stream_capture_credit()",
]

POLICIES = [
    # A tenant may read its own events (resume/replay runs as the user); admins read all.
    "ALTER TABLE stream_events ENABLE ROW LEVEL SECURITY",
    "ALTER TABLE stream_events FORCE ROW LEVEL SECURITY",
    "CREATE POLICY stream_events_select ON stream_events FOR SELECT TO keen_app"
    " USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))",
    # keen_app has no INSERT/UPDATE/DELETE grant here (triggers write as keen_system); the
    # policies keep the one-policy-per-command rule, so a future grant cannot open the table.
    "CREATE POLICY stream_events_insert ON stream_events FOR INSERT TO keen_app"
    " WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))",
    "CREATE POLICY stream_events_update ON stream_events FOR UPDATE TO keen_app"
    " USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))"
    " WITH CHECK (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))",
    "CREATE POLICY stream_events_delete ON stream_events FOR DELETE TO keen_app"
    " USING (user_id = (SELECT keen_current_user_id()) OR (SELECT keen_is_admin()))",
]

GRANTS = [
    "REVOKE ALL ON stream_events, stream_retention, hub_nodes FROM PUBLIC",
    "GRANT SELECT ON stream_events, stream_retention TO keen_app",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON stream_events, stream_retention, hub_nodes"
    " TO keen_system",
    "REVOKE EXECUTE ON FUNCTION keen_stream_capture_session(), keen_stream_capture_credit(),"
    " keen_stream_horizon(), keen_stream_position(), keen_stream_prune(interval, integer),"
    " keen_stream_signal() FROM PUBLIC",
    "GRANT EXECUTE ON FUNCTION keen_stream_signal() TO keen_system",
    "ALTER FUNCTION keen_stream_capture_session() OWNER TO keen_system",
    "ALTER FUNCTION keen_stream_capture_credit() OWNER TO keen_system",
    "GRANT EXECUTE ON FUNCTION keen_stream_horizon(), keen_stream_position()"
    " TO keen_app, keen_system",
    "GRANT EXECUTE ON FUNCTION keen_stream_prune(interval, integer) TO keen_system",
]

# One statement per string: asyncpg prepares each one, and a prepared statement holds one command.
UPGRADE: list[str] = [*TABLES, *FUNCTIONS, *TRIGGERS, *POLICIES, *GRANTS]
DOWNGRADE: list[str] = [
    "DROP TRIGGER IF EXISTS credit_transactions_stream ON credit_transactions",
    "DROP TRIGGER IF EXISTS agent_sessions_stream_update ON agent_sessions",
    "DROP TRIGGER IF EXISTS agent_sessions_stream_insert ON agent_sessions",
    "DROP FUNCTION IF EXISTS keen_stream_prune(interval, integer), keen_stream_position(),"
    " keen_stream_horizon(),"
    " keen_stream_capture_credit(), keen_stream_capture_session(), keen_stream_signal()",
    "DROP INDEX IF EXISTS idx_websocket_connections_open_by_node",
    """
    ALTER TABLE websocket_connections
        DROP CONSTRAINT IF EXISTS websocket_connections_closed_check,
        DROP CONSTRAINT IF EXISTS websocket_connections_scope_check,
        DROP COLUMN IF EXISTS close_reason,
        DROP COLUMN IF EXISTS close_code,
        DROP COLUMN IF EXISTS subscription_scope,
        DROP COLUMN IF EXISTS token_id,
        DROP COLUMN IF EXISTS hub_node_id
    """,
    "DROP TABLE IF EXISTS hub_nodes, stream_retention, stream_events",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
