"""Stream latency: one-statement progress reports, and a tail read that never scans the outbox.

Revision ID: 0006_stream_latency
Revises: 0005_ledger_batch
Create Date: 2026-11-25

1. ``keen_stream_position`` (0004) asked ``EXISTS (... WHERE xid >= horizon)`` with ``horizon``
   a PL/pgSQL variable. After five calls PL/pgSQL caches a generic plan, and for a parameter it
   cannot see the planner expects a third of the table to match, so it picks a sequential scan
   that stops at the first match: when nothing waits (the usual case) that scan reads the whole
   outbox. Every tail read grew with the retention window (measured: 0.19 ms at 1,000 events,
   1.0 ms at 17,000, 1.8 ms at 32,000; 4.7 ms and 3,182 buffers for one read with the generic
   plan forced), and so did the hub's latency from one benchmark run to the next. Now the
   function reads the newest event's xid by a backward walk of the primary key, a plan with
   no parameter to misjudge: a few buffers whatever the table's size.

2. A progress report was four messages (BEGIN, the tenant context, the UPDATE, COMMIT). Its
   transaction id, taken by the UPDATE, stayed open until the client had read the result and
   sent COMMIT: a round trip through a Python process that also runs other writers. The stream
   releases an event only once every older transaction has ended (0004's horizon), so every
   event committed meanwhile waited for that round trip. ``keen_session_progress`` is the same
   UPDATE, called in a single statement whose implicit transaction commits on the server as
   soon as the statement ends.

   It runs as the tenant, under RLS and the session guard, exactly like the UPDATE it
   replaces: the caller switches the role and the user in the call's own arguments
   (``KeenDatabase.tenant_call``: ``set_config('role', 'keen_app', true)`` and the user id,
   evaluated before the body runs and undone when the statement's transaction ends). It is
   SECURITY INVOKER and refuses to run as anyone but ``keen_app``: called without that switch
   it would not be filtered by RLS.
"""

from alembic import op

revision = "0006_stream_latency"
down_revision = "0005_ledger_batch"
branch_labels = None
depends_on = None

SIGNATURE = (
    "keen_session_progress(text, uuid, text, text, integer, integer, bigint, bigint,"
    " text[], text[], text[])"
)

POSITION = """
    CREATE OR REPLACE FUNCTION keen_stream_position(OUT horizon xid8, OUT pending boolean)
    LANGUAGE plpgsql STABLE
    AS $$
    DECLARE
        newest xid8;
    BEGIN
        -- No parameter in this plan, so no generic plan can turn it into a table scan.
        SELECT e.xid INTO newest FROM stream_events e ORDER BY e.xid DESC LIMIT 1;
        horizon := pg_snapshot_xmin(pg_current_snapshot());
        pending := coalesce(newest >= horizon, false);
        IF pending THEN
            horizon := keen_stream_horizon();
            pending := newest >= horizon;
        END IF;
    END $$
    """

# 0004's definition, for the downgrade.
POSITION_DOWN = """
    CREATE OR REPLACE FUNCTION keen_stream_position(OUT horizon xid8, OUT pending boolean)
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
    """

UPGRADE = [
    POSITION,
    # p_role is the set_config('role', ...) the caller evaluated; only its effect matters.
    # Increments and appends are computed on the row version the UPDATE changes, so
    # concurrent reports each add to the other's result. An ended session makes the guard
    # trigger (0003) raise SessionAlreadyEnded.
    """
    CREATE FUNCTION keen_session_progress(
        p_role text, p_user uuid, p_handle text, p_phase text,
        p_iterations integer, p_tool_calls integer, p_tokens bigint, p_context_tokens bigint,
        p_created text[], p_modified text[], p_deleted text[])
    RETURNS SETOF agent_sessions
    LANGUAGE plpgsql SET search_path = pg_catalog, public
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
    END $$
    """,
    f"REVOKE EXECUTE ON FUNCTION {SIGNATURE} FROM PUBLIC",
    f"GRANT EXECUTE ON FUNCTION {SIGNATURE} TO keen_app",
]

DOWNGRADE = [f"DROP FUNCTION IF EXISTS {SIGNATURE}", POSITION_DOWN]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
