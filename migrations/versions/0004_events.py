"""Event outbox for the streaming hub (placeholder, filled by its issue).

Revision ID: 0004_events
Revises: 0003_sessions
Create Date: 2026-11-25
"""

from alembic import op

revision = "0004_events"
down_revision = "0003_sessions"
branch_labels = None
depends_on = None

# One statement per string: asyncpg prepares each one, and a prepared statement holds one command.
UPGRADE: list[str] = []
DOWNGRADE: list[str] = []


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)
