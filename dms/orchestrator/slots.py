"""A deployment's slot (one allocation of its spec) as a typed state machine.

::

    open -> committing -> allocating -> running -> completed
     ^          |             |            |
     +----------+-------------+------------+   lost: that peer excluded, placed again
    open | committing | allocating | running -> stopped   the deployment ends
    open -> failed                                         it ends before this slot was placed

Every move goes through :meth:`Slot.move`, which checks :data:`TRANSITIONS` (``SLOT``)
(a move not in the table is a bug and raises :class:`SlotTransitionError`),
records why (``reason``) and when (``since``), and sets the deadline of the
state entered. No slot waits in a non-terminal state without one:

- ``open``: the placement deadline, ``deadline_s`` after the slot was (re)opened;
- ``committing``, ``allocating``: the invoke's timeout plus a grace, so a reply
  that never comes, or one that cannot be read, still ends the wait;
- ``running``: the last sign of life (a status poll or an update answered, or
  session traffic) plus ``liveness_s``; each one pushes it on (:meth:`Slot.alive`).

Slots are stored as the JSON they always were (``to_row``/``from_row``: the same
keys, ``status`` the state's word), plus ``reason``, ``since`` and ``deadline``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dms.statemachine import Machine, TransitionError


class SlotState(StrEnum):
    OPEN = "open"
    COMMITTING = "committing"
    ALLOCATING = "allocating"
    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"


S = SlotState
TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    S.OPEN: frozenset({S.COMMITTING, S.STOPPED, S.FAILED}),
    S.COMMITTING: frozenset({S.ALLOCATING, S.OPEN, S.STOPPED}),
    S.ALLOCATING: frozenset({S.RUNNING, S.OPEN, S.STOPPED}),
    S.RUNNING: frozenset({S.COMPLETED, S.OPEN, S.STOPPED}),
    S.COMPLETED: frozenset(),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset(),
}
SLOT = Machine("slot", SlotState, TRANSITIONS)
HELD = frozenset({S.COMMITTING, S.ALLOCATING, S.RUNNING})  # a provider holds something for it


class SlotTransitionError(TransitionError):
    """A move the transition table does not allow: a bug in the orchestrator."""


@dataclass(frozen=True)
class Deadlines:
    """How long a slot may stay in each non-terminal state."""

    placement_s: float  # open: to be running, from when the slot was (re)opened
    invoke_s: float  # committing, allocating: the commit / allocate invoke's timeout ...
    grace_s: float  # ... plus this, for its reply to be handled
    liveness_s: float  # running: since the allocation's last sign of life

    def of(self, state: SlotState, slot: Slot, now: float) -> float | None:
        if state == S.OPEN:
            return slot.placing_since + self.placement_s
        if state in (S.COMMITTING, S.ALLOCATING):
            return now + self.invoke_s + self.grace_s
        if state == S.RUNNING:
            return now + self.liveness_s
        return None


@dataclass
class Slot:
    name: str
    state: SlotState = S.OPEN
    peer_id: str | None = None
    lease_id: str | None = None
    allocation: dict[str, str] | None = None  # the allocation's handle (allocation_ref)
    attempts: int = 0
    excluded: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # per peer: the last word on it
    result: Any = None
    error: str | None = None  # why it was last lost, or why it failed
    placing_since: float = 0.0
    running_at: float | None = None
    reason: str = ""  # why it entered its state
    since: float = 0.0
    deadline: float | None = None
    # Peers that declined it for a reason no retry changes (not stored: a restart asks again).
    declined_for_good: dict[str, str] = field(default_factory=dict)

    @classmethod
    def new(cls, name: str, deadlines: Deadlines, now: float | None = None) -> Slot:
        now = time.time() if now is None else now
        slot = cls(name, placing_since=now, reason="new", since=now)
        slot.deadline = deadlines.of(S.OPEN, slot, now)
        return slot

    @property
    def terminal(self) -> bool:
        return self.state in SLOT.terminal

    # ---- transitions ------------------------------------------------------------------

    def move(
        self, to: SlotState, reason: str, deadlines: Deadlines, now: float | None = None
    ) -> None:
        """Enter ``to`` for ``reason``; its deadline follows from ``deadlines``."""
        if not SLOT.allows(self.state, to):
            raise SlotTransitionError(
                f"slot {self.name}: {self.state.value} -> {to.value} is not allowed ({reason})"
            )
        now = time.time() if now is None else now
        if to == S.OPEN:
            self.placing_since = now
        self.state, self.reason, self.since = to, reason, now
        self.deadline = deadlines.of(to, self, now)

    def alive(self, deadlines: Deadlines, now: float | None = None) -> None:
        """A sign of life in ``running`` (or a restart): the same state, a new deadline."""
        if self.terminal:
            raise SlotTransitionError(f"slot {self.name} is {self.state.value}: no deadline")
        now = time.time() if now is None else now
        if self.state == S.OPEN:
            self.placing_since = now
        self.deadline = deadlines.of(self.state, self, now)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def choose(self, peer: str, lease_id: str, reason: str, deadlines: Deadlines) -> None:
        """open -> committing on ``peer``'s lease (an attempt)."""
        self.move(S.COMMITTING, reason, deadlines)
        self.peer_id, self.lease_id = peer, lease_id
        self.attempts += 1

    def start(self, allocation: dict[str, str], deadlines: Deadlines) -> None:
        """allocating -> running: the allocate reply named the allocation."""
        self.move(S.RUNNING, f"running on {(self.peer_id or '?')[-8:]}", deadlines)
        self.allocation = allocation
        self.running_at = self.since

    def complete(self, result: Any, deadlines: Deadlines) -> None:
        self.move(S.COMPLETED, "the allocation completed", deadlines)
        self.result = result

    def reopen(self, reason: str, deadlines: Deadlines, exclude: bool = True) -> None:
        """Back to open: the peer's lease is gone; ``exclude`` keeps the slot off that peer."""
        if self.peer_id:
            self.reasons[self.peer_id] = reason
            if exclude and self.peer_id not in self.excluded:
                self.excluded.append(self.peer_id)
        self.move(S.OPEN, reason, deadlines)
        self.peer_id = self.lease_id = self.allocation = self.running_at = None
        self.error = reason

    def end(self, to: SlotState, reason: str, deadlines: Deadlines) -> None:
        """stopped (the deployment ends) or failed (it failed before this slot was placed)."""
        self.move(to, reason, deadlines)
        if to == S.FAILED:
            self.error = reason

    # ---- the stored form ----------------------------------------------------------------

    def to_row(self) -> dict[str, Any]:
        return {
            "slot": self.name,
            "status": self.state.value,
            "peer_id": self.peer_id,
            "lease_id": self.lease_id,
            "allocation": self.allocation,
            "attempts": self.attempts,
            "excluded": list(self.excluded),
            "reasons": dict(self.reasons),
            "result": self.result,
            "error": self.error,
            "placing_since": self.placing_since,
            "running_at": self.running_at,
            "reason": self.reason,
            "since": self.since,
            "deadline": self.deadline,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Slot:
        """A stored slot (rows written before ``reason``/``deadline`` existed load too).
        One that cannot be carried on from raises :class:`ValueError` (or ``KeyError``,
        ``TypeError``) saying why: not a mapping, an unknown status, or a held one
        (committing, allocating, running) that names no peer or lease, or, running, no
        allocation handle (:func:`held_problem`)."""
        if not isinstance(row, dict):
            raise ValueError(f"a slot stored as {type(row).__name__}, not an object")
        name = row["slot"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"a slot named {name!r}")
        try:
            state = SlotState(row["status"])
        except ValueError:
            raise ValueError(f"slot {name}: unknown status {row['status']!r}") from None
        problem = held_problem(state, row)
        if problem:
            raise ValueError(f"slot {name} is {state.value} but {problem}")
        return cls(
            name=name,
            state=state,
            peer_id=row.get("peer_id"),
            lease_id=row.get("lease_id"),
            allocation=row.get("allocation"),
            attempts=int(row.get("attempts") or 0),
            excluded=list(row.get("excluded") or []),
            reasons=dict(row.get("reasons") or {}),
            result=row.get("result"),
            error=row.get("error"),
            placing_since=float(row.get("placing_since") or 0.0),
            running_at=row.get("running_at"),
            reason=row.get("reason") or "",
            since=float(row.get("since") or row.get("placing_since") or 0.0),
            deadline=row.get("deadline"),
        )


def held_problem(state: SlotState, row: dict[str, Any]) -> str:
    """Why a stored slot in ``state`` cannot hold what that state says it holds ("":
    nothing wrong): a held slot names its peer and its lease (what a revert and the
    provider's held check go by), a running one its allocation's handle (what its
    polls go to)."""
    if state not in HELD:
        return ""
    for key in ("peer_id", "lease_id"):
        value = row.get(key)
        if not isinstance(value, str) or not value:
            return f"its {key} is {value!r}"
    if state != S.RUNNING:
        return ""
    handle = row.get("allocation")
    if not isinstance(handle, dict) or not all(
        isinstance(handle.get(k), str) and handle[k] for k in ("id", "host", "inbox")
    ):
        return f"its allocation is {handle!r}"
    try:
        bytes.fromhex(handle["id"])
    except ValueError:
        return f"its allocation's id {handle['id']!r} is not hex"
    return ""
