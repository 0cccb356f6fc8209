"""Known peers, for reconnecting after a restart.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Frozen: the schema of version 2 as dms made it before Alembic. Never edit a
shipped revision; add the next one (specs/layout.md, Store).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "known_peers",
        sa.Column("peer_id", sa.String(128), nullable=False),
        sa.Column("addrs", sa.JSON(), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("peer_id"),
    )


def downgrade() -> None:
    op.drop_table("known_peers")
