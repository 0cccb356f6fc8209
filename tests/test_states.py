"""Every protocol state is a typed machine (dms.statemachine): an illegal move raises,
and the terminal states are derived once from the table."""

from __future__ import annotations

import pytest

from dms.jobs.allocation import ALLOCATION, AllocationState
from dms.network.peertable import PEER, PeerRecord, PeerState
from dms.orchestrator.base import DeploymentRow
from dms.orchestrator.mining import Shard
from dms.orchestrator.slots import SLOT
from dms.orchestrator.states import (
    COLLAB,
    DEPLOYMENT,
    SESSION,
    SHARD,
    CollabPhase,
    DeploymentState,
    SessionPhase,
    ShardState,
)
from dms.statemachine import Machine, Tracked, TransitionError


def test_terminal_states_are_those_with_no_move_out() -> None:
    assert DEPLOYMENT.terminal == {"completed", "failed", "shutdown"}
    assert ALLOCATION.terminal == {"completed", "failed", "stopped"}
    assert SLOT.terminal == {"completed", "stopped", "failed"}
    assert set(DEPLOYMENT.live) == {"queued", "bidding", "committing", "allocating", "running",
                                    "stopping"}  # fmt: skip
    # the stored words are the members: a row read back is terminal or not as before
    assert DEPLOYMENT.ended("shutdown") and not DEPLOYMENT.ended("running")


def test_a_deployment_row_refuses_a_move_out_of_an_end() -> None:
    row = DeploymentRow("d1", "job", {}, 0.0)
    assert row.move(DeploymentState.BIDDING) and not row.move(DeploymentState.BIDDING)
    row.move(DeploymentState.COMPLETED)
    with pytest.raises(TransitionError, match="deployment d1: completed -> running"):
        row.move(DeploymentState.RUNNING)
    # only the owner's shutdown (through stopping) ends in shutdown
    with pytest.raises(TransitionError):
        DEPLOYMENT.check("running", "shutdown")
    assert DeploymentRow.from_row(row.to_row([])).state is DeploymentState.COMPLETED


def test_a_tracked_attribute_checks_every_assignment() -> None:
    class Holder:
        state = Tracked(ALLOCATION)

    held = Holder()
    with pytest.raises(AttributeError):
        _ = held.state
    held.state = AllocationState.PENDING
    held.state = "starting"  # the stored word is accepted and typed
    assert held.state is AllocationState.STARTING
    with pytest.raises(TransitionError, match="starting -> completed"):
        held.state = AllocationState.COMPLETED
    held.state = AllocationState.RUNNING
    held.state = AllocationState.STOPPED
    with pytest.raises(TransitionError):
        held.state = AllocationState.RUNNING
    assert held.state is AllocationState.STOPPED


def test_a_machine_must_name_the_moves_of_every_state() -> None:
    with pytest.raises(ValueError, match="no moves given"):
        Machine("half", AllocationState, {AllocationState.PENDING: set()})


def test_a_mining_session_phase_moves_only_forward() -> None:
    assert SESSION.terminal == {"completed", "failed"}
    assert SESSION.allows(SessionPhase.MINING, SessionPhase.COMPLETED)
    # a session that failed (say, while the answers were combined) never completes
    with pytest.raises(TransitionError, match="failed -> completed"):
        SESSION.check(SessionPhase.FAILED, SessionPhase.COMPLETED)
    with pytest.raises(TransitionError):
        SESSION.check(SessionPhase.PLACING, SessionPhase.MINING)


def test_a_peer_is_alive_or_gone_and_a_move_is_checked() -> None:
    assert PEER.terminal == frozenset()  # a peer long gone is forgotten, not ended
    record = PeerRecord("12D3KooWpeer", "did:key:z", "nonce-000", PeerState.ALIVE, 0.0, 0.0, 0.0)
    record.move(PeerState.GONE)
    record.move(PeerState.GONE)  # the same state: no move
    assert record.status is PeerState.GONE and record.as_dict(0.0)["status"] == "gone"


def test_a_collaboration_phase_moves_only_forward() -> None:
    assert COLLAB.terminal == {"completed", "failed"}
    with pytest.raises(TransitionError, match="placing -> rounds"):
        COLLAB.check(CollabPhase.PLACING, CollabPhase.ROUNDS)


def test_a_shard_moves_through_its_worker_and_a_late_answer_moves_nothing() -> None:
    shard = Shard(0, "shard0", 10)
    assert SHARD.terminal == frozenset() and shard.state is ShardState.UNPLACED
    shard.placed()
    shard.busy = True  # the opening message goes out
    assert shard.state is ShardState.SHIPPING and shard.busy and not shard.ready
    shard.busy = False
    shard.ready = True
    shard.busy = True  # a step's operation
    assert shard.state is ShardState.WORKING and shard.ready
    shard.busy = False
    assert shard.state is ShardState.READY
    with pytest.raises(TransitionError, match="shard0: ready -> placed"):
        shard.placed()  # placed again without being lost first: a bug
    shard.lost()
    shard.busy = False  # what a lost worker's late answer does: nothing
    assert shard.state is ShardState.UNPLACED
