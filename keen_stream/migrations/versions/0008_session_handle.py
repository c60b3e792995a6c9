"""The caller's handle of a session is ``session_handle`` in what the database says, too.

Revision ID: 0008_session_handle
Revises: 0007_guarantees
Create Date: 2026-12-01

The API calls the caller's string for a session ``session_handle`` and a row's UUID
``session_id`` (CHANGELOG.md). Two things the database says still used other names:

1. Session events named the handle ``session_key``; their payload now says ``session_handle``.
   The events still retained are rewritten too, so a client that resumes across the upgrade
   reads one name (the outbox is bounded by retention: a few days of events, rewritten once,
   in the migration's transaction).
2. ``keen_session_create`` refused an unknown parent *handle* naming the field
   ``parent_session_id`` (the column, a row id); it now names ``parent_session_handle``, the
   argument the caller passed. (The insert trigger's refusal keeps ``parent_session_id``: there
   the parent is given by row id.)

Each function's text is the database's own (``pg_get_functiondef``) with the one name changed,
so nothing else about it can drift; keen_stream/sql/events.sql and sessions.sql show them in
full.
"""

from __future__ import annotations

from alembic import op

revision = "0008_session_handle"
down_revision = "0007_guarantees"
branch_labels = None
depends_on = None

CAPTURE = "public.keen_stream_capture_session()"
CREATE = "public.keen_session_create(uuid, text, text, text, text, text, boolean, integer)"
EVENT_KEY = ("'session_key'", "'session_handle'")
PARENT_FIELD = ("'field', 'parent_session_id'", "'field', 'parent_session_handle'")


def _replace_in(function: str, old: str, new: str) -> str:
    quoted = [text.replace("'", "''") for text in (old, new)]
    return f"""
        DO $$ BEGIN
            EXECUTE replace(pg_get_functiondef('{function}'::regprocedure),
                            '{quoted[0]}', '{quoted[1]}');
        END $$
        """


def _rename_event_key(old: str, new: str) -> str:
    return f"""
        UPDATE stream_events
           SET payload = (payload - '{old}') || jsonb_build_object('{new}', payload -> '{old}')
         WHERE event_type LIKE 'session.%' AND payload ? '{old}'
        """


def upgrade() -> None:
    op.execute(_replace_in(CAPTURE, *EVENT_KEY))
    op.execute(_rename_event_key("session_key", "session_handle"))
    op.execute(_replace_in(CREATE, *PARENT_FIELD))


def downgrade() -> None:
    op.execute(_replace_in(CREATE, *reversed(PARENT_FIELD)))
    op.execute(_rename_event_key("session_handle", "session_key"))
    op.execute(_replace_in(CAPTURE, *reversed(EVENT_KEY)))
