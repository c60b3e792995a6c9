"""Stream positions survive a restore on another cluster: position = xid + a stored offset.

Revision ID: 0009_stream_epoch
Revises: 0008_session_handle
Create Date: 2026-12-01

``stream_events.xid`` held ``pg_current_xact_id()``: a transaction id of the cluster that wrote
the row. A ``pg_dump`` restored on a new cluster keeps those numbers, while the new cluster
counts its own transaction ids from wherever its ``initdb`` left them, usually far lower: every
new event sorted before the restored ones and below the restored retention watermark, and the
hub delivered nothing new.

Now the column holds a *position*: the writing transaction's xid plus ``stream_state.xid_offset``.
``stream_state`` remembers which cluster the offset belongs to (``pg_control_system()``'s
``system_identifier``). The first writer (or the hub, or ``keen-stream restore``) on a server
start that has not been seen yet calls ``keen_stream_claim()``: on the same cluster it only
records the start; on another cluster it raises the offset so that new positions begin
``2^32`` above everything restored, and records the skipped range (``gap_from``, ``gap_to``):
cursors there were issued by the old cluster after the backup and get ``since_unknown``.
Checking the start time (``pg_postmaster_start_time()``, a variable) instead of the system
identifier (``pg_control_system()`` reads the control file: 14 µs a call) keeps the write path
cheap. The horizon (``keen_stream_horizon()``, ``keen_stream_position()``) is shifted by the
same offset, so the "released" rule is unchanged: a position below it belongs to a finished
transaction. keen_stream/sql/events.sql shows the result in full; docs/architecture.md explains.

Existing rows keep their values: on the cluster that wrote them the offset starts at 0.
"""

from __future__ import annotations

from alembic import op

revision = "0009_stream_epoch"
down_revision = "0008_session_handle"
branch_labels = None
depends_on = None

STATE = """
    CREATE TABLE stream_state (
        singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
        system_identifier BIGINT,
        postmaster_start TIMESTAMP WITH TIME ZONE,
        xid_offset BIGINT NOT NULL DEFAULT 0 CHECK (xid_offset >= 0),
        gap_from xid8,
        gap_to xid8,
        moved_at TIMESTAMP WITH TIME ZONE,
        CONSTRAINT stream_state_gap_check CHECK ((gap_from IS NULL) = (gap_to IS NULL))
    )
    """

STATE_ROW = "INSERT INTO stream_state DEFAULT VALUES"

SHIFT = """
    CREATE FUNCTION keen_stream_shift(p_xid xid8, p_offset bigint) RETURNS xid8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT (p_xid::text::numeric + p_offset)::text::xid8 $$
    """

OFFSET = """
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
    END $$
    """

CLAIM = """
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
    END $$
    """

NEXT_POSITION = """
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
    END $$
    """

HORIZON = """
    CREATE OR REPLACE FUNCTION keen_stream_horizon() RETURNS xid8
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
    END $$
    """

POSITION = """
    CREATE OR REPLACE FUNCTION keen_stream_position(OUT horizon xid8, OUT pending boolean)
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
    END $$
    """

GRANTS = [
    "GRANT SELECT ON stream_state TO keen_app",
    "GRANT SELECT, UPDATE ON stream_state TO keen_system",
    "REVOKE ALL ON FUNCTION keen_stream_shift(xid8, bigint) FROM PUBLIC",
    "GRANT EXECUTE ON FUNCTION keen_stream_shift(xid8, bigint) TO keen_app, keen_system",
    "REVOKE ALL ON FUNCTION keen_stream_offset() FROM PUBLIC",
    "GRANT EXECUTE ON FUNCTION keen_stream_offset() TO keen_app, keen_system",
    "REVOKE ALL ON FUNCTION keen_stream_claim() FROM PUBLIC",
    "GRANT EXECUTE ON FUNCTION keen_stream_claim() TO keen_system",
    "REVOKE ALL ON FUNCTION keen_stream_next_position() FROM PUBLIC",
    "GRANT EXECUTE ON FUNCTION keen_stream_next_position() TO keen_system",
]

UPGRADE = [
    STATE,
    STATE_ROW,
    SHIFT,
    OFFSET,
    CLAIM,
    NEXT_POSITION,
    *GRANTS,
    "ALTER TABLE stream_events ALTER COLUMN xid SET DEFAULT keen_stream_next_position()",
    HORIZON,
    POSITION,
]

# 0006's definitions, for the downgrade.
HORIZON_DOWN = """
    CREATE OR REPLACE FUNCTION keen_stream_horizon() RETURNS xid8
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
    """

POSITION_DOWN = """
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

# Moved positions (a restore on another cluster) sit far above the plain transaction ids the
# old default writes: the stream would deliver nothing new, silently. Refuse instead.
REFUSE_MOVED = """
    DO $$
    BEGIN
        IF EXISTS (SELECT 1 FROM stream_state WHERE xid_offset <> 0) THEN
            RAISE EXCEPTION 'stream positions were moved (stream_state.xid_offset <> 0, a '
                'restore on another cluster): below 0009 new events would sort before them '
                'and never be delivered; downgrade refused';
        END IF;
    END $$
    """

DOWNGRADE = [
    REFUSE_MOVED,
    POSITION_DOWN,
    HORIZON_DOWN,
    "ALTER TABLE stream_events ALTER COLUMN xid SET DEFAULT pg_current_xact_id()",
    "DROP FUNCTION keen_stream_next_position()",
    "DROP FUNCTION keen_stream_claim()",
    "DROP FUNCTION keen_stream_offset()",
    "DROP FUNCTION keen_stream_shift(xid8, bigint)",
    "DROP TABLE stream_state",
]


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    # Positions written with a non-zero offset would stay above every xid this cluster will
    # issue for a long time: a downgrade after a restore on another cluster is refused.
    for statement in DOWNGRADE:
        op.execute(statement)
