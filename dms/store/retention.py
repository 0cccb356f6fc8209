"""How long the store keeps what is only a record: events, bids and ended leases.

Every event, every bid sent or received and every lease that ended stays in the
store for the record; a node that runs for months, or a peer that asks it for
bids all day, would grow them without bound. Rows older than the retention
(``retention_s``, default 7 days) go, in one transaction. Live leases and
allocations are never touched: only rows with an ``ended_at`` are.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sqlalchemy import delete

from dms.store.db import Database
from dms.store.models import BidRecord, Event, Lease


def prune(db: Database, retention_s: float, now: float | None = None) -> dict[str, int]:
    """Delete events, bids and ended leases older than ``retention_s``; the counts."""
    cutoff = (time.time() if now is None else now) - retention_s
    with db.session() as session:
        events = session.execute(
            delete(Event).where(Event.at < datetime.fromtimestamp(cutoff, UTC))
        )
        bids = session.execute(delete(BidRecord).where(BidRecord.at < cutoff))
        leases = session.execute(
            delete(Lease).where(Lease.ended_at.is_not(None), Lease.ended_at < cutoff)
        )
        counts = {
            "events": events.rowcount,  # type: ignore[attr-defined]
            "bids": bids.rowcount,  # type: ignore[attr-defined]
            "leases": leases.rowcount,  # type: ignore[attr-defined]
        }
    return counts
