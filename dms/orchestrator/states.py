"""The requester's protocol states: a deployment's (``DeploymentState``, ``DEPLOYMENT``),
a mining session's phase (``SessionPhase``, ``SESSION``) and a collaboration's
(``CollabPhase``, ``COLLAB``).

::

    queued | bidding | committing | allocating | running   (derived from the slots;
        any of these may follow any other as slots are placed, lost and placed again)
      -> completed    every slot completed
      -> failed       aborted: a slot could not be placed in time, or the session failed
      -> stopping -> shutdown      the owner shut it down

A mining session (``mining.py``)::

    placing -> shipping -> mining -> completed
    placing | shipping | mining -> failed

Each shard of a mining session (``mining.Shard``; no final state, it ends with its
session)::

    unplaced -> placed -> shipping -> placed -> ready <-> working
    placed -> ready            (nothing to ship first)
    placed | shipping | ready | working -> unplaced      its worker was lost

A collaboration (``collab.py``)::

    placing -> joining -> rounds -> completed
    placing | joining | rounds -> failed

The terminal states are ``DEPLOYMENT.terminal``, ``SESSION.terminal``, ``COLLAB.terminal``
(``dms.statemachine``): the store, the CLI, the simulator and the benchmarks all
read them from here. A slot's states are in ``slots.py``; an allocation's in
``dms.jobs.allocation``.
"""

from __future__ import annotations

from enum import StrEnum

from dms.statemachine import Machine


class DeploymentState(StrEnum):
    QUEUED = "queued"
    BIDDING = "bidding"
    COMMITTING = "committing"
    ALLOCATING = "allocating"
    RUNNING = "running"
    STOPPING = "stopping"
    COMPLETED = "completed"
    FAILED = "failed"
    SHUTDOWN = "shutdown"


D = DeploymentState
_PLACING = (D.QUEUED, D.BIDDING, D.COMMITTING, D.ALLOCATING, D.RUNNING)
DEPLOYMENT = Machine(
    "deployment",
    DeploymentState,
    {
        **{s: {*_PLACING, D.STOPPING, D.COMPLETED, D.FAILED} - {s} for s in _PLACING},
        D.STOPPING: {D.SHUTDOWN, D.FAILED},
        D.COMPLETED: set(),
        D.FAILED: set(),
        D.SHUTDOWN: set(),
    },
)


class SessionPhase(StrEnum):
    PLACING = "placing"
    SHIPPING = "shipping"
    MINING = "mining"
    COMPLETED = "completed"
    FAILED = "failed"


P = SessionPhase
SESSION = Machine(
    "mining session",
    SessionPhase,
    {
        P.PLACING: {P.SHIPPING, P.FAILED},
        P.SHIPPING: {P.MINING, P.FAILED},
        P.MINING: {P.COMPLETED, P.FAILED},
        P.COMPLETED: set(),
        P.FAILED: set(),
    },
)


class ShardState(StrEnum):
    UNPLACED = "unplaced"  # no worker
    PLACED = "placed"  # a worker runs it; its opening message not (yet) taken
    SHIPPING = "shipping"  # the opening message is in flight
    READY = "ready"  # the worker holds the owner's state: idle
    WORKING = "working"  # a step's operation is in flight


H = ShardState
SHARD = Machine(
    "shard",
    ShardState,
    {
        H.UNPLACED: {H.PLACED},
        H.PLACED: {H.SHIPPING, H.READY, H.UNPLACED},
        H.SHIPPING: {H.PLACED, H.UNPLACED},
        H.READY: {H.WORKING, H.UNPLACED},
        H.WORKING: {H.READY, H.UNPLACED},
    },
)


class CollabPhase(StrEnum):
    PLACING = "placing"
    JOINING = "joining"
    ROUNDS = "rounds"
    COMPLETED = "completed"
    FAILED = "failed"


C = CollabPhase
COLLAB = Machine(
    "collaboration",
    CollabPhase,
    {
        C.PLACING: {C.JOINING, C.FAILED},
        C.JOINING: {C.ROUNDS, C.FAILED},
        C.ROUNDS: {C.COMPLETED, C.FAILED},
        C.COMPLETED: set(),
        C.FAILED: set(),
    },
)
