"""Deployments and the bid indices.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Frozen: the schema of version 4 as dms made it before Alembic. Never edit a
shipped revision; add the next one (specs/layout.md, Store).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("slots", sa.JSON(), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("running_at", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_deployments_state", "deployments", ["state"])
    op.create_table(
        "bids",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("deployment_id", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(8), nullable=False),
        sa.Column("peer_id", sa.String(128), nullable=False),
        sa.Column("slot", sa.String(128), nullable=False),
        sa.Column("lease_id", sa.String(32), nullable=True),
        sa.Column("price", sa.Float(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(512), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_bids_deployment", "bids", ["deployment_id"])


def downgrade() -> None:
    op.drop_index("ix_bids_deployment", table_name="bids")
    op.drop_table("bids")
    op.drop_index("ix_deployments_state", table_name="deployments")
    op.drop_table("deployments")
