"""The collaboration session: the proposer's side of a collaborative k-means on nodes.

A :class:`CollabSessionActor` is a deployment of one ``collab`` allocation (the
aggregator, ``dms.jobs.collab``) placed by the ordinary bid rounds. Once it
runs, the session follows the announced schedule and relays: it asks each
owner's node (``/dms/node/collab/owner``) for its next message and hands it to
the aggregator's session, and the aggregator's answers (roster, round start,
unmask requests, totals) back to the owners. It learns what the aggregator
learns (masked vectors, sealed shares, totals) and nothing more. Every call
to an owner has a deadline; an owner that does not answer in time is left
out of that step, which the protocol treats as a dropout. Nothing the owners
or the aggregator answer changes the schedule (DESIGN decision 13).

    placing -> joining -> rounds -> completed | failed

Not built yet: re-placing a lost aggregator and restarting the round (a lost
aggregator fails the session, with the reason).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from dms.actor import ActorContext, Handle, Outcome
from dms.jobs.allocation import SESSION_BEHAVIOUR, SessionAnswer, SessionCall
from dms.jobs.collab import UnmaskRequests
from dms.jobs.spec import DeploymentSpec
from dms.mining.collab import Proposal
from dms.mining.collab.messages import Roster, RoundStart, RoundTotals
from dms.mining.wire import decode, encode
from dms.network.transfer import Parcel
from dms.orchestrator.deployment import (
    DeploymentActor,
    Orchestration,
    allocation_handle,
    node_handle,
)
from dms.orchestrator.slots import Slot
from dms.orchestrator.states import COLLAB, CollabPhase
from dms.statemachine import Tracked

log = logging.getLogger("dms.collab")

OWNER_BEHAVIOUR = "/dms/node/collab/owner"
AGGREGATOR_TIMEOUT_S = 60.0
JOIN_RETRY_S = 1.0
Answers = dict[str, bytes]
Then = Callable[[Answers], None]


class OwnerCall(BaseModel):
    """The session asks an owner's node for its next message."""

    model_config = ConfigDict(extra="forbid")
    collab_id: str
    op: str
    body: bytes = b""


class CollabSessionActor(DeploymentActor):
    phase = Tracked(COLLAB)  # every move checked against COLLAB

    def __init__(
        self,
        context: ActorContext,
        orchestration: Orchestration,
        deployment_id: str,
        spec: DeploymentSpec,
        saved: dict[str, Any] | None = None,
        *,
        proposal: Proposal,
        owner_timeout_s: float,
        join_timeout_s: float,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(context, orchestration, deployment_id, spec, saved)
        self.proposal = proposal
        self.owner_timeout_s = owner_timeout_s
        self.join_timeout_s = join_timeout_s
        self.on_progress = on_progress
        self.phase = CollabPhase.PLACING
        self.reason = ""
        self.collab_round: int | None = None
        self.aggregator: Handle | None = None
        self.aggregator_peer: str | None = None
        self.dropped: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.began = time.monotonic()
        self.join_deadline = 0.0

    # ---- deployment hooks -------------------------------------------------------------

    def resumable(self) -> bool:
        return False

    def on_start(self) -> None:
        super().on_start()
        self._report()

    def slot_running(self, slot: Slot) -> None:
        assert slot.allocation is not None
        if self.aggregator is not None:
            return
        self.aggregator = allocation_handle(slot.allocation)
        self.aggregator_peer = slot.peer_id
        self.phase = CollabPhase.JOINING
        self.join_deadline = time.monotonic() + self.join_timeout_s
        self._event(f"aggregator running on {slot.peer_id}; asking the owners for their keys")
        self._report()
        self._adverts(list(self.proposal.owners), {})

    def slot_lost(self, slot: Slot, reason: str) -> None:
        if self.phase not in COLLAB.terminal and self.aggregator is not None:
            self._fail(f"the aggregator on {self.aggregator_peer} was lost: {reason}")

    def heard_from(self, slot: Slot) -> bool:
        return self.phase in (CollabPhase.JOINING, CollabPhase.ROUNDS)

    def ended(self, state: str, what: str) -> None:
        if self.phase not in COLLAB.terminal:
            self.phase = CollabPhase.FAILED
            self.reason = what
            self._report()

    # ---- setup ----------------------------------------------------------------------------

    def _adverts(self, missing: list[str], got: Answers) -> None:
        """Ask for keys until every owner joined or the join window closes."""

        def answered(answers: Answers) -> None:
            got.update(answers)
            still = [o for o in missing if o not in answers]
            if still and time.monotonic() < self.join_deadline:
                self.call_later(JOIN_RETRY_S, lambda: self._adverts(still, got))
                return
            ordered = [(o, got[o]) for o in self.proposal.owners if o in got]
            self._to_aggregator("advert", ordered, lambda _: self._roster())

        self._ask_owners(missing, "advert", lambda _: b"", answered)

    def _roster(self) -> None:
        def roster(body: bytes) -> None:
            listed = [a.owner for a in decode(Roster, body).adverts]
            self._event(f"roster: {len(listed)} of {len(self.proposal.owners)} owners")
            self._ask_owners(
                listed,
                "roster",
                lambda _: body,
                lambda shares: self._to_aggregator(
                    "shares", list(shares.items()), lambda _: self._start_round()
                ),
            )

        self._aggregator("roster", b"", roster)

    # ---- rounds ---------------------------------------------------------------------------

    def _start_round(self) -> None:
        self.phase = CollabPhase.ROUNDS

        def started(body: bytes) -> None:
            start = decode(RoundStart, body)
            self.collab_round = start.round
            self._report()
            self._ask_owners(
                start.live,
                "start",
                lambda _: body,
                lambda inputs: self._to_aggregator(
                    "input", list(inputs.items()), lambda _: self._close_inputs()
                ),
            )

        self._aggregator("start", b"", started)

    def _close_inputs(self) -> None:
        def closed(body: bytes) -> None:
            requests = decode(UnmaskRequests, body).requests
            self._ask_owners(
                list(requests),
                "unmask",
                lambda owner: encode(requests[owner]),
                lambda replies: self._to_aggregator(
                    "unmask", list(replies.items()), lambda _: self._totals()
                ),
            )

        self._aggregator("close", b"", closed)

    def _totals(self) -> None:
        def summed(body: bytes) -> None:
            totals = decode(RoundTotals, body)
            self.dropped += [{"owner": o, "round": totals.round} for o in totals.dropped]
            if totals.dropped:
                self._event(f"round {totals.round}: dropped {', '.join(totals.dropped)}")
            last = totals.round >= self.proposal.rounds
            self._ask_owners(
                totals.survivors,
                "totals",
                lambda _: body,
                lambda _: self._complete() if last else self._start_round(),
            )

        self._aggregator("totals", b"", summed)

    def _complete(self) -> None:
        self.phase = CollabPhase.COMPLETED
        self.reason = "completed"
        self._event(f"collaboration completed in {time.monotonic() - self.began:.1f} s")
        self._report()
        self._aggregator("end", b"", lambda _: None)

    def _fail(self, reason: str) -> None:
        if self.phase in COLLAB.terminal:
            return
        self.phase = CollabPhase.FAILED
        self.reason = reason
        self._report()
        self._abort(f"collaboration failed: {reason}")

    # ---- plumbing ---------------------------------------------------------------------

    def _ask_owners(
        self, owners: list[str], op: str, body_for: Callable[[str], bytes], then: Then
    ) -> None:
        """Ask each owner in ``owners``; ``then(answers)`` once all answered or failed.
        An owner that fails or misses the deadline is simply absent from the answers."""
        answers: Answers = {}
        waiting = set(owners)
        if not waiting:
            then(answers)
            return

        def on_reply(owner: str, outcome: Outcome) -> None:
            if owner not in waiting or self.phase in COLLAB.terminal:
                return
            waiting.discard(owner)
            if outcome.ok and isinstance(outcome.result, dict):
                answers[owner] = outcome.result.get("body", b"")
            elif op != "advert" or time.monotonic() >= self.join_deadline:
                error = outcome.error
                why = f"{error.code}: {error.reason}" if error else "no answer"
                log.info("collab %s: %s from %s failed: %s", self.id, op, owner, why)
            if not waiting:
                then(answers)

        for owner in owners:
            call = OwnerCall(collab_id=self.proposal.collab_id, op=op, body=body_for(owner))
            try:
                self.invoke(
                    node_handle(owner),
                    OWNER_BEHAVIOUR,
                    call.model_dump(),
                    timeout=self.owner_timeout_s,
                    on_reply=lambda outcome, o=owner: on_reply(o, outcome),
                )
            except Exception as exc:  # not even sent: that owner is absent this step
                log.info("collab %s: %s to %s not sent: %s", self.id, op, owner, exc)
                self.call_later(0.0, lambda o=owner: on_reply(o, Outcome()))

    def _to_aggregator(
        self, op: str, messages: list[tuple[str, bytes]], then: Callable[[None], None]
    ) -> None:
        """Hand the owners' messages to the aggregator one after another. A message it
        refuses is noted with the reason and not used; the schedule goes on."""
        if not messages:
            then(None)
            return
        (owner, body), rest = messages[0], messages[1:]

        def next_one(outcome: Outcome) -> None:
            if self.phase in COLLAB.terminal:
                return
            if not outcome.ok:
                assert outcome.error is not None
                if self._aggregator_failed(outcome):
                    return
                self.refused.append(f"{owner} {op}: {outcome.error.reason}")
                self._event(f"{owner}'s {op} refused: {outcome.error.reason}")
            self._to_aggregator(op, rest, then)

        self._call_aggregator(op, body, next_one)

    def _aggregator(self, op: str, body: bytes, then: Callable[[bytes], None]) -> None:
        def answered(outcome: Outcome) -> None:
            if self.phase in COLLAB.terminal and op != "end":
                return
            if not outcome.ok:
                assert outcome.error is not None
                if not self._aggregator_failed(outcome):
                    self._fail(f"the aggregator refused {op}: {outcome.error.reason}")
                return
            try:
                answer = SessionAnswer.model_validate(outcome.result)
            except Exception as exc:
                self._fail(f"a malformed answer from the aggregator: {exc}")
                return
            then(answer.parcel.inline or b"")

        self._call_aggregator(op, body, answered)

    def _aggregator_failed(self, outcome: Outcome) -> bool:
        """A failure of the aggregator itself (too few owners, it stopped): fail the session."""
        error = outcome.error
        assert error is not None
        if error.code == "bad_payload":
            return False  # a refused message: the aggregator goes on
        self._fail(error.reason)
        return True

    def _call_aggregator(self, op: str, body: bytes, on_reply: Callable[[Outcome], None]) -> None:
        assert self.aggregator is not None
        call = SessionCall(op=op, parcel=Parcel(inline=body))
        self.invoke(
            self.aggregator,
            SESSION_BEHAVIOUR,
            call.model_dump(),
            timeout=AGGREGATOR_TIMEOUT_S,
            on_reply=on_reply,
        )

    def progress(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "collab_id": self.proposal.collab_id,
            "phase": self.phase.value,
            "reason": self.reason,
            "round": self.collab_round,
            "rounds": self.proposal.rounds,
            "aggregator": self.aggregator_peer,
            "dropped": self.dropped,
            "refused": self.refused[-20:],
            "deployment": self.state,
        }

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress())
