"""Agent sessions (placeholder, filled by its issue).

Revision ID: 0003_sessions
Revises: 0002_ledger
Create Date: 2026-11-25
"""

from alembic import op

revision = "0003_sessions"
down_revision = "0002_ledger"
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
