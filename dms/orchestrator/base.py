"""What a deployment's parts share: its row and slots, its events, and the node's services.

A deployment actor (``deployment.py``) holds two parts that work on the same
slots: its bid rounds place them (``rounds.py``) and its supervision sees each
one through commit, allocation and running (``supervision.py``). Each part is
built with what it needs: the :class:`DeploymentBook` (the state both read, and
the few primitives both use: an event, a revert, a save), the actor's messaging
(:class:`Messenger`), and what it asks of the deployment, declared where the
part is (``RoundsHost``, ``SupervisionHost``).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dms.actor import ROOT_INBOX, Address, Handle
from dms.actor.runtime import Messenger
from dms.jobs.spec import DeploymentSpec
from dms.network.peertable import PeerTable
from dms.orchestrator.messages import REVERT
from dms.orchestrator.records import BidRow
from dms.orchestrator.selection import RoundRobin
from dms.orchestrator.slots import HELD, Deadlines, Slot, SlotState
from dms.orchestrator.states import DEPLOYMENT, DeploymentState
from dms.orchestrator.store import DeploymentStore
from dms.security.identity import public_key_from_peer_id
from dms.store import STORE_RETRY, StoreBusy

log = logging.getLogger("dms.orchestrator")

EVENT_MEMORY = 200
# A provider the peer table says is gone: a running slot's loss, an open slot's last
# word on that peer (supervision.py, rounds.py).
GONE_PREFIX = "the provider is gone"
GONE_REASON = f"{GONE_PREFIX} (missed its heartbeat deadline)"
LEFT_REASON = f"{GONE_PREFIX} (it said it was leaving)"


@dataclass
class DeploymentRow:
    """A deployment as stored (the ``deployments`` table's columns but ``slots`` and
    ``updated_at``, which the store fills in). Its state moves only by :meth:`move`."""

    id: str
    name: str
    spec: dict[str, Any]
    created_at: float
    state: DeploymentState = DeploymentState.QUEUED
    events: list[dict[str, Any]] = field(default_factory=list)
    running_at: float | None = None
    ended_at: float | None = None

    def move(self, to: DeploymentState) -> bool:
        """Enter ``to`` (checked against ``DEPLOYMENT``); whether the state changed."""
        if to == self.state:
            return False
        self.state = DEPLOYMENT.check(self.state, to, self.id)
        return True

    def to_row(self, slots: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "spec": self.spec,
            "slots": slots,
            "events": self.events,
            "created_at": self.created_at,
            "running_at": self.running_at,
            "ended_at": self.ended_at,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> DeploymentRow:
        return cls(
            id=row["id"],
            name=row["name"],
            spec=row["spec"],
            created_at=row["created_at"],
            state=DeploymentState(row["state"]),
            events=list(row.get("events") or []),
            running_at=row.get("running_at"),
            ended_at=row.get("ended_at"),
        )


def node_handle(peer_id: str) -> Handle:
    return Handle(
        id=public_key_from_peer_id(peer_id), address=Address(host=peer_id, inbox=ROOT_INBOX)
    )


def allocation_ref(handle: Handle) -> dict[str, str]:
    """An allocation's handle as JSON keeps it (in the store and in status)."""
    return {"id": handle.id.hex(), "host": handle.address.host, "inbox": handle.address.inbox}


def allocation_handle(ref: dict[str, str]) -> Handle:
    return Handle(
        id=bytes.fromhex(ref["id"]), address=Address(host=ref["host"], inbox=ref["inbox"])
    )


def new_deployment_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class Orchestration:
    """What a deployment needs from its node (shared by all of them)."""

    peer_table: PeerTable
    store: DeploymentStore
    cursor: RoundRobin = field(default_factory=RoundRobin)
    rng: random.Random = field(default_factory=random.Random)
    # Peers asked per open slot, and never fewer than min_ask: two choices per slot
    # (specs/orchestration.md, "How many peers a round asks").
    fanout: int = 2
    min_ask: int = 2
    supervise_s: float = 1.0
    retry_s: float = 0.25  # first wait when nothing fits; doubles to retry_max_s
    retry_max_s: float = 2.0
    invoke_s: float = 10.0  # commit and allocate: how long their reply may take
    on_end: Callable[[str], None] | None = None
    # Sends a revert until it is acknowledged (the node's ``Reverts``, from any thread);
    # None: sent once, from the deployment actor.
    revert: Callable[[str, dict[str, Any]], None] | None = None
    # Told of each provider that started an allocation of ours (from the deployment's
    # thread): the node then has a stake in it (dms.node.stakes).
    on_placed: Callable[[str], None] | None = None
    # The longest a deployment's thread waits for the store (the node's store_wait_s):
    # a save past it is refused StoreBusy and tried again (DeploymentBook.save). None:
    # SQLite's busy timeout.
    store_wait_s: float | None = None
    # The books of the deployments whose actors run, by id: what the node answers a
    # provider that asks whether a lease is still held (``holds``), whichever thread a
    # deployment is busy on. Each adds itself when built and leaves when it ends.
    live: dict[str, DeploymentBook] = field(default_factory=dict)

    def holds(self, peer: str, deployment_id: str, lease_id: str) -> bool:
        """Whether a running deployment holds ``lease_id`` on ``peer`` (a slot committing,
        allocating or running on it)."""
        book = self.live.get(deployment_id)
        return book is not None and book.holds(peer, lease_id)

    @property
    def poll_s(self) -> float:
        """A status poll's timeout."""
        return max(1.0, self.supervise_s * 2)

    def deadlines(self, spec: DeploymentSpec) -> Deadlines:
        return Deadlines(
            placement_s=spec.deadline_s,
            invoke_s=self.invoke_s,
            grace_s=2 * self.supervise_s + 1.0,
            # Two polls unanswered lose a slot sooner; this is the backstop when answers
            # come but say nothing (or cannot be read).
            liveness_s=3 * (self.supervise_s + self.poll_s),
        )


def revert_payload(deployment_id: str, lease_ids: list[str], everything: bool) -> dict[str, Any]:
    """What ``/dms/deployment/revert`` carries: the leases of a deployment to give back,
    or everything it holds on the peer."""
    return {"deployment_id": deployment_id, "lease_ids": lease_ids, "everything": everything}


class DeploymentBook:
    """A deployment's own state, shared by its parts (the actor, its bid rounds, its
    supervision): its row and slots, its events, its saves and its reverts."""

    def __init__(
        self,
        messenger: Messenger,
        orchestration: Orchestration,
        deployment_id: str,
        spec: DeploymentSpec,
        saved: dict[str, Any] | None = None,
    ) -> None:
        self.messenger = messenger
        self.o = orchestration
        self.id = deployment_id
        self.spec = spec
        self.by_slot = dict(spec.slots())
        self.deadlines = orchestration.deadlines(spec)
        now = time.time()
        self.row = (
            DeploymentRow.from_row(saved)
            if saved
            else DeploymentRow(deployment_id, spec.name, spec.model_dump(mode="json"), now)
        )
        if saved:
            slots = [Slot.from_row(s) for s in saved["slots"]]
            names = sorted(s.name for s in slots)
            if names != sorted(self.by_slot):  # a slot not placed, or one no spec knows
                raise ValueError(f"its slots {names} are not its spec's {sorted(self.by_slot)}")
        else:
            slots = [Slot.new(name, self.deadlines, now) for name in self.by_slot]
        self.slots: dict[str, Slot] = {s.name: s for s in slots}
        self.uncertain: set[str] = set()  # peers that may hold leases we do not know of
        # Offers never committed that go back once no allocate is in flight (give_back):
        # by peer, the lease ids and what to call when the revert goes.
        self._held: dict[str, tuple[list[str], list[Callable[[], None]]]] = {}
        self._dirty = False
        self._saved_as: tuple[Any, ...] = ()
        self._bids: list[BidRow] = []  # bid index rows, written with the next save
        # A save the store refused: since when (monotonic), the next retry's wait, and
        # whether one is due (one timer at a time).
        self._unsaved_since: float | None = None
        self._retry_s = STORE_RETRY.first_s
        self._retry_due = False

    @property
    def state(self) -> DeploymentState:
        return self.row.state

    def set_state(self, state: DeploymentState) -> None:
        if self.row.move(state):
            self.event(f"state: {state}")

    def event(self, what: str) -> None:
        """Note ``what`` in the deployment's events (status shows them) and the log."""
        log.info("deployment %s: %s", self.id, what)
        self._dirty = True
        events = self.row.events
        events.append({"at": round(time.time(), 3), "what": what})
        if len(events) > EVENT_MEMORY:
            del events[: len(events) - EVENT_MEMORY]

    def stored_row(self) -> dict[str, Any]:
        return self.row.to_row([s.to_row() for s in self.slots.values()])

    def _fingerprint(self) -> tuple[Any, ...]:
        # Not the deadline: a running slot's moves on with every poll answered, and is
        # stored as it was at the slot's last transition.
        return tuple((s.name, s.state, s.since) for s in self.slots.values())

    def save(self, busy_raises: bool = False) -> bool:
        """One write per transition: of the deployment (an event) or of a slot. Whether
        the store took it (if not, the next transition saves again). ``busy_raises``: a
        store busy past the thread's bound raises :class:`StoreBusy` (the first save, on
        the node's thread: the owner's command is refused, nothing started)."""
        self._dirty = False
        self._saved_as = self._fingerprint()
        bids, self._bids = self._bids, []
        try:
            self.o.store.save(self.stored_row(), bids)
        except Exception as exc:  # keep placing; saved again soon, and at each transition
            self._bids = bids + self._bids  # and its bids with it
            if busy_raises and isinstance(exc, StoreBusy):
                raise
            log.warning("deployment %s not saved (nor %d bid(s)): %s", self.id, len(bids), exc)
            self._dirty = True  # what changed is still to save: no transition is lost
            self._save_later(exc)
            return False
        if self._unsaved_since is not None:
            log.info("deployment %s saved again, after %.1f s unsaved", self.id,
                     time.monotonic() - self._unsaved_since)  # fmt: skip
            self._unsaved_since = None
            self._retry_s = STORE_RETRY.first_s
        return True

    def _save_later(self, exc: Exception) -> None:
        """A save the store refused (busy past the thread's bound, or refusing) is tried
        again on a timer, waiting longer each time (``STORE_RETRY``), until one takes it:
        a slot's move saved by no later transition (a running job's, for an hour) was
        lost to a restart. The first refusal is an event, the reason people see in the
        deployment's status."""
        if self._unsaved_since is None:
            self._unsaved_since = time.monotonic()
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.event(f"not saved ({why}): saving again in {self._retry_s:g} s")
        if self._retry_due:
            return
        self._retry_due = True
        wait, self._retry_s = self._retry_s, STORE_RETRY.after(self._retry_s)
        self.messenger.call_later(wait, self._save_again)

    def _save_again(self) -> None:
        self._retry_due = False
        if self.changed():
            self.save()

    def add_bids(self, rows: list[BidRow]) -> None:
        """Bid index rows, written in the transaction of the next save (a round's end
        saves its slots' moves: one write, not two)."""
        self._bids += rows

    def write_bids(self) -> None:
        """Write the bid index rows that no save took."""
        bids, self._bids = self._bids, []
        try:
            self.o.store.record_bids(bids)
        except Exception as exc:  # the next save takes them
            log.warning("bids of %s not recorded: %s", self.id, exc)
            self._bids = bids + self._bids

    def changed(self) -> bool:
        return self._dirty or self._fingerprint() != self._saved_as

    def holds(self, peer: str, lease_id: str) -> bool:
        """Whether a slot holds ``lease_id`` on ``peer``: committing, allocating or
        running there. Read from the node's thread while the deployment's own moves
        its slots: a slot reopened or ended has let its lease go, whichever of its
        fields the read sees first (its state moves before its lease is cleared), and
        a slot's lease is set before its allocate is sent."""
        return any(
            s.lease_id == lease_id and s.peer_id == peer and s.state in HELD
            for s in list(self.slots.values())
        )

    def excludes(self, name: str, peer: str) -> bool:
        """Whether slot ``name`` may not go to ``peer`` (it lost the slot before, or the
        job's constraints keep it out)."""
        c = self.by_slot[name].constraints
        return (
            peer in self.slots[name].excluded
            or peer in c.exclude_peers
            or bool(c.include_peers and peer not in c.include_peers)
        )

    def revert(self, peer: str | None, lease_ids: list[str], everything: bool = False) -> None:
        if not peer or not (lease_ids or everything):
            return
        payload = revert_payload(self.id, lease_ids, everything)
        if self.o.revert is not None:
            self.o.revert(peer, payload)
            return
        try:
            self.messenger.send(node_handle(peer), REVERT, payload)
        except Exception as exc:  # an unreachable peer's leases expire on their own
            self.uncertain.add(peer)
            log.debug("revert to %s not sent: %s", peer, exc)

    def give_back(
        self, peer: str, lease_ids: list[str], sent: Callable[[], None] | None = None
    ) -> None:
        """Revert offers that were never committed (a round's losers, a late bid): at
        once, or, while an allocate of this deployment is in flight, once it is answered
        (``send_held``); ``sent`` is called when the revert goes. The allocate's exchange
        is the placement's path; a revert sent beside it (sealed and sent by this node,
        handled by the other provider, its answer read here) took turns at the same
        cores. The cost: a losing lease is held for the allocate's round trip longer (up
        to its timeout when the winner does not answer); one never sent (a crash)
        still expires at its lease's end."""
        if not peer or not lease_ids:
            return
        if self._allocate_in_flight():
            held = self._held.setdefault(peer, ([], []))
            held[0].extend(lease_ids)
            if sent is not None:
                held[1].append(sent)
            return
        self.revert(peer, lease_ids)
        if sent is not None:
            sent()

    def _allocate_in_flight(self) -> bool:
        return any(s.state == SlotState.COMMITTING for s in self.slots.values())

    def send_held(self, force: bool = False, covered: frozenset[str] = frozenset()) -> None:
        """Send the reverts ``give_back`` held, one a peer: when no allocate is in flight
        any more, or at once with ``force`` (a new round asks peers again; the deployment
        ends or stops). ``covered``: peers a revert of everything goes to anyway."""
        if not self._held:
            return
        if not force and self._allocate_in_flight():
            return
        held, self._held = self._held, {}
        for peer, (lease_ids, sent) in held.items():
            if peer in covered:
                continue
            self.revert(peer, lease_ids)
            for call in sent:
                call()

    def note_reason(self, peer: str, slots: list[str], reason: str) -> None:
        for name in slots:
            if name in self.slots:
                self.slots[name].reasons[peer] = reason
