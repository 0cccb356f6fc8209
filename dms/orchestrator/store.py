"""Deployments and bid indices in the node's store (Core statements: saved often)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import insert, select, update

from dms.store import Database
from dms.store.models import BidRecord, DeploymentRecord, MiningSessionRecord

DEPLOYMENTS = DeploymentRecord.__table__
BIDS = BidRecord.__table__
MINING = MiningSessionRecord.__table__
ACTIVE_STATES = ("queued", "bidding", "committing", "allocating", "running", "stopping")


class DeploymentStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def save(self, row: dict[str, Any]) -> None:
        """Insert or update one deployment (``row`` holds every column)."""
        row = {**row, "updated_at": time.time()}
        with self.db.transaction() as conn:
            done = conn.execute(
                update(DEPLOYMENTS).where(DEPLOYMENTS.c.id == row["id"]).values(**row)
            )
            if done.rowcount == 0:
                conn.execute(insert(DEPLOYMENTS).values(**row))

    def get(self, deployment_id: str) -> dict[str, Any] | None:
        with self.db.transaction() as conn:
            row = conn.execute(select(DEPLOYMENTS).where(DEPLOYMENTS.c.id == deployment_id)).first()
            return dict(row._mapping) if row is not None else None

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        with self.db.transaction() as conn:
            rows = conn.execute(
                select(DEPLOYMENTS).order_by(DEPLOYMENTS.c.created_at.desc()).limit(limit)
            )
            return [dict(r._mapping) for r in rows]

    def active(self) -> list[dict[str, Any]]:
        with self.db.transaction() as conn:
            rows = conn.execute(select(DEPLOYMENTS).where(DEPLOYMENTS.c.state.in_(ACTIVE_STATES)))
            return [dict(r._mapping) for r in rows]

    def record_bids(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        now = time.time()
        with self.db.transaction() as conn:
            defaults = {"at": now, "reason": "", "lease_id": None, "price": None}
            conn.execute(insert(BIDS), [{**defaults, **r} for r in rows])

    def bids(self, deployment_id: str) -> list[dict[str, Any]]:
        with self.db.transaction() as conn:
            rows = conn.execute(
                select(BIDS).where(BIDS.c.deployment_id == deployment_id).order_by(BIDS.c.id)
            )
            return [dict(r._mapping) for r in rows]

    # ---- mining sessions (their deployment has the same id) ---------------------------

    def save_mining(self, row: dict[str, Any]) -> None:
        """Insert or update a mining session's row; only the columns given change."""
        now = time.time()
        with self.db.transaction() as conn:
            done = conn.execute(
                update(MINING).where(MINING.c.id == row["id"]).values(**row, updated_at=now)
            )
            if done.rowcount == 0:
                conn.execute(insert(MINING).values(**{"created_at": now, **row, "updated_at": now}))

    def mining(self, session_id: str, *, labels: bool = False) -> dict[str, Any] | None:
        columns = [c for c in MINING.c if labels or c.name != "labels"]
        with self.db.transaction() as conn:
            row = conn.execute(select(*columns).where(MINING.c.id == session_id)).first()
            return dict(row._mapping) if row is not None else None
