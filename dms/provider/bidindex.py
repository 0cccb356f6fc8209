"""The provider's bid index, bounded: rows and bytes per requester and in all.

Every bid this node sends is recorded (``bids`` rows, ``direction`` ``sent``,
``peer_id`` the requester): one row per offer (a lease, so no more than the
node's capacity) and at most one row for all of a request's declines. A peer
asking for bids all day grew this table without bound (409,621 rows, +94 MB
from one peer in a minute; 307,200 from 200 keys), so:

- a requester holds at most ``rows_per_peer`` rows and ``bytes_per_peer`` bytes;
  one without a stake here is then refused (:meth:`BidIndex.refusal`), one with
  a stake loses its oldest rows instead;
- the table holds at most ``rows`` rows and ``bytes`` bytes: past that, the
  oldest rows of peers without a stake go first, then the oldest of anyone;
- rows older than ``max_age_s`` go.

Counts are kept in memory (read once at start) and read again after each prune,
which runs only when a budget is passed or once every ``PRUNE_EVERY_S``. Bytes
are the text a row holds plus ``ROW_OVERHEAD`` (what SQLite adds, roughly).
See ``specs/security.md``, "Global budgets".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import delete, func, select

from dms.actor.admission import BudgetUse
from dms.orchestrator.messages import Bid
from dms.orchestrator.records import BidRow
from dms.orchestrator.store import insert_bids
from dms.store import Database
from dms.store.models import BidRecord

BIDS = BidRecord.__table__
ROW_OVERHEAD = 64
PRUNE_EVERY_S = 60.0
# A prune takes the table this far under the budget it passed, so the next one waits.
PRUNE_TO = 0.9
TEXT_COLUMNS = ("deployment_id", "peer_id", "slot", "reason", "lease_id")

log = logging.getLogger("dms.orchestrator")


@dataclass(frozen=True)
class BidIndexBudget:
    rows: int = 20_000
    bytes: int = 4 * 1024 * 1024
    rows_per_peer: int = 1_000
    bytes_per_peer: int = 256 * 1024
    max_age_s: float = 3600.0


def row_bytes(row: BidRow) -> int:
    text = (row.deployment_id, row.peer_id, row.slot, row.reason, row.lease_id)  # TEXT_COLUMNS
    return ROW_OVERHEAD + sum(len(t or "") for t in text)


def bid_rows(bid: Bid, requester: str) -> list[BidRow]:
    """The rows of one bid sent to ``requester``: one per offer, one for all declines
    (``slot`` says how many, ``reason`` the first one's)."""
    me = BidRow(bid.deployment_id, "sent", requester, slot="", outcome="offer")
    rows = [replace(me, slot=o.slot, lease_id=o.lease_id, price=o.price) for o in bid.offers]
    if bid.declines:
        reasons = Counter(d.reason for d in bid.declines)
        reason, _ = reasons.most_common(1)[0]
        if len(reasons) > 1:
            reason = f"{reason} (and {len(reasons) - 1} other reasons)"
        slot = bid.declines[0].slot if len(bid.declines) == 1 else f"{len(bid.declines)} slots"
        rows.append(replace(me, slot=slot[:128], outcome="decline", reason=reason[:512]))
    return rows


def _never(peer: str) -> bool:
    return False


class BidIndex:
    """Bids this node sent, queued by the node actor and written in batches."""

    def __init__(
        self,
        db: Database,
        budget: BidIndexBudget | None = None,
        stake: Callable[[str], bool] = _never,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.budget = budget or BidIndexBudget()
        self.stake = stake
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, list[int]] = {}  # requester -> [rows, bytes], written or queued
        self._rows = 0
        self._bytes = 0
        self._queued: list[BidRow] = []
        self._pruned_at = clock()
        self.refused = 0
        self.pruned = 0
        self._recount()

    # ---- the bidding path ------------------------------------------------------------

    def refusal(self, requester: str) -> str | None:
        """Why a bid request of ``requester`` is refused, not stored, or None: it holds
        its whole share of the index and the node has no stake in it."""
        b = self.budget
        with self._lock:
            rows, size = self._peers.get(requester, (0, 0))
        if rows < b.rows_per_peer and size < b.bytes_per_peer:
            return None
        if self.stake(requester):
            return None  # its oldest rows go instead (flush)
        self.refused += 1
        return (
            f"this requester has {rows} bids ({size} bytes) in this node's bid index, the most "
            f"one peer may have (bid_index_rows_per_peer {b.rows_per_peer}, "
            f"bid_index_bytes_per_peer {b.bytes_per_peer}); they go after "
            f"bid_index_max_age_s ({b.max_age_s:g} s)"
        )

    def add(self, rows: list[BidRow]) -> bool:
        """Queue rows (each with its ``peer_id``); True if the queue was empty before."""
        with self._lock:
            first = not self._queued
            for row in rows:
                self._count(row.peer_id, 1, row_bytes(row))
            self._queued.extend(rows)
        return first

    def flush(self) -> None:
        """Write the queued rows; prune if a budget is passed, or the oldest are due."""
        with self._lock:
            rows, self._queued = self._queued, []
        if rows:
            try:
                insert_bids(self.db, rows, self._clock())
            except BaseException:  # a store busy or refusing: kept for the next flush
                with self._lock:
                    self._queued[:0] = rows
                raise
        if self._over() or self._clock() - self._pruned_at > PRUNE_EVERY_S:
            self.prune()

    # ---- bounds ----------------------------------------------------------------------

    def _over(self) -> bool:
        b = self.budget
        with self._lock:
            if self._rows > b.rows or self._bytes > b.bytes:
                return True
            over = [
                peer
                for peer, (rows, size) in self._peers.items()
                if rows > b.rows_per_peer or size > b.bytes_per_peer
            ]
        return any(self.stake(peer) for peer in over)

    def prune(self) -> int:
        """Old rows, then the oldest of requesters over their share (staked ones: a
        refused one wrote nothing), then the oldest in all; the rows deleted."""
        b = self.budget
        now = self._clock()
        self._pruned_at = now
        sent = BIDS.c.direction == "sent"
        deleted = 0
        with self.db.transaction() as conn:
            done = conn.execute(delete(BIDS).where(sent, BIDS.c.at < now - b.max_age_s))
            deleted += done.rowcount or 0  # type: ignore[attr-defined]
        self._recount()
        with self._lock:
            over_peers = [
                (peer, rows, size)
                for peer, (rows, size) in self._peers.items()
                if rows > b.rows_per_peer or size > b.bytes_per_peer
            ]
        for peer, rows, size in over_peers:
            excess = self._excess(rows, size, b.rows_per_peer, b.bytes_per_peer)
            deleted += self._delete_oldest(excess, BIDS.c.peer_id == peer)
        self._recount()
        with self._lock:
            rows, size = self._rows, self._bytes
            staked = [p for p in self._peers if self.stake(p)]
        excess = self._excess(rows, size, b.rows, b.bytes)
        if excess:
            unknown = BIDS.c.peer_id.not_in(staked) if staked else BIDS.c.peer_id.is_not(None)
            gone = self._delete_oldest(excess, unknown)
            gone += self._delete_oldest(excess - gone, BIDS.c.peer_id.is_not(None))
            deleted += gone
            self._recount()
        if deleted:
            self.pruned += deleted
            log.info("bid index: pruned %d rows (now %d rows, %d bytes)", deleted, *self.size())
        return deleted

    def _excess(self, rows: int, size: int, max_rows: int, max_bytes: int) -> int:
        """Rows to delete to be ``PRUNE_TO`` of both bounds (0 if within them)."""
        if rows <= max_rows and size <= max_bytes:
            return 0
        per_row = size / rows if rows else ROW_OVERHEAD
        by_rows = rows - int(max_rows * PRUNE_TO)
        by_bytes = int((size - max_bytes * PRUNE_TO) / per_row) + 1
        return max(by_rows, by_bytes, 1)

    def _delete_oldest(self, count: int, where: Any) -> int:
        if count <= 0:
            return 0
        sent = BIDS.c.direction == "sent"
        oldest = select(BIDS.c.id).where(sent, where).order_by(BIDS.c.id).limit(count)
        with self.db.transaction() as conn:
            done = conn.execute(delete(BIDS).where(BIDS.c.id.in_(oldest.scalar_subquery())))
            return int(done.rowcount or 0)  # type: ignore[attr-defined]

    def _recount(self) -> None:
        """Read the counts again from the table (queued rows are added on top)."""
        length = sum(
            (func.coalesce(func.length(BIDS.c[c]), 0) for c in TEXT_COLUMNS),
            start=func.count() * ROW_OVERHEAD,
        )
        with self.db.transaction() as conn:
            found = conn.execute(
                select(BIDS.c.peer_id, func.count(), length)
                .where(BIDS.c.direction == "sent")
                .group_by(BIDS.c.peer_id)
            ).all()
        with self._lock:
            self._peers, self._rows, self._bytes = {}, 0, 0
            for peer, rows, size in found:
                self._count(str(peer), int(rows), int(size or 0))
            for row in self._queued:
                self._count(row.peer_id, 1, row_bytes(row))

    def _count(self, peer: str, rows: int, size: int) -> None:
        entry = self._peers.setdefault(peer, [0, 0])
        entry[0] += rows
        entry[1] += size
        self._rows += rows
        self._bytes += size

    # ---- reading ---------------------------------------------------------------------

    def size(self) -> tuple[int, int]:
        with self._lock:
            return self._rows, self._bytes

    def usage(self) -> list[BudgetUse]:
        b = self.budget
        with self._lock:
            rows, size = self._rows, self._bytes
            peer_rows = max((e[0] for e in self._peers.values()), default=0)
            peer_bytes = max((e[1] for e in self._peers.values()), default=0)
        return [
            BudgetUse("bid_index_rows", rows, b.rows, 0),
            BudgetUse("bid_index_bytes", size, b.bytes, 0),
            BudgetUse("bid_index_rows_per_peer", peer_rows, b.rows_per_peer, self.refused),
            BudgetUse("bid_index_bytes_per_peer", peer_bytes, b.bytes_per_peer, 0),
        ]
