"""Session events name the caller's handle ``session_handle``, as the public API does.

Revision ID: 0008_session_handle
Revises: 0007_guarantees
Create Date: 2026-12-01

The API calls the caller's string for a session ``session_handle`` and a row's UUID
``session_id`` (CHANGELOG.md). Session events said ``session_key`` for the handle; from now on
their payload says ``session_handle``. The events still retained are rewritten too, so a client
that resumes across the upgrade reads one name (the outbox is bounded by retention: a few days
of events, rewritten once, in the migration's transaction).

The trigger function's text is the database's own (``pg_get_functiondef``) with the one key
changed, so nothing else about it can drift; keen_stream/sql/events.sql shows it in full.
"""

from __future__ import annotations

from alembic import op

revision = "0008_session_handle"
down_revision = "0007_guarantees"
branch_labels = None
depends_on = None


def _rename_key(old: str, new: str) -> list[str]:
    return [
        f"""
        DO $$ BEGIN
            EXECUTE replace(
                pg_get_functiondef('public.keen_stream_capture_session()'::regprocedure),
                '''{old}''', '''{new}''');
        END $$
        """,
        f"""
        UPDATE stream_events
           SET payload = (payload - '{old}') || jsonb_build_object('{new}', payload -> '{old}')
         WHERE event_type LIKE 'session.%' AND payload ? '{old}'
        """,
    ]


def upgrade() -> None:
    for statement in _rename_key("session_key", "session_handle"):
        op.execute(statement)


def downgrade() -> None:
    for statement in _rename_key("session_handle", "session_key"):
        op.execute(statement)
