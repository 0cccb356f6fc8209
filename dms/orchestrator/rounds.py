"""Placing a deployment's open slots by bid rounds.

One round: ask a weighted sample of the peers that the table says fit an open
slot (and publish on the deployment topic when it knows too few, naming the peers
asked directly: they answer the direct request only), collect the
bids until every asked peer answered or the window closes (``first-offer``: or
as soon as the offers in hand place every open slot), select per slot, commit
each winner and revert the losers (``choosing.py``). One round at a time: one that
comes due while another is open (a held slot lost) begins at that one's close, which
commits or gives back its offers (``_round``). What each bid adds to the offers in
hand (one offer a peer a slot a round, one slot a lease) is ``intake.py``'s.

A bid that does not validate, or that names another peer or deployment than
the one asked, becomes that peer's reason (``bad bid: ...``) and whatever it
offered is reverted; it never raises here. A reply to an earlier round's request
(``_on_bid_reply``) is judged against that round, which is over: what it offered
goes back, and it is no answer nor reason in the round in progress. A decline marked
``permanent`` (the peer has no such executor, or its executor rejects the params:
nothing a retry changes) keeps that peer out of the slot's next rounds, and when
every peer of the table that fits a slot has declined it for good, the deployment
fails at once with each peer's reason instead of retrying until its deadline.

A peer's reason is the last word on it: one that left the table (its heartbeats
stopped: it crashed, or the relay it was reached through died) since it
answered is marked gone at each round, its earlier answer kept after it. A slot
that then times out says so, not only what that peer answered to an earlier
request (``declined: this node could never run this slot beside the ones before
it``, once unplaceable only because its provider was gone). A refusal that is no
answer of the peer's own (``NO_ANSWER``: unreachable, its node stopping, no reply)
keeps that earlier answer after it, as ``gone`` does. Likewise a peer not
asked because its last heartbeat shows it too small (``not asked: too small ...``)
has that reason only while its latest heartbeat says so: it was kept from the first
round on, with that round's figures, after the peer had grown and been asked again.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial
from typing import Protocol

from pydantic import ValidationError

from dms.actor import ErrorCode, Outcome, Refusal, Request
from dms.backoff import Backoff
from dms.jobs.spec import AllocationSpec
from dms.network.peertable import GONE, PeerRecord
from dms.orchestrator.base import (
    GONE_PREFIX,
    GONE_REASON,
    LEFT_REASON,
    DeploymentBook,
    Messenger,
    log,
    node_handle,
)
from dms.orchestrator.choosing import ChoiceHost, Chooser
from dms.orchestrator.givenback import GivenBackBook, free_with
from dms.orchestrator.intake import (
    BEFORE,
    MAX_REASON,
    NO_ANSWER,
    NO_ANSWER_PREFIXES,
    NOT_ASKED,
    UNREACHED,
    BidIntake,
    first_error,
    offered_lease_ids,
    own_answer,
)
from dms.orchestrator.messages import (
    DEPLOYMENT_TOPIC,
    REQUEST,
    Bid,
    BidRequest,
    SlotRequest,
)
from dms.orchestrator.selection import Candidate, Decision
from dms.orchestrator.slots import Slot, SlotState
from dms.orchestrator.states import DEPLOYMENT, DeploymentState
from dms.resources import Resources
from dms.resources.amounts import ZERO

ASKED = "asked, no answer yet"  # a peer of the round that has not answered, at the end
BID_GRACE_S = 2.0  # after the window: how long a round with an empty slot waits for answers


def misfit(
    record: PeerRecord,
    spec: AllocationSpec,
    given_back: Resources = ZERO,
    *,
    free: dict[str, float] | None = None,
    want: dict[str, float | int] | None = None,
) -> str | None:
    """From the peer's last heartbeat: why it could not take this allocation, or None.
    ``given_back``: what the requester gave back to it that the heartbeat may still
    count as held (``givenback.py``), free now. ``free``: ``free_with(record,
    given_back)`` when the caller has it; ``want``: ``spec.resources.human()``."""
    hb = record.heartbeat
    if hb is None or not hb.free:
        return "it offers no resources (not onboarded)"
    if want is None:
        want = spec.resources.human()
    with_back = free if free is not None else free_with(record, given_back)
    free = {kind: with_back.get(kind, 0) for kind in want}
    short = [
        f"{kind} {free[kind]:g} free < {amount:g}"
        for kind, amount in want.items()
        if amount and free[kind] + 1e-9 < amount
    ]
    return f"too small by its last heartbeat: {', '.join(short)}" if short else None


class RoundsHost(ChoiceHost, Protocol):
    """What bid rounds ask of the deployment that holds them (``excludes``, ``commit``:
    ``ChoiceHost``)."""

    def settle(self) -> None:
        """Derive the deployment's state from its slots, and save what changed."""
        ...

    def abort(self, what: str, per_slot: dict[str, str] | None = None) -> None:
        """Fail the deployment."""
        ...


class BidRounds:
    """The rounds that place a deployment's open slots: each asks, takes the bids in
    (``BidIntake``) and closes with a choice (``Chooser``)."""

    def __init__(self, book: DeploymentBook, messenger: Messenger, host: RoundsHost) -> None:
        self.book = book
        self.messenger = messenger
        self.host = host
        self.round = 0
        self._asked: set[str] = set()
        self._answered: set[str] = set()
        # Bid requests not yet answered, over every round: a reply that arrives after
        # this actor stopped is dropped with the leases it holds, so the end reverts them.
        self.owing: Counter[str] = Counter()
        self._gossiped = False
        self._closed: set[int] = set()
        self.scheduled = False  # a round is due
        # A round came due while one was open (a held slot lost: ``schedule(0.0)``): it
        # begins at that round's close (``_round``).
        self._due_at_close = False
        self._retry_s = book.o.retry_s
        # Leases given back that a peer's last heartbeat may still count as held.
        self.given_back = GivenBackBook()
        self.intake = BidIntake(book, host)  # the round's offers in hand
        self.chooser = Chooser(book, host, self.intake, self.given_back)

    def schedule(self, delay_s: float) -> None:
        if (
            not self.scheduled
            and self.book.state not in DEPLOYMENT.terminal
            and self.book.state != DeploymentState.STOPPING
        ):
            self.scheduled = True
            self.messenger.call_later(delay_s, self._round)

    def _note_gone(self, open_slots: list[Slot]) -> None:
        """Peers with a reason on an open slot that the table now says are gone: that is
        their last word, their earlier answer kept after it."""
        table = self.book.o.peer_table
        for slot in open_slots:
            for peer, reason in list(slot.reasons.items()):
                record = table.get(peer)
                if record is None or record.status != GONE or reason.startswith(GONE_PREFIX):
                    continue
                left = bool(record.history) and record.history[-1] == "left"
                gone = LEFT_REASON if left else GONE_REASON
                if reason.startswith(NO_ANSWER_PREFIXES):  # what it answered is kept
                    reason = reason.partition(BEFORE)[2]
                slot.reasons[peer] = (f"{gone}{BEFORE}{reason}" if reason else gone)[:MAX_REASON]

    def _open_slots(self) -> list[Slot]:
        return [s for s in self.book.slots.values() if s.state == SlotState.OPEN]

    def _fitting(
        self, slot: Slot, frees: dict[str, dict[str, float]] | None = None
    ) -> list[PeerRecord]:
        """Alive peers of the table that the job allows and whose last heartbeat fits the
        slot; the others that were not asked get their reason (so a job that nothing can
        run explains itself). That reason is the last heartbeat's, at every round: one
        whose figures changed gets the new ones, and a peer that has since grown or freed
        enough (or is back after it was gone) is rid of it; what the peer itself
        answered before is kept after it, and is its reason again once it fits.
        ``frees``: each peer's free resources (``free_with``), filled in for the peers
        read here: a round reads each peer's heartbeat once, whatever its slots."""
        spec = self.book.by_slot[slot.name]
        want = spec.resources.human()
        if frees is None:
            frees = {}
        found = []
        for record in self.book.o.peer_table.alive():
            peer = record.peer_id
            if self.host.excludes(slot.name, peer):
                continue
            answered = own_answer(slot.reasons.get(peer))
            credit = self.given_back.credit(record)
            free = frees.get(peer)
            if free is None:
                free = frees[peer] = free_with(record, credit)
            why = misfit(record, spec, credit, free=free, want=want)
            if why is not None:
                reason = NOT_ASKED + why + (BEFORE + answered if answered else "")
                slot.reasons[peer] = reason[:MAX_REASON]
                continue
            if answered:
                slot.reasons[peer] = answered
            else:
                slot.reasons.pop(peer, None)
            found.append(record)
        return found

    def _candidates(self, open_slots: list[Slot]) -> list[str]:
        """Fresh peers from the table that could take some open slot: a weighted random
        sample, freer peers likelier. Every requester reads much the same table, so
        taking the top few by free capacity would send every concurrent request to
        the same providers; sampling spreads them (the power of d choices)."""
        weights: dict[str, float] = {}
        frees: dict[str, dict[str, float]] = {}
        for slot in open_slots:
            for record in self._fitting(slot, frees):
                if record.peer_id in slot.declined_for_good or record.peer_id in weights:
                    continue
                hb = record.heartbeat
                assert hb is not None
                onboarded = hb.onboarded.get("cpu") or 1.0
                free = frees[record.peer_id].get("cpu", 0.0)
                weights[record.peer_id] = 0.05 + max(0.0, free / onboarded)
        # Efraimidis-Spirakis: a weighted sample without replacement.
        keyed = sorted(weights, key=lambda p: -(self.book.o.rng.random() ** (1.0 / weights[p])))
        return keyed[: max(self.book.o.min_ask, self.book.o.fanout * len(open_slots))]

    def _slot_request(self, slot: Slot) -> SlotRequest:
        spec = self.book.by_slot[slot.name]
        return SlotRequest(
            slot=slot.name,
            executor=spec.executor,
            resources=spec.resources,
            constraints=spec.constraints,
            params=spec.params,
        )

    def _round(self) -> None:
        self.scheduled = False
        if self.book.state in DEPLOYMENT.terminal or self.book.state == DeploymentState.STOPPING:
            return
        if self.round and self.round not in self._closed:
            # One round at a time: the open one's kept offers are its own, committed or
            # given back at its close, which begins this one. Begun now, it dropped them
            # (neither committed nor given back) and made its peers' answers stale.
            self._due_at_close = True
            return
        open_slots = self._open_slots()
        if not open_slots:
            return
        self._note_gone(open_slots)
        late = [s for s in open_slots if s.expired(time.time())]
        if late:
            self.fail_unplaced(late)
            return
        # What earlier rounds gave back goes first, from this thread: this round may ask
        # the same peers, and a revert sent before a bid request reaches the peer first.
        self.book.send_held(force=True)
        self.round += 1
        rid = self.round
        self._asked, self._answered, self._gossiped = set(), set(), False
        self.intake.begin(open_slots)
        request = BidRequest(
            deployment_id=self.book.id,
            slots=[self._slot_request(s) for s in open_slots],
            lease_s=self.book.spec.lease_s,
        )
        peers = self._candidates(open_slots)
        self.book.set_state(DeploymentState.BIDDING)
        self.book.event(f"round {rid}: asking {len(peers)} peer(s) for {len(open_slots)} slot(s)")
        payload = request.model_dump(exclude={"asked"})
        reached: list[str] = []  # asked, the request on its way to them
        for peer in peers:
            self._asked.add(peer)
            self.owing[peer] += 1
            try:
                self.messenger.invoke(
                    node_handle(peer),
                    REQUEST,
                    payload,
                    timeout=self.book.spec.bid_window_s + 2.0,
                    on_reply=partial(self._on_bid_reply, rid, peer),
                )
            except Exception as exc:
                self.owing[peer] -= 1
                self._answered.add(peer)
                self.intake.note_unanswered(
                    peer, [s.name for s in open_slots], UNREACHED + str(exc)
                )
            else:
                reached.append(peer)
        if len(peers) < len(open_slots):
            # The table knows too few fitting peers: ask everyone listening, bids come back
            # point to point to this actor. The peers asked directly hear this too, and
            # answer only the direct request (``asked``): each bid locks leases.
            self._gossiped = True
            gossip = {**payload, "reply_to": self.messenger.handle.model_dump()}
            if reached:  # absent otherwise: a request as before the field
                gossip["asked"] = reached
            self.messenger.publish(
                DEPLOYMENT_TOPIC, REQUEST, gossip, ttl_s=self.book.spec.bid_window_s + 2.0
            )
        self.messenger.call_later(self.book.spec.bid_window_s, lambda: self._window_ends(rid))
        if not peers and not self._gossiped:
            self._close(rid)

    # ---- bids ----------------------------------------------------------------------------

    def _on_bid_reply(self, rid: int, peer: str, outcome: Outcome) -> None:
        """``peer``'s reply to round ``rid``'s request. A reply to an earlier round's (a
        failure, a bad bid or a bid come late) is judged against its own round, which is
        over: what it offered goes back, as a late bid's (``_take_bid``, ``_bad_bid``),
        and it is neither an answer nor a reason in the round in progress (whose
        answered peers close it, and whose reasons become its decline rows)."""
        self.owing[peer] -= 1
        if not outcome.ok:
            self.book.uncertain.add(peer)  # it may have locked before the reply got lost
            assert outcome.error is not None
            why = f"{outcome.error.code}: {outcome.error.reason}"
            if rid != self.round:  # an earlier round's: nothing of the one in progress
                log.info("deployment %s: round %d's request to %s failed in round %d: %s",
                         self.book.id, rid, peer, self.round, why)  # fmt: skip
                return
            self._answered.add(peer)
            # Not for a slot its published request's bid offered for: that answer stands.
            slots = self.intake.unoffered(peer)
            if outcome.error.code in NO_ANSWER:
                self.intake.note_unanswered(peer, slots, why)
            else:
                self.book.note_reason(peer, slots, why)
            self._maybe_close(rid)
            return
        try:
            bid = Bid.model_validate(outcome.result)
        except ValidationError as exc:
            self._bad_bid(rid, peer, first_error(exc), offered_lease_ids(outcome.result))
            return
        if bid.peer_id != peer or bid.deployment_id != self.book.id:
            named = f"peer {bid.peer_id[-8:]!r}, deployment {bid.deployment_id!r}"
            why = f"it names {named}, not the peer and deployment asked"
            self._bad_bid(rid, peer, why, [o.lease_id for o in bid.offers])
            return
        self._take_bid(rid, bid)

    def _bad_bid(self, rid: int, peer: str, why: str, lease_ids: list[str]) -> None:
        """A reply that is no bid for round ``rid``'s request: that peer's reason for every
        slot of the round. One to an earlier round's request, come in a later round, has
        its leases reverted and is no answer nor reason in the round in progress."""
        log.info("deployment %s: bad bid from %s for round %d: %s", self.book.id, peer, rid, why)
        self.book.uncertain.add(peer)  # whatever else it holds for us goes back at the end
        # Its first answer stands: a bad one after it reverts no lease its kept offer or a
        # slot holds, nor replaces its reason for a slot it offered for.
        lease_ids = self.intake.returning(peer, self.intake.not_kept_ids(peer, lease_ids))
        self.book.revert(peer, lease_ids)
        if rid != self.round:
            return
        self._answered.add(peer)
        self.book.note_reason(peer, self.intake.unoffered(peer), f"bad bid: {why}"[:MAX_REASON])
        self._maybe_close(rid)

    def bid_received(self, request: Request) -> None:
        """Bids answering a gossip request come here (the actor's ``BID`` behaviour),
        point to point."""
        bid: Bid = request.payload
        if request.sender.address.host != bid.peer_id or bid.deployment_id != self.book.id:
            raise Refusal(ErrorCode.FORBIDDEN, "a bid must come from the peer that makes it")
        self._take_bid(self.round, bid)

    def _take_bid(self, rid: int, bid: Bid) -> None:
        """Take ``bid`` into round ``rid`` (``BidIntake.take``: its offers and declines,
        one offer a peer a slot a round, one slot a lease) and give back what the round
        does not keep. A bid too late for the round goes back at once, all but a lease
        that stands for a slot."""
        peer = bid.peer_id
        if rid != self.round or rid in self._closed or self.book.state in DEPLOYMENT.terminal:
            self.chooser.give_back(peer, self.intake.not_kept(peer, bid.offers), rid)  # too late
            return
        changed = peer not in self._answered
        self._answered.add(peer)
        back, took = self.intake.take(rid, bid)
        self.chooser.give_back(peer, back, rid)
        if changed or took:  # a bid that changed nothing changes no decision
            self._maybe_close(rid)

    def _maybe_close(self, rid: int) -> None:
        if not self._gossiped and self._asked <= self._answered:
            self._close(rid)
        elif self.book.spec.strategy == "first-offer":
            trial = self.chooser.trial()
            if trial is not None:  # late binding: the first offers win, the later are reverted
                self._close(rid, trial)

    def _window_ends(self, rid: int) -> None:
        """Close the round, unless asked peers still owe an answer and it is short of
        offers (``Chooser.short_of_offers``): busy providers answer late, and a round closed
        without them would be retried anyway, or would stack slots on one peer. Then
        wait for them, up to the bid request's own timeout."""
        waiting = self._asked - self._answered
        if waiting and not self._gossiped and self.chooser.short_of_offers():
            self.messenger.call_later(BID_GRACE_S, lambda: self._close(rid))
            return
        self._close(rid)

    # ---- closing -------------------------------------------------------------------------

    def _close(
        self, rid: int, trial: tuple[dict[str, list[Candidate]], Decision] | None = None
    ) -> None:
        """Select and commit (``Chooser.choose``). ``trial``: ``first-offer``'s pooled
        offers and decision, made on the offers in hand just now (``Chooser.trial``)."""
        if rid != self.round or rid in self._closed or self.book.state in DEPLOYMENT.terminal:
            return
        self._closed.add(rid)
        if self._due_at_close:  # a slot lost while it was open: the next round, once done
            self._due_at_close = False
            self.schedule(0.0)
        pooled = trial[0] if trial is not None else self.chooser.pooled()
        doomed = self._declined_for_good(pooled)
        if doomed:
            for candidates in self.intake.offers.values():
                for c in candidates:
                    self.book.revert(c.peer_id, [c.offer.lease_id])
            self._fail_for_good(doomed)
            return
        unplaced = self.chooser.choose(rid, pooled, trial[1] if trial is not None else None)
        if unplaced:
            self.book.event(f"round {rid}: no acceptable bid for {', '.join(unplaced)}; queued")
            self.schedule(self._retry_s)
            self._retry_s = Backoff(self.book.o.retry_s, self.book.o.retry_max_s).after(
                self._retry_s
            )
        else:
            self._retry_s = self.book.o.retry_s
        self.host.settle()
        self.book.write_bids()  # any the settling did not save

    # ---- ending unplaced -----------------------------------------------------------------

    def _declined_for_good(self, pooled: dict[str, list[Candidate]]) -> list[Slot]:
        """Open slots with no offer this round (``pooled``: their own and their twins')
        that every fitting peer of the table has declined for good (a slot that no peer
        of the table fits is left to its deadline: a peer that fits may yet join)."""
        doomed = []
        for name, offers in pooled.items():
            slot = self.book.slots[name]
            if offers or slot.state != SlotState.OPEN or not slot.declined_for_good:
                continue
            fitting = {record.peer_id for record in self._fitting(slot)}
            if fitting and fitting <= slot.declined_for_good.keys():
                doomed.append(slot)
        return doomed

    def _fail_for_good(self, doomed: list[Slot]) -> None:
        what = "every peer that fits declined for good, no retry can place it: "
        self._fail_slots(what, {
            slot.name: "; ".join(
                f"{p[-8:]}: declined: {r}" for p, r in sorted(slot.declined_for_good.items())
            )
            for slot in doomed
        })  # fmt: skip

    def fail_unplaced(self, late: list[Slot]) -> None:
        """Fail the late slots with each peer's reason; a peer asked in the last round
        that has not answered, and has no reason from before, is named as such."""
        waiting = self._asked - self._answered
        self._fail_slots("not placed within the deadline: ", {
            slot.name: "; ".join(
                f"{p[-8:]}: {r}"
                for p, r in sorted({**dict.fromkeys(waiting, ASKED), **slot.reasons}.items())
            )
            or "no peer fits"
            for slot in late
        })  # fmt: skip

    def _fail_slots(self, what: str, reasons: dict[str, str]) -> None:
        """Fail the deployment; the message names each slot's peers and their reasons."""
        summary = what + " | ".join(f"{name}: {why}" for name, why in reasons.items())
        self.host.abort(summary, {name: what + why for name, why in reasons.items()})
