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
from typing import Any

from pydantic import ValidationError

from dms.actor import ErrorCode, Outcome, Refusal, Request, behaviour
from dms.network.peertable import GONE
from dms.orchestrator.base import (
    DeploymentBase,
    allocation_handle,
    allocation_ref,
    node_handle,
)
from dms.orchestrator.messages import (
    ALLOCATE,
    UPDATE,
    AllocateReply,
    AllocationStatus,
    AllocationUpdate,
)
from dms.orchestrator.rounds import first_error
from dms.orchestrator.slots import HELD, Slot, SlotState
from dms.orchestrator.states import DEPLOYMENT, DeploymentState

STATUS = "/dms/allocation/status"


# The codes of the provider's ledger (``ResourceError``) when it refuses a commit.
LEDGER_REFUSALS = frozenset({"unknown", "forbidden", "ended", "expired"})


class Supervision(DeploymentBase):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._misses: dict[str, int] = {}

    # ---- commit, allocate ------------------------------------------------------------

    def _current(self, name: str, lease_id: str, state: SlotState) -> Slot | None:
        """The slot, if a reply about ``lease_id`` still concerns it."""
        slot = self.slots.get(name)
        if slot is None or slot.lease_id != lease_id or slot.state != state:
            return None
        return slot

    def _commit(self, slot: Slot) -> None:
        """Commit the won lease and start its allocation in one exchange: the provider
        commits (its checks, its reasons) and allocates in one handler, so a placement
        costs two round trips (bid, allocate), not three."""
        assert slot.peer_id is not None and slot.lease_id is not None
        spec = self.by_slot[slot.name]
        self.invoke(
            node_handle(slot.peer_id),
            ALLOCATE,
            {"deployment_id": self.id, "slot": slot.name, "lease_id": slot.lease_id,
             "executor": spec.executor, "params": spec.params,
             "reply_to": self.handle.model_dump(), "commit": True},
            timeout=self.o.invoke_s,
            on_reply=partial(self._on_allocate, slot.name, slot.lease_id),
        )  # fmt: skip
        self.messages += 1

    def _on_allocate(self, name: str, lease_id: str, outcome: Outcome) -> None:
        slot = self._current(name, lease_id, SlotState.COMMITTING)
        if slot is None:
            return
        if not outcome.ok:
            assert outcome.error is not None
            # The ledger's refusals (a lease unknown, ended, expired, not the caller's)
            # are the commit's; anything else is the allocation's.
            what = "commit" if outcome.error.code in LEDGER_REFUSALS else "allocation"
            self._lost(slot, f"{what} failed: {outcome.error.code}: {outcome.error.reason}")
            return
        slot.move(SlotState.ALLOCATING, "committed", self.deadlines)
        try:
            reply = AllocateReply.model_validate(outcome.result)
        except ValidationError as exc:
            self._lost(slot, f"a malformed allocate reply from the provider: {first_error(exc)}")
            return
        if reply.allocation.address.host != slot.peer_id:
            self._lost(slot, "a malformed allocate reply: its allocation is on another host")
            return
        slot.start(allocation_ref(reply.allocation), self.deadlines)
        if self.o.on_placed is not None and slot.peer_id:
            self.o.on_placed(slot.peer_id)
        self._event(f"{name}: running on {(slot.peer_id or '?')[-8:]}")
        if reply.status is not None:
            self._apply_status(slot, reply.status)
        if slot.state == SlotState.RUNNING:
            self.slot_running(slot)
        self._settle()

    # ---- running ---------------------------------------------------------------------

    @behaviour(UPDATE, public=True, payload=AllocationUpdate)
    def update(self, request: Request) -> None:
        status: AllocationUpdate = request.payload
        slot = self.slots.get(status.slot)
        if slot is None or slot.lease_id != status.lease_id:
            return
        if request.sender.address.host != slot.peer_id:
            raise Refusal(ErrorCode.FORBIDDEN, "only the provider may report on its allocation")
        if slot.state == SlotState.RUNNING:
            slot.alive(self.deadlines)
        self._apply_status(slot, status)
        self._settle()

    def _apply_status(self, slot: Slot, status: AllocationStatus) -> None:
        if slot.state != SlotState.RUNNING or status.state in ("pending", "starting", "running"):
            return
        if status.state == "completed":
            slot.complete(status.result, self.deadlines)
            self._event(f"{slot.name}: completed")
        elif (
            self.state != DeploymentState.STOPPING
        ):  # failed, or stopped by someone else: place it again
            self._lost(slot, f"allocation {status.state}: {status.error or ''}".strip())

    def _supervise(self) -> None:
        if self.state in DEPLOYMENT.terminal:
            return
        try:
            self._check_deadlines()
            if self.state not in DEPLOYMENT.terminal:
                self._check_running()
        finally:
            if self.state not in DEPLOYMENT.terminal:
                self.call_later(self.o.supervise_s, self._supervise)

    def _check_deadlines(self) -> None:
        """Every slot past its state's deadline is dealt with; none waits for ever."""
        now = time.time()
        late_open = [s for s in self.slots.values() if s.state == SlotState.OPEN and s.expired(now)]
        if late_open:
            self._fail_unplaced(late_open)
            return
        for slot in list(self.slots.values()):
            if slot.state not in HELD or not slot.expired(now):
                continue
            if slot.state == SlotState.RUNNING and self.heard_from(slot):
                slot.alive(self.deadlines, now)
                continue
            waited = now - slot.since
            if slot.state == SlotState.RUNNING:
                self._lost(slot, f"no sign of life from the allocation for {waited:.0f} s")
            else:
                self._lost(slot, f"{slot.state.value} for {waited:.0f} s: past its deadline")
        self._settle()

    def _check_running(self) -> None:
        for slot in list(self.slots.values()):
            if slot.state != SlotState.RUNNING or slot.allocation is None:
                continue
            assert slot.peer_id is not None
            record = self.o.peer_table.get(slot.peer_id)
            if record is not None and record.status == GONE:
                self._lost(slot, "the provider is gone (missed its heartbeat deadline)")
                continue
            try:
                self.invoke(
                    allocation_handle(slot.allocation),
                    STATUS,
                    timeout=self.o.poll_s,
                    on_reply=partial(self._on_poll, slot.name, slot.lease_id or ""),
                )
            except Exception as exc:
                self._poll_failed(slot, str(exc))
        self._settle()

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
                self._lost(slot, f"a malformed status answer from the provider: {why}")
                self._settle()
                return
            self._misses.pop(name, None)
            slot.alive(self.deadlines)
            self._apply_status(slot, status)
        else:
            assert outcome.error is not None
            self._poll_failed(slot, f"{outcome.error.code}: {outcome.error.reason}")
        self._settle()

    def _poll_failed(self, slot: Slot, reason: str) -> None:
        if self.heard_from(slot):
            return
        misses = self._misses.get(slot.name, 0) + 1
        self._misses[slot.name] = misses
        if misses >= 2:
            self._lost(slot, f"the allocation does not answer ({reason})")

    # ---- losing a slot -----------------------------------------------------------------

    def _lost(self, slot: Slot, reason: str) -> None:
        """Give the slot's lease back, exclude that peer, and place the slot again."""
        self._event(self.lost_line(slot, reason))
        if slot.peer_id and slot.lease_id:
            self._revert(slot.peer_id, [slot.lease_id])
        self._reopen(slot, reason)
        self._schedule_round(0.0)

    def _reopen(self, slot: Slot, reason: str, exclude: bool = True) -> None:
        self.slot_lost(slot, reason)
        self._misses.pop(slot.name, None)
        if slot.terminal or self.state in DEPLOYMENT.terminal:
            return  # the hook ended the deployment (a mining session lost a shard too often)
        slot.reopen(reason, self.deadlines, exclude=exclude)
