"""Item 5 of issue 17: rows of bids, events and ended leases are pruned after a retention.

Before, every event, every bid and every ended lease stayed in the store for
good: a node asked for bids all day grew its database without bound.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from dms.store import open_database
from dms.store.models import BidRecord, Event, Lease
from dms.store.retention import prune

DAY = 24 * 3600.0


def lease(lease_id: str, state: str, ended_at: float | None, created: float) -> Lease:
    return Lease(
        id=lease_id, state=state, cpu_milli=100, ram_mib=10, disk_mib=10, gpu=0,
        created_at=created, expires_at=None, ended_at=ended_at,
    )  # fmt: skip


def bid(at: float) -> BidRecord:
    return BidRecord(
        deployment_id="d", direction="sent", peer_id="p", slot="s", outcome="offer", at=at
    )


def test_old_events_bids_and_ended_leases_go_and_live_rows_stay(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    now = time.time()
    old, recent = now - 8 * DAY, now - 1 * DAY
    with db.session() as s:
        s.add(Event(kind="old", at=datetime.fromtimestamp(old, UTC)))
        s.add(Event(kind="recent", at=datetime.fromtimestamp(recent, UTC)))
        s.add_all([bid(old), bid(recent)])
        s.add_all(
            [
                lease("ended-old", "released", old, old),
                lease("ended-recent", "expired", recent, old),
                lease("allocated-old", "allocated", None, old),  # live: never pruned
                lease("locked-old", "locked", None, old),
            ]
        )
    assert prune(db, retention_s=7 * DAY, now=now) == {"events": 1, "bids": 1, "leases": 1}
    with db.session() as s:
        assert [e.kind for e in s.scalars(select(Event))] == ["recent"]
        assert s.scalar(select(func.count()).select_from(BidRecord)) == 1
        assert sorted(x.id for x in s.scalars(select(Lease))) == [
            "allocated-old",
            "ended-recent",
            "locked-old",
        ]
    assert prune(db, retention_s=7 * DAY, now=now) == {"events": 0, "bids": 0, "leases": 0}
    db.close()
