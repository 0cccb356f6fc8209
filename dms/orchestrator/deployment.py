"""The requester's orchestrator: one child actor of the node per deployment.

States (saved on every transition, ``specs/orchestration.md``)::

    queued <-> bidding -> committing -> allocating -> running -> completed
        \\________________________________________________/  \\-> failed | shutdown

The deployment's state is derived from its slots, each a typed state machine
with a deadline in every state that is not final (``slots.py``). The actor
holds two parts that work on those slots, each built with what it needs: its
bid rounds place the open ones (``rounds.py``), and its supervision sees each
placed one through commit, allocation and running, and reopens it when it is
lost (``supervision.py``); both share the deployment's book (``base.py``). This
module holds what is the deployment's own: its start and resumption, its end,
the owner's shutdown, and the status people and scripts read. Nothing here
blocks: every request is an invoke with a callback that runs back in this actor.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from dms.actor import Actor, ActorContext, Request, behaviour
from dms.backoff import Backoff
from dms.jobs.spec import DeploymentSpec
from dms.orchestrator.base import (
    DeploymentBook,
    Orchestration,
    allocation_handle,
    allocation_ref,
    new_deployment_id,
    node_handle,
)
from dms.orchestrator.messages import BID, UPDATE, AllocationUpdate, Bid
from dms.orchestrator.rounds import BidRounds, misfit
from dms.orchestrator.slots import HELD, Slot, SlotState
from dms.orchestrator.states import DEPLOYMENT, DeploymentState
from dms.orchestrator.stored import unreadable_reason
from dms.orchestrator.supervision import Supervision

log = logging.getLogger("dms.orchestrator")

__all__ = [
    "DRIVERS",
    "SHUTDOWN",
    "DeploymentActor",
    "Orchestration",
    "actor_for",
    "allocation_handle",
    "allocation_ref",
    "drives",
    "misfit",
    "new_deployment_id",
    "node_handle",
    "summarize",
]

SHUTDOWN = "/dms/deployment/shutdown"
STOP = "/dms/allocation/stop"
END_RETRY = Backoff(first_s=0.5, max_s=30.0)  # saving an end the store refused, again


class DeploymentActor(Actor):
    """One deployment: its book (row, slots, events), its bid rounds and its supervision,
    each built here with what it needs; the actor routes behaviours and timers to them
    and holds what is the deployment's own (its start, its end, its status)."""

    def __init__(
        self,
        context: ActorContext,
        orchestration: Orchestration,
        deployment_id: str,
        spec: DeploymentSpec,
        saved: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(context)
        self.o = orchestration
        self.id = deployment_id
        self.spec = spec
        self.book = DeploymentBook(self, orchestration, deployment_id, spec, saved)
        self.rounds = BidRounds(self.book, self, self)
        self.supervision = Supervision(self.book, self, self.rounds, self)
        self._resumed = bool(self.book.row.events)  # a saved row, after a restart
        if not self._resumed:
            # Saved here, on the spawning thread, before the node answers with its id: a
            # status asked at once finds it (saved in on_start, on the actor's own thread,
            # it could come after that answer and the question). A store busy past the
            # node's bound (another process holds it locked) raises: the owner's command
            # is refused saying so, and nothing starts. Refused otherwise (a read-only
            # file), the deployment places all the same, saved at a later transition.
            self.book.event(f"deployment {spec.name!r}: {len(self.book.slots)} allocation(s)")
            self.book.save(busy_raises=True)
        # Answers for its leases from now on (``Orchestration.live``); resumed, its
        # running slots are held before its first turn.
        self.o.live[self.id] = self.book

    @property
    def state(self) -> DeploymentState:
        return self.book.state

    def store_bound(self) -> contextlib.AbstractContextManager[Any]:
        """This deployment's thread waits for the store the node's ``store_wait_s`` at
        most (another process holding it locked froze it 30 s a save): a save past it is
        refused, noted in its events and tried again (``DeploymentBook.save``), its end
        too (``_leave_when_saved``); its saves still share transactions with other
        deployments' (``GroupCommit``)."""
        wait = self.o.store_wait_s
        if wait is None:
            return contextlib.nullcontext()
        return self.o.store.db.waiting_at_most(wait)

    # ---- hooks for subclasses (the sessions that drive their allocations) ----------------

    def resumable(self) -> bool:
        """Whether this deployment may carry on after its node restarted."""
        return True

    def slot_running(self, slot: Slot) -> None:
        """A slot's allocation has just started running (its handle is in the slot)."""

    def slot_lost(self, slot: Slot, reason: str) -> None:
        """A slot's allocation is gone (before the slot is reopened)."""

    def lost_line(self, slot: Slot, reason: str) -> str:
        """The one event line that says a slot's allocation is lost and placed again."""
        return f"{slot.name}: {reason}; placing it again"

    def heard_from(self, slot: Slot) -> bool:
        """Whether the slot's allocation answered something else lately (session traffic
        counts as liveness: a poll that times out behind a large transfer is no death)."""
        return False

    def ended(self, state: DeploymentState, what: str) -> None:
        """The deployment reached a terminal state."""

    def excludes(self, name: str, peer: str) -> bool:
        """Whether slot ``name`` may not go to ``peer`` (the bid rounds ask)."""
        return self.book.excludes(name, peer)

    def commit(self, slot: Slot) -> None:
        """The bid rounds chose a winner for ``slot``: supervision takes it from here."""
        self.supervision.commit(slot)

    # ---- behaviours ------------------------------------------------------------------

    @behaviour(BID, public=True, payload=Bid)
    def bid_received(self, request: Request) -> None:
        """Bids answering a gossip request come here, point to point."""
        self.rounds.bid_received(request)

    @behaviour(UPDATE, public=True, payload=AllocationUpdate)
    def update(self, request: Request) -> None:
        """An allocation pushes its state."""
        self.supervision.update(request)

    # ---- lifecycle -----------------------------------------------------------------

    def on_start(self) -> None:
        if self._resumed:
            self._resume()
        self.rounds.schedule(0.0)
        self.call_later(self.o.supervise_s, self.supervision.supervise)

    def start_failed(self, exc: Exception) -> bool:
        """A bug in its start (or a resumed row it cannot carry on from): it fails,
        saying so, and gives back every lease, not left bidding for ever (and resumed,
        to fail again, at every restart)."""
        log.exception("deployment %s could not start", self.id)
        try:
            self.abort(f"the deployment could not start: {type(exc).__name__}: {exc}")
        except Exception:  # its end raised too: stopped as pykka stops it
            log.exception("deployment %s could not fail either", self.id)
            self.o.live.pop(self.id, None)  # nothing supervises its slots
            return False
        return True

    def stopping(self) -> None:
        self.o.live.pop(self.id, None)
        # A node that stops with an allocate in flight sends what it held for it: the
        # losing offers' leases, else held until they expire.
        try:
            self.book.send_held(force=True)
        except Exception:  # the node may be stopping its network too
            log.info("deployment %s: held reverts not sent at its stop", self.id)

    def _resume(self) -> None:
        """After a restart: revert what was half done, keep supervising what runs."""
        if not self.resumable():
            self._finish(
                DeploymentState.FAILED, "the requester restarted, and this deployment cannot resume"
            )
            return
        for slot in self.book.slots.values():
            if slot.state in (SlotState.COMMITTING, SlotState.ALLOCATING):
                self.book.revert(slot.peer_id, [slot.lease_id] if slot.lease_id else [])
                # Not the peer's fault: it stays eligible.
                self.supervision.reopen(
                    slot, "the requester restarted before it was running", False
                )
            elif not slot.terminal:  # open: a new placement deadline; running: polled again
                slot.alive(self.book.deadlines)
        self.book.event("resumed after a restart")
        self.settle()

    # ---- the end ---------------------------------------------------------------------

    def abort(self, what: str, per_slot: dict[str, str] | None = None) -> None:
        """Fail the deployment: stop what runs, give every lease back."""
        self._finish(DeploymentState.FAILED, what, per_slot)

    def _finish(
        self, state: DeploymentState, what: str, per_slot: dict[str, str] | None = None
    ) -> None:
        """End the deployment in ``state``: every slot not final ends too (``per_slot``:
        its own reason, else ``what``)."""
        for slot in self.book.slots.values():
            reason = (per_slot or {}).get(slot.name, what)
            if slot.state in HELD:
                self._stop_slot(slot, reason)
            elif slot.state == SlotState.OPEN:
                ending = SlotState.FAILED if state == DeploymentState.FAILED else SlotState.STOPPED
                slot.end(ending, reason, self.book.deadlines)
        # Whatever a provider may still hold for this deployment (a bid whose reply was
        # lost, a slot that did not complete) goes back now, not at its lease's expiry.
        unfinished = {s.peer_id for s in self.book.slots.values() if s.state != SlotState.COMPLETED}
        owing = {peer for peer, count in self.rounds.owing.items() if count > 0}
        everything = frozenset(p for p in self.book.uncertain | unfinished | owing if p)
        self.book.send_held(force=True, covered=everything)
        for peer in sorted(everything):
            self.book.revert(peer, [], everything=True)
        self.book.set_state(state)
        self.book.event(what)
        self.book.row.ended_at = time.time()
        try:
            self.ended(state, what)
        finally:
            self._leave_when_saved(END_RETRY.first_s)

    def _save_end(self) -> bool:
        """Save the deployment's end (a subclass adds its own rows); whether all were."""
        return self.book.save()

    def _leave_when_saved(self, wait_s: float) -> None:
        """Stop once the end is in the store. While the store refuses it (a full disk, a
        locked database), the actor stays, holding nothing (every lease was reverted),
        and tries again: a finished deployment must not look unfinished, and be resumed,
        after a restart (``DeploymentStore`` also keeps the end on disk meanwhile)."""
        if not self._save_end():
            log.warning("deployment %s ended (%s); saving it again in %g s", self.id,
                        self.state, wait_s)  # fmt: skip
            self.call_later(wait_s, lambda: self._leave_when_saved(END_RETRY.after(wait_s)))
            return
        self.o.live.pop(self.id, None)
        if self.o.on_end is not None:
            self.o.on_end(self.id)
        self.ref.stop_soon()

    def _stop_slot(self, slot: Slot, reason: str) -> None:
        if slot.allocation is not None:
            with contextlib.suppress(Exception):
                self.invoke(allocation_handle(slot.allocation), STOP, on_reply=lambda _: None)
        self.book.revert(slot.peer_id, [slot.lease_id] if slot.lease_id else [])
        slot.end(SlotState.STOPPED, reason, self.book.deadlines)

    def settle(self) -> None:
        """Derive the deployment's state from its slots, and save what changed."""
        if self.state in DEPLOYMENT.terminal:
            return
        states = [s.state for s in self.book.slots.values()]
        placed = all(s in (SlotState.RUNNING, SlotState.COMPLETED) for s in states)
        if placed and self.book.row.running_at is None:
            # When the last slot ran: a job of no length can complete in the same turn
            # as its allocate reply, and was placed all the same.
            ran = [s.running_at for s in self.book.slots.values() if s.running_at]
            self.book.row.running_at = max(ran) if len(ran) == len(states) else time.time()
        if all(s == SlotState.COMPLETED for s in states):
            self._finish(DeploymentState.COMPLETED, "every allocation completed")
            return
        if placed:
            self.book.set_state(DeploymentState.RUNNING)
        elif SlotState.ALLOCATING in states:
            self.book.set_state(DeploymentState.ALLOCATING)
        elif SlotState.COMMITTING in states:
            self.book.set_state(DeploymentState.COMMITTING)
        elif self.rounds.scheduled:
            self.book.set_state(DeploymentState.QUEUED)
        if self.book.changed():  # a status echo changes nothing, and saves nothing
            self.book.save()
        self.book.send_held()  # once no allocate is in flight

    # ---- owner -------------------------------------------------------------------------

    @behaviour(SHUTDOWN)
    def shutdown(self, request: Request) -> dict[str, Any]:
        if self.state not in DEPLOYMENT.terminal:
            self.book.set_state(DeploymentState.STOPPING)
            self._finish(DeploymentState.SHUTDOWN, "shut down by the owner")
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return summarize(self.book.stored_row())


# The deployment actor that drives allocations of an executor's kind (an interactive
# executor's session), put here by that actor's class (``@drives("mining")``): the node
# picks a deployment's actor from its spec without naming any (``actor_for``).
DRIVERS: dict[str, type[DeploymentActor]] = {}
A = TypeVar("A", bound=type[DeploymentActor])


def drives(kind: str) -> Callable[[A], A]:
    """Class decorator: deployments with an allocation of executor ``kind`` run as it."""

    def register(cls: A) -> A:
        held = DRIVERS.get(kind)
        if held is not None and held.__qualname__ != cls.__qualname__:
            raise ValueError(f"two actors drive {kind!r}: {held.__name__}, {cls.__name__}")
        DRIVERS[kind] = cls
        return cls

    return register


def actor_for(spec: DeploymentSpec) -> type[DeploymentActor]:
    """The actor class of a deployment of ``spec``: its executors' driver, if any."""
    kinds = sorted({a.executor for a in spec.allocations} & DRIVERS.keys())
    return DRIVERS[kinds[0]] if kinds else DeploymentActor


def summarize(row: dict[str, Any]) -> dict[str, Any]:
    """The status people and scripts read (from a live actor or the store)."""
    return {
        "id": row["id"],
        "name": row["name"],
        "state": row["state"],
        "strategy": row["spec"].get("strategy"),
        "created_at": row["created_at"],
        "running_at": row.get("running_at"),
        "ended_at": row.get("ended_at"),
        "slots": [
            {
                "slot": s["slot"],
                "status": s["status"],
                "peer_id": s.get("peer_id"),
                "attempts": s.get("attempts") or 0,
                "error": s.get("error"),
                "result": s.get("result"),
            }
            for s in row["slots"]
        ],
        "events": row["events"],
        # Why parts of its stored record cannot be read (None: all can; dms.orchestrator.stored).
        "unreadable": unreadable_reason(row) or None,
    }
