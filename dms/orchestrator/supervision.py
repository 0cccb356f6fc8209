"""A placed slot from commit to its end: commit, allocate, then supervise it running.

The winner's lease is committed (``committing``), its allocation started
(``allocating``); the allocate reply names the allocation and the slot is
``running``. The allocation pushes its end (``/dms/deployment/update``) and the
requester polls its status every ``supervise_s``. A slot is lost, reverted, its
peer excluded and the slot reopened for a new round, when:

- a commit or allocate is refused, or times out;
- a reply cannot be read (an allocate reply without an allocation handle, or
  naming one on another host; a status that is not a mapping, or whose state is
  no allocation state): ``a malformed ... from the provider``;
- the allocation fails or is stopped by someone else;
- the provider is ``gone`` in the peers table, or two polls go unanswered;
- the slot's deadline passes (``slots.py``): the backstop that keeps any slot
  from waiting for ever, whatever went wrong above.

Nothing a provider sends raises in this actor.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Protocol

from pydantic import ValidationError

from dms.actor import ErrorCode, Outcome, Refusal, Request
from dms.network.peertable import GONE
from dms.orchestrator.base import (
    GONE_REASON,
    DeploymentBook,
    Messenger,
    allocation_handle,
    allocation_ref,
    node_handle,
)
from dms.orchestrator.intake import first_error
from dms.orchestrator.messages import (
    ALLOCATE,
    AllocateReply,
    AllocationStatus,
    AllocationUpdate,
)
from dms.orchestrator.rounds import BidRounds
from dms.orchestrator.slots import HELD, Slot, SlotState
from dms.orchestrator.states import DEPLOYMENT, DeploymentState

STATUS = "/dms/allocation/status"


# The codes of the provider's ledger (``ResourceError``) when it refuses a commit.
LEDGER_REFUSALS = frozenset({"unknown", "forbidden", "ended", "expired"})


class SupervisionHost(Protocol):
    """What supervision asks of the deployment that holds it: its settling, and the
    hooks a deployment that drives its allocations (a mining session) overrides."""

    def settle(self) -> None:
        """Derive the deployment's state from its slots, and save what changed."""
        ...

    def slot_running(self, slot: Slot) -> None:
        """A slot's allocation has just started running (its handle is in the slot)."""
        ...

    def slot_lost(self, slot: Slot, reason: str) -> None:
        """A slot's allocation is gone (before the slot is reopened)."""
        ...

    def lost_line(self, slot: Slot, reason: str) -> str:
        """The one event line that says a slot's allocation is lost and placed again."""
        ...

    def heard_from(self, slot: Slot) -> bool:
        """Whether the slot's allocation answered something else lately."""
        ...


class Supervision:
    """Sees each placed slot of a deployment through commit, allocation and running;
    a lost one is reopened and handed to the bid rounds again."""

    def __init__(
        self,
        book: DeploymentBook,
        messenger: Messenger,
        rounds: BidRounds,
        host: SupervisionHost,
    ) -> None:
        self.book = book
        self.messenger = messenger
        self.rounds = rounds
        self.host = host
        self._misses: dict[str, int] = {}
        # An allocation's end pushed before its allocate reply came (a job of no length:
        # the allocation's update and its provider's reply travel apart), by slot: applied
        # when the reply makes the slot running. Dropped, it was seen only at the next
        # status poll, a second later.
        self._early: dict[str, AllocationUpdate] = {}

    # ---- commit, allocate ------------------------------------------------------------

    def _current(self, name: str, lease_id: str, state: SlotState) -> Slot | None:
        """The slot, if a reply about ``lease_id`` still concerns it."""
        slot = self.book.slots.get(name)
        if slot is None or slot.lease_id != lease_id or slot.state != state:
            return None
        return slot

    def commit(self, slot: Slot) -> None:
        """Commit the won lease and start its allocation in one exchange: the provider
        commits (its checks, its reasons) and allocates in one handler, so a placement
        costs two round trips (bid, allocate), not three."""
        assert slot.peer_id is not None and slot.lease_id is not None
        spec = self.book.by_slot[slot.name]
        self.messenger.invoke(
            node_handle(slot.peer_id),
            ALLOCATE,
            {"deployment_id": self.book.id, "slot": slot.name, "lease_id": slot.lease_id,
             "executor": spec.executor, "params": spec.params,
             "reply_to": self.messenger.handle.model_dump(), "commit": True},
            timeout=self.book.o.invoke_s,
            on_reply=partial(self._on_allocate, slot.name, slot.lease_id),
        )  # fmt: skip

    def _on_allocate(self, name: str, lease_id: str, outcome: Outcome) -> None:
        try:
            self._allocate_answered(name, lease_id, outcome)
        finally:
            self.book.send_held()  # the offers that lost, once no allocate is in flight

    def _allocate_answered(self, name: str, lease_id: str, outcome: Outcome) -> None:
        slot = self._current(name, lease_id, SlotState.COMMITTING)
        if slot is None:
            return
        if not outcome.ok:
            assert outcome.error is not None
            # The ledger's refusals (a lease unknown, ended, expired, not the caller's)
            # are the commit's; anything else is the allocation's.
            what = "commit" if outcome.error.code in LEDGER_REFUSALS else "allocation"
            self.lost(slot, f"{what} failed: {outcome.error.code}: {outcome.error.reason}")
            return
        slot.move(SlotState.ALLOCATING, "committed", self.book.deadlines)
        try:
            reply = AllocateReply.model_validate(outcome.result)
        except ValidationError as exc:
            self.lost(slot, f"a malformed allocate reply from the provider: {first_error(exc)}")
            return
        if reply.allocation.address.host != slot.peer_id:
            self.lost(slot, "a malformed allocate reply: its allocation is on another host")
            return
        slot.start(allocation_ref(reply.allocation), self.book.deadlines)
        if self.book.o.on_placed is not None and slot.peer_id:
            self.book.o.on_placed(slot.peer_id)
        self.book.event(f"{name}: running on {(slot.peer_id or '?')[-8:]}")
        if reply.status is not None:
            self._apply_status(slot, reply.status)
        early = self._early.pop(name, None)
        if early is not None and early.lease_id == lease_id:
            self._apply_status(slot, early)
        if slot.state == SlotState.RUNNING:
            self.host.slot_running(slot)
        self.host.settle()

    # ---- running ---------------------------------------------------------------------

    def update(self, request: Request) -> None:
        """An allocation pushes its state (the actor's ``UPDATE`` behaviour)."""
        status: AllocationUpdate = request.payload
        slot = self.book.slots.get(status.slot)
        if slot is None or slot.lease_id != status.lease_id:
            return
        if request.sender.address.host != slot.peer_id:
            raise Refusal(ErrorCode.FORBIDDEN, "only the provider may report on its allocation")
        if slot.state in (SlotState.COMMITTING, SlotState.ALLOCATING):
            self._early[slot.name] = status  # ahead of the allocate reply: kept for it
            return
        if slot.state == SlotState.RUNNING:
            slot.alive(self.book.deadlines)
        self._apply_status(slot, status)
        self.host.settle()

    def _apply_status(self, slot: Slot, status: AllocationStatus) -> None:
        if slot.state != SlotState.RUNNING or status.state in ("pending", "starting", "running"):
            return
        if status.state == "completed":
            slot.complete(status.result, self.book.deadlines)
            self.book.event(f"{slot.name}: completed")
        elif (
            self.book.state != DeploymentState.STOPPING
        ):  # failed, or stopped by someone else: place it again
            self.lost(slot, f"allocation {status.state}: {status.error or ''}".strip())

    def supervise(self) -> None:
        if self.book.state in DEPLOYMENT.terminal:
            return
        try:
            self._check_deadlines()
            if self.book.state not in DEPLOYMENT.terminal:
                self._check_running()
        finally:
            if self.book.state not in DEPLOYMENT.terminal:
                self.messenger.call_later(self.book.o.supervise_s, self.supervise)

    def _check_deadlines(self) -> None:
        """Every slot past its state's deadline is dealt with; none waits for ever."""
        now = time.time()
        late_open = [
            s for s in self.book.slots.values() if s.state == SlotState.OPEN and s.expired(now)
        ]
        if late_open:
            self.rounds.fail_unplaced(late_open)
            return
        for slot in list(self.book.slots.values()):
            if slot.state not in HELD or not slot.expired(now):
                continue
            if slot.state == SlotState.RUNNING and self.host.heard_from(slot):
                slot.alive(self.book.deadlines, now)
                continue
            waited = now - slot.since
            if slot.state == SlotState.RUNNING:
                self.lost(slot, f"no sign of life from the allocation for {waited:.0f} s")
            else:
                self.lost(slot, f"{slot.state.value} for {waited:.0f} s: past its deadline")
        self.host.settle()

    def _check_running(self) -> None:
        for slot in list(self.book.slots.values()):
            if slot.state != SlotState.RUNNING or slot.allocation is None:
                continue
            assert slot.peer_id is not None
            record = self.book.o.peer_table.get(slot.peer_id)
            if record is not None and record.status == GONE:
                self.lost(slot, GONE_REASON)
                continue
            try:
                self.messenger.invoke(
                    allocation_handle(slot.allocation),
                    STATUS,
                    timeout=self.book.o.poll_s,
                    on_reply=partial(self._on_poll, slot.name, slot.lease_id or ""),
                )
            except Exception as exc:
                self._poll_failed(slot, str(exc))
        self.host.settle()

    def _on_poll(self, name: str, lease_id: str, outcome: Outcome) -> None:
        slot = self._current(name, lease_id, SlotState.RUNNING)
        if slot is None:
            return
        if outcome.ok:
            try:
                status = AllocationStatus.model_validate(outcome.result)
            except ValidationError as exc:
                why = (
                    first_error(exc)
                    if isinstance(outcome.result, dict)
                    else (f"not a mapping but {type(outcome.result).__name__}")
                )
                self.lost(slot, f"a malformed status answer from the provider: {why}")
                self.host.settle()
                return
            self._misses.pop(name, None)
            slot.alive(self.book.deadlines)
            self._apply_status(slot, status)
        else:
            assert outcome.error is not None
            self._poll_failed(slot, f"{outcome.error.code}: {outcome.error.reason}")
        self.host.settle()

    def _poll_failed(self, slot: Slot, reason: str) -> None:
        if self.host.heard_from(slot):
            return
        misses = self._misses.get(slot.name, 0) + 1
        self._misses[slot.name] = misses
        if misses >= 2:
            self.lost(slot, f"the allocation does not answer ({reason})")

    # ---- losing a slot -----------------------------------------------------------------

    def lost(self, slot: Slot, reason: str) -> None:
        """Give the slot's lease back, exclude that peer, and place the slot again."""
        self.book.event(self.host.lost_line(slot, reason))
        if slot.peer_id and slot.lease_id:
            self.book.revert(slot.peer_id, [slot.lease_id])
        self.reopen(slot, reason)
        self.rounds.schedule(0.0)

    def reopen(self, slot: Slot, reason: str, exclude: bool = True) -> None:
        self.host.slot_lost(slot, reason)
        self._misses.pop(slot.name, None)
        if slot.terminal or self.book.state in DEPLOYMENT.terminal:
            return  # the hook ended the deployment (a mining session lost a shard too often)
        slot.reopen(reason, self.book.deadlines, exclude=exclude)
