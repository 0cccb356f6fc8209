"""Mining sessions: progress, checkpoints, results.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Frozen: the schema of version 5 as dms made it before Alembic. Never edit a
shipped revision; add the next one (specs/layout.md, Store).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mining_sessions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("checkpoint", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_mining_sessions_phase", "mining_sessions", ["phase"])


def downgrade() -> None:
    op.drop_index("ix_mining_sessions_phase", table_name="mining_sessions")
    op.drop_table("mining_sessions")
