"""The collaboration session: the proposer's side of a collaborative k-means on nodes.

A :class:`CollabSessionActor` is a deployment of one ``collab`` allocation (the
aggregator, ``dms.jobs.collab``) placed by the ordinary bid rounds. Once it
runs, the session follows the announced schedule and relays: it asks each
owner's node (``/dms/node/collab/owner``) for its next message and hands it to
the aggregator's session, and the aggregator's answers (roster, round start,
unmask requests, totals) back to the owners. It learns what the aggregator
learns (masked vectors, sealed shares, totals) and nothing more. Every call
to an owner has a deadline; an owner that does not answer in time is left
out of that step: at setup it is dropped, in a round its missing input stops
the collaboration (no round is summed over fewer owners than another). Nothing
the owners or the aggregator answer changes the schedule (DESIGN decision 13).

    placing -> joining -> rounds -> completed | failed

A lost aggregator (its node gone, or a call to it unanswered) is placed
again like a lost worker. The new one is restored from what the session
relayed (the adverts, the roster acceptances, the completed rounds' survivors and
dropouts), and the round under way starts again over the same owners: each
owner sends the very input it sent in it before and gives the same unmask
answer (``CollabOwner.contribute``), so the attempts differ in nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dms.actor import ActorContext, Handle, Outcome
from dms.jobs.allocation import SESSION_BEHAVIOUR, SessionAnswer, SessionCall
from dms.jobs.collab import Closed, CollabParams
from dms.jobs.spec import DeploymentSpec
from dms.mining.collab import Proposal
from dms.mining.collab.messages import Dropout, Resume, Roster, RoundStart, RoundTotals
from dms.mining.wire import decode, encode
from dms.network.transfer import Parcel
from dms.orchestrator.deployment import (
    DeploymentActor,
    Orchestration,
    allocation_handle,
    drives,
    node_handle,
)
from dms.orchestrator.slots import Slot, SlotState
from dms.orchestrator.states import COLLAB, CollabPhase, DeploymentState
from dms.statemachine import Tracked

log = logging.getLogger("dms.collab")

OWNER_BEHAVIOUR = "/dms/node/collab/owner"
AGGREGATOR_TIMEOUT_S = 60.0
JOIN_RETRY_S = 1.0
HEARD_S = 15.0  # an aggregator answer this recent keeps it alive through missed polls
MAX_AGGREGATOR_LOSSES = 4
ENDED = "collab_failed"  # the aggregator's code for a collaboration that cannot go on
Answers = dict[str, bytes]
Then = Callable[[Answers], None]


class OwnerCall(BaseModel):
    """The session asks an owner's node for its next message."""

    model_config = ConfigDict(extra="forbid")
    collab_id: str
    op: str
    body: bytes = b""


class SessionState(BaseModel):
    """What the session keeps across a restart of the proposer's node (``keep``): what
    it relayed (the adverts and roster acceptances a new aggregator is restored from),
    where the rounds are, and the last totals (sent again to owners that missed them)."""

    model_config = ConfigDict(extra="forbid")
    phase: CollabPhase
    reason: str = ""
    adverts: dict[str, bytes] = Field(default_factory=dict)
    accepted: dict[str, bytes] = Field(default_factory=dict)  # each owner's RosterAccepted
    next_round: int
    live: list[str] | None = None
    dropped: list[dict[str, Any]] = Field(default_factory=list)
    last_totals: bytes = b""
    restarts: int = 0


@drives("collab")
class CollabSessionActor(DeploymentActor):
    """Resumed by the requester after a restart, as every deployment: it fails at once
    (``resumable`` is false), stopping the aggregator it placed and freeing its lease.
    The collaboration itself goes on in a new session that the node's collaboration
    role starts from the kept :class:`SessionState` (``resume``)."""

    phase = Tracked(COLLAB)  # every move checked against COLLAB

    def __init__(
        self,
        context: ActorContext,
        orchestration: Orchestration,
        deployment_id: str,
        spec: DeploymentSpec,
        saved: dict[str, Any] | None = None,
        *,
        proposal: Proposal | None = None,
        owner_timeout_s: float = 20.0,
        join_timeout_s: float = 120.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        keep: Callable[[SessionState], None] | None = None,
        resume: SessionState | None = None,
    ) -> None:
        super().__init__(context, orchestration, deployment_id, spec, saved)
        if proposal is None:  # resumed by the requester: the proposal is the aggregator's
            proposal = CollabParams.model_validate(spec.allocations[0].params).proposal
        self.proposal = proposal
        self.keep = keep
        self.resumed = resume
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
        # What a new aggregator is restored from, if this one is lost.
        self.generation = 0  # bumped when the aggregator is lost; older answers are ignored
        self.losses: list[dict[str, Any]] = []
        self.heard_at = 0.0
        self.adverts: dict[str, bytes] = {}
        self.accepted: dict[str, bytes] = {}
        self.roster_taken = False
        self.asking = 0  # owner batches in flight
        self.restore_wanted = False
        self.next_round = proposal.first_round()
        self.live: list[str] | None = None
        self.round_bytes = 0  # relayed to and from owners in the rounds
        self.owner_rounds = 0  # owners live in each round, summed over rounds
        self.last_totals = b""
        self.restarts = 0  # restarts of the proposer's node this collaboration went through
        if resume is not None:
            self.adverts, self.accepted = dict(resume.adverts), dict(resume.accepted)
            self.roster_taken = bool(resume.accepted)
            self.next_round, self.live = resume.next_round, resume.live
            self.dropped, self.last_totals = list(resume.dropped), resume.last_totals
            self.restarts = resume.restarts + 1

    # ---- deployment hooks -------------------------------------------------------------

    def resumable(self) -> bool:
        return False

    def on_start(self) -> None:
        super().on_start()
        self._report()

    def slot_running(self, slot: Slot) -> None:
        assert slot.allocation is not None
        if self.aggregator is not None or self.phase in COLLAB.terminal:
            return
        self.aggregator = allocation_handle(slot.allocation)
        self.aggregator_peer = slot.peer_id
        self.heard_at = time.monotonic()
        self._report()
        if self.resumed is not None and self.phase == CollabPhase.PLACING:
            self.phase = CollabPhase.JOINING  # rounds again once restored
            self.book.event(
                f"resumed after the proposer's node restarted: aggregator on {slot.peer_id}"
            )
            self._restore()
            return
        if self.losses:
            if self.asking:  # owners are still answering the lost one: restore after
                self.restore_wanted = True
            else:
                self._restore()
            return
        self.phase = CollabPhase.JOINING
        self.join_deadline = time.monotonic() + self.join_timeout_s
        self.book.event(f"aggregator running on {slot.peer_id}; asking the owners for their keys")
        self._adverts(list(self.proposal.owners), {})

    def slot_lost(self, slot: Slot, reason: str) -> None:
        if self.phase in COLLAB.terminal or self.aggregator is None:
            return
        self.losses.append({"peer_id": self.aggregator_peer, "reason": reason})
        self.aggregator = None
        self.generation += 1  # whatever the lost aggregator still answers is ignored
        if len(self.losses) >= MAX_AGGREGATOR_LOSSES:
            self._fail(f"the aggregator was lost {len(self.losses)} times; last: {reason}")
            return
        self.book.event(f"aggregator on {self.aggregator_peer} lost ({reason}); placing it again")
        self._report()

    def heard_from(self, slot: Slot) -> bool:
        return time.monotonic() - self.heard_at < HEARD_S

    def _restore(self) -> None:
        """Bring a new aggregator to where the lost one was, and run the round again: the
        relayed adverts, the roster, the acceptances again (each checked again, one
        message at a time), then where to resume. After a restart of the proposer's
        node, the last totals go again to the survivors first (one that had them
        refuses them, and stays where it is)."""
        adverts = list(self.adverts.items())
        if not self.roster_taken:  # no owner holds a roster yet: set up again
            self._to_aggregator("advert", adverts, lambda _: self._roster())
            return
        if self.last_totals and self.resumed is not None and self.live is not None:
            body, self.last_totals = self.last_totals, b""
            self._ask_owners(list(self.live), "totals", lambda _: body, lambda _: self._restore())
            return
        p = self.proposal
        state = Resume(
            collab_id=p.collab_id,
            round=self.next_round,
            live=self.live,
            dropped=[Dropout.model_validate(d) for d in self.dropped],
        )

        def resumed(_: bytes) -> None:
            self.book.event(
                f"aggregator restored on {self.aggregator_peer}; round {self.next_round} again"
            )
            self._start_round()

        def accepts(_: bytes) -> None:
            self._to_aggregator(
                "accept",
                list(self.accepted.items()),
                lambda _: self._aggregator("resume", encode(state), resumed),
            )

        self._to_aggregator("advert", adverts, lambda _: self._aggregator("roster", b"", accepts))

    def ended(self, state: DeploymentState, what: str) -> None:
        if self.phase not in COLLAB.terminal:
            self.phase = CollabPhase.FAILED
            self.reason = what
            self._report()
            self._keep()

    def _keep(self) -> None:
        """Hand what a restart needs to the node (it seals and writes it) before the
        step that follows goes out."""
        if self.keep is None:
            return
        self.keep(
            SessionState(
                phase=self.phase,
                reason=self.reason,
                adverts=self.adverts,
                accepted=self.accepted if self.roster_taken else {},
                next_round=self.next_round,
                live=self.live,
                dropped=self.dropped,
                last_totals=self.last_totals,
                restarts=self.restarts,
            )
        )

    # ---- setup ----------------------------------------------------------------------------

    def _adverts(self, missing: list[str], got: Answers) -> None:
        """Ask for keys until every owner joined or the join window closes."""

        def answered(answers: Answers) -> None:
            got.update(answers)
            self.adverts.update(answers)
            still = [o for o in missing if o not in answers]
            if still and time.monotonic() < self.join_deadline:
                self.call_later(JOIN_RETRY_S, lambda: self._adverts(still, got))
                return
            ordered = [(o, got[o]) for o in self.proposal.owners if o in got]
            self._to_aggregator("advert", ordered, lambda _: self._roster())

        self._ask_owners(missing, "advert", lambda _: b"", answered)

    def _roster(self) -> None:
        def roster(body: bytes) -> None:
            self.roster_taken = True
            listed = [a.owner for a in decode(Roster, body).adverts]
            self.book.event(f"roster: {len(listed)} of {len(self.proposal.owners)} owners")
            self._ask_owners(
                listed,
                "roster",
                lambda _: body,
                self._roster_accepted,
            )

        self._aggregator("roster", b"", roster)

    def _roster_accepted(self, accepted: Answers) -> None:
        self.accepted.update(accepted)
        self._keep()
        self._to_aggregator("accept", list(accepted.items()), lambda _: self._start_round())

    # ---- rounds ---------------------------------------------------------------------------

    def _start_round(self) -> None:
        self.phase = CollabPhase.ROUNDS

        def started(body: bytes) -> None:
            start = decode(RoundStart, body)
            self.collab_round = start.round
            if self.live is None:  # the first round: the owners left out are out for good
                named = {d["owner"] for d in self.dropped}
                out = [o for o in self.proposal.owners if o not in start.live and o not in named]
                self.dropped += [{"owner": o, "round": -1} for o in out]
                if out:
                    self.book.event(f"dropped at setup: {', '.join(out)}")
            self.owner_rounds += len(start.live)
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
        def asked(requests: Answers) -> None:
            self._ask_owners(
                list(requests),
                "unmask",
                lambda owner: requests[owner],
                lambda replies: self._to_aggregator(
                    "unmask", list(replies.items()), lambda _: self._totals()
                ),
            )

        def closed(body: bytes) -> None:
            # Every live owner sent (a missing input ends the collaboration: no round is
            # summed over fewer owners than another, nor run again without one).
            self._requests(decode(Closed, body).survivors, {}, asked)

        self._aggregator("close", b"", closed)

    def _requests(self, owners: list[str], got: Answers, then: Then) -> None:
        """Each survivor's unmask request from the aggregator, one after another (each is
        O(m) bytes; all of them together would be O(m^2))."""
        if not owners:
            then(got)
            return

        def fetched(body: bytes) -> None:
            got[owners[0]] = body
            self._requests(owners[1:], got, then)

        self._aggregator("request", owners[0].encode(), fetched)

    def _totals(self) -> None:
        def summed(body: bytes) -> None:
            totals = decode(RoundTotals, body)
            self.next_round, self.live = totals.round + 1, totals.survivors
            self.last_totals = body
            self._keep()  # before any owner has them: a restart resumes after this round
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
        self.book.event(f"collaboration completed in {time.monotonic() - self.began:.1f} s")
        self._report()
        self._keep()
        self._aggregator("end", b"", lambda _: None)

    def _fail(self, reason: str) -> None:
        if self.phase in COLLAB.terminal:
            return
        self.phase = CollabPhase.FAILED
        self.reason = reason
        self._report()
        self._keep()
        self.abort(f"collaboration failed: {reason}")

    # ---- plumbing ---------------------------------------------------------------------

    def _ask_owners(
        self, owners: list[str], op: str, body_for: Callable[[str], bytes], then: Then
    ) -> None:
        """Ask each owner in ``owners``; ``then(answers)`` once all answered or failed.
        An owner that fails or misses the deadline is simply absent from the answers."""
        answers: Answers = {}
        sent: dict[str, int] = {}  # bytes sent to each owner (its answer's are counted too)
        waiting = set(owners)
        if not waiting:
            then(answers)
            return
        gen = self.generation
        self.asking += 1

        def on_reply(owner: str, outcome: Outcome) -> None:
            if owner not in waiting or self.phase in COLLAB.terminal:
                return
            waiting.discard(owner)
            if outcome.ok and isinstance(outcome.result, dict):
                answers[owner] = outcome.result.get("body", b"")
                if self.phase == CollabPhase.ROUNDS:
                    self.round_bytes += sent.get(owner, 0) + len(answers[owner])
            elif op != "advert" or time.monotonic() >= self.join_deadline:
                error = outcome.error
                why = f"{error.code}: {error.reason}" if error else "no answer"
                log.info("collab %s: %s from %s failed: %s", self.id, op, owner, why)
            if waiting:
                return
            self.asking -= 1
            if gen == self.generation:
                then(answers)
            elif self.restore_wanted and not self.asking and self.aggregator is not None:
                self.restore_wanted = False  # every owner is where it will stay: restore
                self._restore()

        for owner in owners:
            body = body_for(owner)
            sent[owner] = len(body)
            call = OwnerCall(collab_id=self.proposal.collab_id, op=op, body=body)
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
                self.book.event(f"{owner}'s {op} refused: {outcome.error.reason}")
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
        """Not a refused message: the collaboration cannot go on (fail the session), or the
        aggregator is gone (place it again; the round restarts)."""
        error = outcome.error
        assert error is not None
        if error.code == "bad_payload":
            return False  # a refused message: the aggregator goes on
        if error.code == ENDED:
            self._fail(error.reason)
            return True
        slot = next(iter(self.book.slots.values()))
        if slot.state == SlotState.RUNNING:
            self.supervision.lost(slot, f"the aggregator failed: {error.code}: {error.reason}")
        self.settle()
        return True

    def _call_aggregator(self, op: str, body: bytes, on_reply: Callable[[Outcome], None]) -> None:
        if self.aggregator is None:
            return  # lost: the new one is restored and the round runs again
        gen = self.generation
        call = SessionCall(op=op, parcel=Parcel(inline=body))

        def current(outcome: Outcome) -> None:
            if gen != self.generation:
                return
            if outcome.ok or (outcome.error and outcome.error.code in ("bad_payload", ENDED)):
                self.heard_at = time.monotonic()
            on_reply(outcome)

        self.invoke(
            self.aggregator,
            SESSION_BEHAVIOUR,
            call.model_dump(),
            timeout=AGGREGATOR_TIMEOUT_S,
            on_reply=current,
        )

    def progress(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "collab_id": self.proposal.collab_id,
            "phase": self.phase.value,
            "reason": self.reason,
            "round": self.collab_round,
            "rounds_done": max(0, self.next_round - 1),
            "rounds": self.proposal.rounds,
            "aggregator": self.aggregator_peer,
            "aggregator_losses": self.losses,
            "restarts": self.restarts,
            "dropped": self.dropped,
            "refused": self.refused[-20:],
            "deployment": self.state,
            # What the session relayed to and from owners in the rounds (protocol bytes,
            # without envelopes), per owner per round it was live in.
            "kb_per_owner_per_round": (
                round(self.round_bytes / self.owner_rounds / 1024, 2) if self.owner_rounds else None
            ),
        }

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress())
