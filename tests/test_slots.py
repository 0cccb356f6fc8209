"""A deployment slot's state machine: the table, the reasons, the deadlines, the stored form."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

from dms.orchestrator.deployment import summarize
from dms.orchestrator.slots import (
    SLOT,
    TRANSITIONS,
    Deadlines,
    Slot,
    SlotState,
    SlotTransitionError,
)

D = Deadlines(placement_s=60, invoke_s=10, grace_s=3, liveness_s=9)
STORED_KEYS = {
    "slot", "status", "peer_id", "lease_id", "allocation", "attempts", "excluded", "reasons",
    "result", "error", "placing_since", "running_at",
}  # fmt: skip


def slot_in(state: SlotState) -> Slot:
    """A slot brought to ``state`` by allowed moves only."""
    slot = Slot.new("w", D, now=1000.0)
    path = {
        SlotState.OPEN: [],
        SlotState.COMMITTING: [SlotState.COMMITTING],
        SlotState.ALLOCATING: [SlotState.COMMITTING, SlotState.ALLOCATING],
        SlotState.RUNNING: [SlotState.COMMITTING, SlotState.ALLOCATING, SlotState.RUNNING],
        SlotState.COMPLETED: [
            SlotState.COMMITTING, SlotState.ALLOCATING, SlotState.RUNNING, SlotState.COMPLETED
        ],
        SlotState.STOPPED: [SlotState.STOPPED],
        SlotState.FAILED: [SlotState.FAILED],
    }[state]  # fmt: skip
    for step in path:
        slot.move(step, f"to {step}", D, now=1000.0)
    return slot


@pytest.mark.parametrize(("start", "to"), list(itertools.product(SlotState, SlotState)))
def test_every_move_in_the_table_is_allowed_and_every_other_raises(
    start: SlotState, to: SlotState
) -> None:
    slot = slot_in(start)
    if to in TRANSITIONS[start]:
        slot.move(to, "because", D, now=2000.0)
        assert slot.state == to and slot.reason == "because" and slot.since == 2000.0
    else:
        with pytest.raises(SlotTransitionError, match=f"{start.value} -> {to.value}"):
            slot.move(to, "because", D, now=2000.0)
        assert slot.state == start


def test_every_state_but_the_final_ones_has_a_deadline() -> None:
    assert {SlotState.COMPLETED, SlotState.STOPPED, SlotState.FAILED} == SLOT.terminal
    for state in SlotState:
        slot = slot_in(state)
        if state in SLOT.terminal:
            assert slot.deadline is None and not TRANSITIONS[state]
            with pytest.raises(SlotTransitionError):
                slot.alive(D)
        else:
            assert slot.deadline is not None, state
    assert slot_in(SlotState.OPEN).deadline == 1000.0 + 60  # the placement deadline
    assert slot_in(SlotState.COMMITTING).deadline == 1000.0 + 10 + 3  # the invoke's timeout
    assert slot_in(SlotState.ALLOCATING).deadline == 1000.0 + 10 + 3
    running = slot_in(SlotState.RUNNING)
    assert running.deadline == 1000.0 + 9
    running.alive(D, now=1005.0)  # a poll answered: supervision moves the deadline on
    assert running.deadline == 1014.0 and not running.expired(1013.0) and running.expired(1015)


def test_a_lost_slot_reopens_with_its_reason_and_the_peer_excluded() -> None:
    slot = Slot.new("w", D, now=1000.0)
    slot.choose("peer-a", "lease-1", "won: score 0.6", D)
    assert (slot.state, slot.attempts, slot.peer_id) == (SlotState.COMMITTING, 1, "peer-a")
    slot.move(SlotState.ALLOCATING, "committed", D)
    slot.reopen("a malformed allocate reply", D)
    assert slot.state == SlotState.OPEN and slot.peer_id is None and slot.lease_id is None
    assert slot.excluded == ["peer-a"] and slot.reasons["peer-a"] == "a malformed allocate reply"
    assert slot.error == slot.reason == "a malformed allocate reply"
    assert slot.deadline == slot.placing_since + 60  # a new placement deadline


def running_slot() -> Slot:
    """A slot running as placement leaves one: on a peer's lease, with its handle."""
    slot = Slot.new("w", D, now=1000.0)
    slot.choose("peer-a", "lease-1", "won", D)
    slot.move(SlotState.ALLOCATING, "committed", D)
    slot.start({"id": "ab" * 32, "host": "peer-a", "inbox": "allocation-1"}, D)
    return slot


def test_the_stored_form_keeps_its_keys_and_words_and_old_rows_load() -> None:
    slot = running_slot()
    row = slot.to_row()
    assert row.keys() >= STORED_KEYS and row["status"] == "running"
    assert Slot.from_row(row) == slot
    old = {k: row[k] for k in STORED_KEYS}  # a row saved before reasons and deadlines
    loaded = Slot.from_row(old)
    assert loaded.state == SlotState.RUNNING and loaded.deadline is None
    loaded.alive(D, now=3000.0)  # what resuming does: supervised again
    assert loaded.deadline == 3009.0
    summary = summarize(
        {"id": "d", "name": "n", "state": "running", "spec": {"strategy": "score"},
         "created_at": 1.0, "slots": [row], "events": []}
    )  # fmt: skip
    assert set(summary["slots"][0]) == {"slot", "status", "peer_id", "attempts", "error", "result"}
    assert [s.value for s in SlotState] == [
        "open", "committing", "allocating", "running", "completed", "stopped", "failed"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"status": "paused"}, "slot w: unknown status 'paused'"),
        ({"lease_id": None}, "slot w is running but its lease_id is None"),
        ({"peer_id": ""}, "slot w is running but its peer_id is ''"),
        ({"allocation": None}, "slot w is running but its allocation is None"),
        ({"allocation": {"id": "zz", "host": "h", "inbox": "i"}}, "is not hex"),
        ({"attempts": "many"}, "invalid literal"),
    ],
)
def test_a_stored_slot_that_contradicts_itself_is_refused_saying_why(
    change: dict[str, Any], said: str
) -> None:
    """What a restart would carry on from: a held slot names its peer and lease (what a
    revert and the held check go by), a running one its allocation (what polls go to).
    One that does not is refused with the reason (``dms.orchestrator.stored`` then fails
    its deployment), not carried on from to fail later, somewhere else."""
    with pytest.raises(ValueError, match=re.escape(said)):
        Slot.from_row({**running_slot().to_row(), **change})
    ended = {**running_slot().to_row(), "status": "completed", "allocation": None}
    assert Slot.from_row(ended).state == SlotState.COMPLETED  # an ended slot holds nothing
