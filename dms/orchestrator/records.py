"""The orchestrator's stored rows, typed: the bid index and the data owner's mining sessions.

The tables are ``dms/store/models.py`` (``bids``, ``mining_sessions``); these say
what one row holds, and turn it into the columns the store writes and back. The
on-disk form is the tables', unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

BidDirection = Literal["sent", "received"]  # sent: this node's bid (provider); received
BidOutcome = Literal["offer", "decline", "won", "lost"]


@dataclass(frozen=True, slots=True)
class BidRow:
    """One row of the bid index: a bid (an offer or a decline) this node sent to a
    requester (``peer_id``), or one it received from a provider and what came of it."""

    deployment_id: str
    direction: BidDirection
    peer_id: str
    slot: str
    outcome: BidOutcome
    reason: str = ""
    lease_id: str | None = None
    price: float | None = None
    at: float | None = None  # when it was written (None: not yet; the writer's clock)
    id: int | None = None  # the table's key, once written

    def columns(self, at: float) -> dict[str, Any]:
        """The columns to insert (``at`` when the row holds none)."""
        return {
            "deployment_id": self.deployment_id,
            "direction": self.direction,
            "peer_id": self.peer_id,
            "slot": self.slot,
            "lease_id": self.lease_id,
            "price": self.price,
            "outcome": self.outcome,
            "reason": self.reason,
            "at": self.at if self.at is not None else at,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> BidRow:
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})


@dataclass(frozen=True, slots=True)
class MiningRow:
    """A mining session's row (its id is its deployment's). A column that is None was
    not given: a save leaves it as it was (``labels`` is read only when asked for)."""

    id: str
    algorithm: str | None = None
    phase: str | None = None  # a SessionPhase value
    progress: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    labels: list[Any] | None = None
    created_at: float | None = None
    updated_at: float | None = None
    # Not a column: why parts of the row as read could not be, by column (None: all could;
    # dms.orchestrator.stored.read_session). Never written.
    unreadable: Mapping[str, str] | None = None

    def columns(self) -> dict[str, Any]:
        """The columns given (what a save writes)."""
        given = {
            "id": self.id,
            "algorithm": self.algorithm,
            "phase": self.phase,
            "progress": self.progress,
            "checkpoint": self.checkpoint,
            "result": self.result,
            "labels": self.labels,
        }
        return {name: value for name, value in given.items() if value is not None}

    def updated_by(self, newer: MiningRow) -> MiningRow:
        """This row with the columns ``newer`` gives (an earlier save the store refused,
        with a later one's on top)."""
        return replace(self, **newer.columns())

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> MiningRow:
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})
