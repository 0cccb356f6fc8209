"""Placing a deployment's open slots by bid rounds.

One round: ask a weighted sample of the peers that the table says fit an open
slot (and publish on the deployment topic when it knows too few, naming the peers
asked directly: they answer the direct request only), collect the
bids until every asked peer answered or the window closes (``first-offer``: or
as soon as the offers in hand place every open slot), select per slot, commit
each winner (the slot moves to ``committing``; ``supervision.py`` takes it from
there) and revert the losers once no allocate of the deployment is in flight
(``DeploymentBook.give_back``). One round at a time: one that comes due while another
is open (a held slot lost) begins at that one's close, which commits or gives back
its offers (``_round``).

One offer a peer a slot a round: a peer's first offer for a slot is taken, a later
one (a hostile provider answering both the direct and the published request) is
refused at arrival with its row in the bid index and given back; a decline leaves the
round's offer as it was, and an offer undoes the round's decline (``_take_bid``).
One slot a lease: an offer naming a lease of its peer that stands for another slot
(an offer of the round kept for it, or a slot that holds it) is refused likewise,
and gives nothing back (the lease is that slot's).

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
from typing import Any, Protocol

from pydantic import ValidationError

from dms.actor import ErrorCode, Outcome, Refusal, Request
from dms.backoff import Backoff
from dms.jobs.spec import MAX_SLOTS, AllocationSpec
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
from dms.orchestrator.givenback import GivenBackBook, free_with
from dms.orchestrator.messages import (
    DEPLOYMENT_TOPIC,
    REQUEST,
    Bid,
    BidRequest,
    Offer,
    SlotRequest,
)
from dms.orchestrator.records import BidRow
from dms.orchestrator.selection import Candidate, Decision, select
from dms.orchestrator.slots import HELD, Slot, SlotState
from dms.orchestrator.states import DEPLOYMENT, DeploymentState
from dms.resources import Resources
from dms.resources.amounts import ZERO

MAX_REASON = 512  # characters of one peer's reason kept
NOT_ASKED = "not asked: "  # a peer's reason while its last heartbeat says it does not fit
BEFORE = "; before: "  # what the peer itself answered last, after a reason the round gave
UNREACHED = "unreachable: "  # a peer the round's request did not reach: no answer of its own
# Refusals of a bid request that are no answer of the peer's own, each its reason as
# ``code: why``: the request did not reach the peer's node (unreachable), its node actor
# had stopped or was not there (stopped, unknown_actor: the node was stopping), or no
# answer came (timeout). What the peer answered before is kept after it.
NO_ANSWER = (ErrorCode.UNREACHABLE, ErrorCode.STOPPED, ErrorCode.UNKNOWN_ACTOR, ErrorCode.TIMEOUT)
NO_ANSWER_PREFIXES = tuple(f"{code}: " for code in NO_ANSWER)
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


def own_answer(reason: str | None) -> str | None:
    """What the peer itself answered last, in its reason: one the rounds gave it (not
    asked, no answer of its own, gone) carries that after ``BEFORE``."""
    while reason and reason.startswith((NOT_ASKED, GONE_PREFIX, *NO_ANSWER_PREFIXES)):
        reason = reason.partition(BEFORE)[2]
    return reason or None


def first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{where}: {err['msg']}"


def offered_lease_ids(raw: Any) -> list[str]:
    """The lease ids a bid that does not validate may still name (to give them back)."""
    offers = raw.get("offers") if isinstance(raw, dict) else None
    if not isinstance(offers, list):
        return []
    ids = [o.get("lease_id") for o in offers[:MAX_SLOTS] if isinstance(o, dict)]
    return [i for i in ids if isinstance(i, str) and 0 < len(i) <= 64]


def held_lease(slot: Slot, peer: str | None = None) -> tuple[str, str] | None:
    """The lease ``slot`` holds, as (peer, lease id): a chosen slot (committing,
    allocating, running) holds its peer's; None while it holds none, or none of
    ``peer``'s when given. The one derivation of "the leases the slots hold": a round's
    kept leases as it begins, a lease's slot, the leases never given back."""
    if slot.state not in HELD or not slot.peer_id or not slot.lease_id:
        return None
    if peer is not None and slot.peer_id != peer:
        return None
    return slot.peer_id, slot.lease_id


class RoundsHost(Protocol):
    """What bid rounds ask of the deployment that holds them."""

    def excludes(self, name: str, peer: str) -> bool:
        """Whether slot ``name`` may not go to ``peer``."""
        ...

    def commit(self, slot: Slot) -> None:
        """A slot was won: commit its lease and start its allocation."""
        ...

    def settle(self) -> None:
        """Derive the deployment's state from its slots, and save what changed."""
        ...

    def abort(self, what: str, per_slot: dict[str, str] | None = None) -> None:
        """Fail the deployment."""
        ...


class BidRounds:
    """The rounds that place a deployment's open slots."""

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
        self._offers: dict[str, list[Candidate]] = {}
        # This round's offers, by (peer, slot): a peer's first offer for a slot is taken,
        # a later one refused (``_take_bid``); the leases that stand for a slot, by (peer,
        # lease): its kept offers', and those the slots held as the round began, each with
        # that slot: one lease backs one slot (an offer naming it for another is refused,
        # ``_stands_for``) and is never given back with a refused offer that names it; and
        # its declines, with the slot's reason and permanent decline for it from before
        # (an offer that comes after a decline of the same round is its answer: the
        # decline is undone).
        self._offered: set[tuple[str, str]] = set()
        self._kept: dict[tuple[str, str], str] = {}
        # The round whose close chose each slot's lease (of this actor: a slot recovered
        # holding one has none): a refusal says since when a slot holds the lease.
        self._chosen_in: dict[str, int] = {}
        self._declined: dict[tuple[str, str], tuple[str | None, str | None]] = {}
        self._refused_noted: set[tuple[str, str]] = set()  # a row written for each
        # The leases given back this round, by (peer, lease): each goes back once
        # (``_returning``); its revert may wait for an allocate in flight, so one named
        # again is refused, never kept (``_take_bid``).
        self._returned: set[tuple[str, str]] = set()
        self._arrived = 0  # offers taken so far: each candidate's ``seq``
        self._gossiped = False
        self._closed: set[int] = set()
        # The last decline written to the bid index for (peer, slot): a reason stays on
        # its slot for the rounds after, and is written again only when it changes.
        self._declines_written: dict[tuple[str, str], str] = {}
        self.scheduled = False  # a round is due
        # A round came due while one was open (a held slot lost: ``schedule(0.0)``): it
        # begins at that round's close (``_round``).
        self._due_at_close = False
        self._retry_s = book.o.retry_s
        # Leases given back that a peer's last heartbeat may still count as held.
        self.given_back = GivenBackBook()

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
        self._offers = {s.name: [] for s in open_slots}
        # No slot is chosen until the round closes: the leases held now are all the held
        # ones a bid of the round can name.
        self._kept = {held: s.name for s in self.book.slots.values() if (held := held_lease(s))}
        self._offered, self._refused_noted, self._returned = set(), set(), set()
        self._declined = {}
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
                self._note_unanswered(peer, [s.name for s in open_slots], UNREACHED + str(exc))
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
            slots = self._unoffered(peer)
            if outcome.error.code in NO_ANSWER:
                self._note_unanswered(peer, slots, why)
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

    def _note_unanswered(self, peer: str, slots: list[str], why: str) -> None:
        """The request got no answer of ``peer``'s own (``why`` starts with one of
        ``NO_ANSWER_PREFIXES``): that is its reason for ``slots``, what it answered an
        earlier round kept after it (a provider that declined, then left or crashed
        before the next round, still says what it declined; likewise one asked while it
        stopped, whose node answered ``stopped``)."""
        for name in slots:
            slot = self.book.slots.get(name)
            if slot is None:
                continue
            answered = own_answer(slot.reasons.get(peer))
            reason = why + (BEFORE + answered if answered else "")
            slot.reasons[peer] = reason[:MAX_REASON]

    def _bad_bid(self, rid: int, peer: str, why: str, lease_ids: list[str]) -> None:
        """A reply that is no bid for round ``rid``'s request: that peer's reason for every
        slot of the round. One to an earlier round's request, come in a later round, has
        its leases reverted and is no answer nor reason in the round in progress."""
        log.info("deployment %s: bad bid from %s for round %d: %s", self.book.id, peer, rid, why)
        self.book.uncertain.add(peer)  # whatever else it holds for us goes back at the end
        # Its first answer stands: a bad one after it reverts no lease its kept offer or a
        # slot holds, nor replaces its reason for a slot it offered for.
        lease_ids = self._returning(peer, self._not_kept_ids(peer, lease_ids))
        self.book.revert(peer, lease_ids)
        if rid != self.round:
            return
        self._answered.add(peer)
        self.book.note_reason(peer, self._unoffered(peer), f"bad bid: {why}"[:MAX_REASON])
        self._maybe_close(rid)

    def _unoffered(self, peer: str) -> list[str]:
        """This round's slots ``peer`` has no offer taken for: a reply that is no bid
        (an error, a bad bid) is its reason for those only, its first answer standing
        for the others (one that came first, for the published request)."""
        return [n for n in self._offers if (peer, n) not in self._offered]

    def bid_received(self, request: Request) -> None:
        """Bids answering a gossip request come here (the actor's ``BID`` behaviour),
        point to point."""
        bid: Bid = request.payload
        if request.sender.address.host != bid.peer_id or bid.deployment_id != self.book.id:
            raise Refusal(ErrorCode.FORBIDDEN, "a bid must come from the peer that makes it")
        self._take_bid(self.round, bid)

    def _take_bid(self, rid: int, bid: Bid) -> None:
        """Take ``bid``'s offers and declines into round ``rid``. One offer a peer a slot
        a round: the first that arrives. A later offer of the peer for a slot it offered
        for (a second bid: a hostile provider answering the direct request and the
        published one, or one bid naming a slot twice) is refused, its row in the bid
        index saying so (``refused: ...``), and given back at once; a decline leaves an
        offer of the round as it was, and an offer undoes a decline of the round (two
        bids arrive in either order: the published one's may come first). One lease a
        slot: an offer naming a lease of the peer that stands for another slot (its kept
        offer's for that slot, this round, or a slot's that holds it) is refused too, and
        gives nothing back (the lease is that slot's); so is one naming a lease given back
        this round (its revert may wait for an allocate in flight: kept, it would be
        committed, then reverted), given back no second time."""
        peer = bid.peer_id
        if rid != self.round or rid in self._closed or self.book.state in DEPLOYMENT.terminal:
            self._give_back(peer, self._not_kept(peer, bid.offers), rid)  # too late: at once
            return
        changed = peer not in self._answered
        self._answered.add(peer)
        back: list[Offer] = []
        refused: list[tuple[Offer, str | None]] = []  # and the slot its lease stands for
        for offer in bid.offers:
            # A peer this slot excludes (it lost the slot before, or the job excludes it)
            # may still answer a gossip request: its offer goes back.
            if offer.slot not in self._offers or self.host.excludes(offer.slot, peer):
                back.append(offer)
            elif (peer, offer.slot) in self._offered or (peer, offer.lease_id) in self._returned:
                refused.append((offer, None))  # a second offer, or a lease given back
            elif (peer, offer.lease_id) in self._kept and (
                stands := self._stands_for(peer, offer.lease_id)
            ):
                refused.append((offer, stands))
            else:
                self._offered.add((peer, offer.slot))
                self._kept[(peer, offer.lease_id)] = offer.slot
                self._undo_decline(peer, offer.slot)
                self._arrived += 1
                self._offers[offer.slot].append(Candidate(bid, offer, self._arrived))
                changed = True
        for decline in bid.declines:
            slot = self.book.slots.get(decline.slot)
            if slot is None:
                continue
            if (peer, decline.slot) in self._offered:
                continue  # its offer stands
            if decline.slot in self._offers:
                prior = (slot.reasons.get(peer), slot.declined_for_good.get(peer))
                self._declined.setdefault((peer, decline.slot), prior)
            changed = True
            slot.reasons[peer] = f"declined: {decline.reason}"
            if decline.permanent:
                slot.declined_for_good[peer] = decline.reason
        if refused:
            self._refuse(rid, peer, refused)
            back += [o for o, _ in refused]
        self._give_back(peer, self._not_kept(peer, back), rid)
        if changed:  # a bid that changed nothing changes no decision
            self._maybe_close(rid)

    def _undo_decline(self, peer: str, name: str) -> None:
        """``peer`` offered for slot ``name`` after declining it this round: its reason
        and permanent decline for the slot are again what they were before."""
        prior = self._declined.pop((peer, name), None)
        if prior is None:
            return
        slot = self.book.slots[name]
        for where, value in ((slot.reasons, prior[0]), (slot.declined_for_good, prior[1])):
            if value is None:
                where.pop(peer, None)
            else:
                where[peer] = value

    def _stands_for(self, peer: str, lease_id: str) -> str | None:
        """The slot ``peer``'s lease ``lease_id`` stands for: the one an offer kept this
        round names it for, or one that holds it (it did as the round began, and still
        does); else None."""
        name = self._kept.get((peer, lease_id))
        if name is None or name in self._offers:
            return name
        return name if held_lease(self.book.slots[name]) == (peer, lease_id) else None

    def _not_kept(self, peer: str, offers: list[Offer]) -> list[Offer]:
        """``offers`` without those naming a lease of ``peer`` that an offer kept this
        round or a slot holds: a bid that names it again gives back nothing of it."""
        if not offers:
            return []
        free = set(self._not_kept_ids(peer, [o.lease_id for o in offers]))
        return [o for o in offers if o.lease_id in free]

    def _not_kept_ids(self, peer: str, lease_ids: list[str]) -> list[str]:
        """``lease_ids`` of ``peer`` without those an offer kept this round or a slot
        holds (``_not_kept``; a bad bid's, ``_bad_bid``)."""
        if not lease_ids:
            return []
        held = {
            lease for s in self.book.slots.values() if (lease := held_lease(s, peer)) is not None
        }
        return [i for i in lease_ids if (peer, i) not in self._kept and (peer, i) not in held]

    def _refuse(self, rid: int, peer: str, offers: list[tuple[Offer, str | None]]) -> None:
        """``peer``'s offers refused at arrival: each a later one for a slot it answered
        this round (``None``), or one naming a lease that stands for another slot (that
        slot's name); either one naming a lease given back this round says so. Each has
        its row in the bid index, one a (peer, slot) a round whatever it sends."""
        log.info(
            "deployment %s: round %d: refused %d offer(s) of %s: one offer a peer a slot, "
            "one slot a lease",
            self.book.id, rid, len(offers), peer,
        )  # fmt: skip
        rows = []
        for offer, stands in offers:
            if (peer, offer.slot) in self._refused_noted:
                continue
            self._refused_noted.add((peer, offer.slot))
            if (peer, offer.lease_id) in self._returned:
                why = (
                    f"refused: its lease {offer.lease_id} was given back in round {rid}: a "
                    "lease given back is not taken again"
                )
            elif stands is None:
                why = (
                    f"refused: a second offer of this peer for {offer.slot} in round {rid}: "
                    "one offer a peer a slot a round, its first stands; this one given back"
                )
            else:
                why = (
                    f"refused: its lease {offer.lease_id} stands for {stands} "
                    f"({self._since(stands, rid)}): one lease backs one slot; that slot keeps it"
                )
            rows.append(
                BidRow(self.book.id, "received", peer, offer.slot, "lost", why,
                       lease_id=offer.lease_id, price=offer.price)
            )  # fmt: skip
        self.book.add_bids(rows)

    def _since(self, name: str, rid: int) -> str:
        """Since when a lease stands for slot ``name`` (``_stands_for``), in round ``rid``:
        an offer of this round kept for it, or the slot holds it since an earlier one."""
        if name in self._offers:
            return f"kept for it in round {rid}"
        chosen = self._chosen_in.get(name)
        return f"held since round {chosen}" if chosen is not None else "held since before round 1"

    def _give_back(self, peer: str, offers: list[Offer], rid: int) -> None:
        """Revert ``peer``'s ``offers`` (made in round ``rid``); once the revert is sent
        (it may wait for an allocate in flight: ``DeploymentBook.give_back``), what they
        held counts as free on it while its last heartbeat may still count them
        (``GivenBackBook``, from the heartbeat heard then). A lease goes back once a
        round (``_returning``)."""
        lease_ids = self._returning(peer, [o.lease_id for o in offers])
        if not lease_ids:
            return
        first: dict[str, Offer] = {}
        for offer in offers:
            first.setdefault(offer.lease_id, offer)
        amount = ZERO
        for lease_id in lease_ids:
            spec = self.book.by_slot.get(first[lease_id].slot)
            if spec is not None:
                amount = amount + spec.resources

        def credit() -> None:
            self.given_back.note(self.book.o.peer_table.get(peer), amount, rid)

        self.book.give_back(peer, lease_ids, credit)

    def _returning(self, peer: str, lease_ids: list[str]) -> list[str]:
        """``lease_ids`` of ``peer`` to give back now: each once, and none given back
        already this round, noted as given back. A peer may name a lease again (for a
        slot not open, in a later bid, twice in one bid): it went back the first time,
        and each revert of it more counted its resources free on the peer once more."""
        fresh = [i for i in dict.fromkeys(lease_ids) if (peer, i) not in self._returned]
        self._returned.update((peer, i) for i in fresh)
        return fresh

    def _maybe_close(self, rid: int) -> None:
        if not self._gossiped and self._asked <= self._answered:
            self._close(rid)
        elif self.book.spec.strategy == "first-offer":
            trial = self._trial()
            if trial is not None:  # late binding: the first offers win, the later are reverted
                self._close(rid, trial)

    def _pooled(self) -> dict[str, list[Candidate]]:
        """Each open slot's offers and its twins' that it may take, in arrival order:
        twins are the open slots of one allocation (``name.0``, ``name.1``...: the same
        executor, params and resources, so a lease for one runs any). A provider that
        fits one of them leases the one it drew (``make_bid``'s random start); two that
        drew the same left the other without an offer, placed a round later, or after
        ``BID_GRACE_S`` while asked peers owed answers (a partition's far side).
        Every offer of a twin is listed, not a peer's first only: ``select`` takes one
        a peer (``_one_a_peer``), the next when the first placed another slot."""
        by_slot = self.book.by_slot
        pooled: dict[str, list[Candidate]] = {}
        for name, own in self._offers.items():
            pooled[name] = list(own)
            for other, offers in self._offers.items():
                if other != name and by_slot[other] is by_slot[name]:
                    pooled[name] += [c for c in offers if not self.host.excludes(name, c.peer_id)]
            # ``first-offer`` goes by it: a slot's own offer that came in last was taken
            # before a twin's that came first.
            pooled[name].sort(key=lambda c: c.seq)
        return pooled

    def _short_of_offers(self) -> bool:
        """Whether the offers in hand cannot place every open slot (``_trial``)."""
        return self._trial() is None

    def _trial(self) -> tuple[dict[str, list[Candidate]], Decision] | None:
        """What ``first-offer`` makes of the offers in hand, the pooled offers and
        ``select``'s decision, when it places every open slot (with ``distinct_peers``
        each on a peer of its own that holds no other slot of this deployment: a slot
        placed again would go to the holder); else None. ``select`` itself decides, so
        the round closes early exactly when the selection will place every slot: its
        exclusions, one slot an offer, a peer's twin offer only where it has none of the
        slot's own, distinct peers. Counting first, at every bid (pooling and selecting
        cost 15 ms a bid at 256 twins): an allocation's open slots with fewer leases
        between them than slots, a slot with no offer of its own and none of its
        twins' that it may take, or (``distinct_peers``) fewer bidders than slots who
        hold none cannot all place; ``select`` runs once these pass, most often at the
        bid that closes the round, whose decision ``_close`` then uses."""
        by_slot = self.book.by_slot
        offered: dict[int, list[Candidate]] = {}  # each allocation's, its open slots'
        names: Counter[int] = Counter()
        for name, offers in self._offers.items():
            group = id(by_slot[name])
            names[group] += 1
            offered.setdefault(group, []).extend(offers)
        if any(len({c.lease for c in offered[g]}) < count for g, count in names.items()):
            return None
        for name, offers in self._offers.items():
            twins = offered[id(by_slot[name])]
            if not offers and all(self.host.excludes(name, c.peer_id) for c in twins):
                return None
        if self._excluded_short(offered):
            return None
        holders = self._holders()
        distinct = self.book.spec.distinct_peers
        if distinct:
            bidders = {c.peer_id for offers in self._offers.values() for c in offers}
            if len(bidders - set(holders)) < len(self._offers):
                return None
        pooled = self._pooled()
        # ``first-offer`` draws nothing from the rng nor the round-robin cursor.
        decision = select(
            "first-offer", pooled, self.book.o.rng, self.book.o.cursor, holders, distinct
        )
        if len(decision.winners) < len(self._offers):
            return None
        if distinct:
            peers = [c.peer_id for c in decision.winners.values()]
            if len(set(peers)) < len(peers) or not set(holders).isdisjoint(peers):
                return None
        return pooled, decision

    def _excluded_short(self, offered: dict[int, list[Candidate]]) -> bool:
        """Whether twins that lost on some peers (``Slot.excluded``) are more than the
        leases they may take between them (Hall's condition): then no placement of every
        open slot exists, and ``select`` need not run. Twins lost on the same peers form
        a class (their constraints are the allocation's, so ``host.excludes`` says the
        same for each); each class is checked, and every union of classes (at most four
        of them in an allocation; more: each alone and all together). Without it, the
        count passing and ``select`` failing ran ``select`` at every bid: 60-100 ms a
        bid at 256 twins. Twins that lost on no peer may take any lease of the
        allocation (the count above)."""
        by_slot = self.book.by_slot
        classes: dict[int, dict[frozenset[str], list[str]]] = {}
        for name in self._offers:
            excluded = self.book.slots[name].excluded
            if excluded:
                group = classes.setdefault(id(by_slot[name]), {})
                group.setdefault(frozenset(excluded), []).append(name)
        for group_id, by_lost in classes.items():
            leases = offered[group_id]
            peers = {c.peer_id for c in leases}
            sets: list[tuple[int, set[tuple[str, str]]]] = []
            for members in by_lost.values():
                allowed = {p for p in peers if not self.host.excludes(members[0], p)}
                may = {c.lease for c in leases if c.peer_id in allowed}
                for name in members:  # its own, whoever made them
                    may.update(c.lease for c in self._offers[name])
                sets.append((len(members), may))
            if len(sets) <= 4:
                combos = [
                    [sets[i] for i in range(len(sets)) if mask >> i & 1]
                    for mask in range(1, 1 << len(sets))
                ]
            else:
                combos = [[one] for one in sets] + [sets]
            for combo in combos:
                if sum(k for k, _ in combo) > len(set().union(*(may for _, may in combo))):
                    return True
        return False

    def _holders(self) -> dict[str, int]:
        """Peers that hold slots of this deployment (committing, allocating, running):
        how many each."""
        taken: dict[str, int] = {}
        for slot in self.book.slots.values():
            if slot.peer_id and slot.state in HELD:
                taken[slot.peer_id] = taken.get(slot.peer_id, 0) + 1
        return taken

    def _window_ends(self, rid: int) -> None:
        """Close the round, unless asked peers still owe an answer and it is short of
        offers (``_short_of_offers``): busy providers answer late, and a round closed
        without them would be retried anyway, or would stack slots on one peer. Then
        wait for them, up to the bid request's own timeout."""
        waiting = self._asked - self._answered
        if waiting and not self._gossiped and self._short_of_offers():
            self.messenger.call_later(BID_GRACE_S, lambda: self._close(rid))
            return
        self._close(rid)

    # ---- choosing ------------------------------------------------------------------------

    def _close(
        self, rid: int, trial: tuple[dict[str, list[Candidate]], Decision] | None = None
    ) -> None:
        """Select and commit. ``trial``: ``first-offer``'s pooled offers and decision,
        made on the offers in hand just now (``_trial``)."""
        if rid != self.round or rid in self._closed or self.book.state in DEPLOYMENT.terminal:
            return
        self._closed.add(rid)
        if self._due_at_close:  # a slot lost while it was open: the next round, once done
            self._due_at_close = False
            self.schedule(0.0)
        pooled = trial[0] if trial is not None else self._pooled()
        doomed = self._declined_for_good(pooled)
        if doomed:
            for candidates in self._offers.values():
                for c in candidates:
                    self.book.revert(c.peer_id, [c.offer.lease_id])
            self._fail_for_good(doomed)
            return
        if trial is not None:
            decision = trial[1]
        else:
            decision = select(
                self.book.spec.strategy,
                pooled,
                self.book.o.rng,
                self.book.o.cursor,
                self._holders(),
                distinct=self.book.spec.distinct_peers,
            )
        # A peer's declines, written before its reasons below replace them: one that
        # declined a slot and offered for its twin declined that slot all the same.
        declines: list[BidRow] = []
        for name in self._offers:
            for peer, reason in self.book.slots[name].reasons.items():
                if not reason.startswith(("declined", "unreachable", "timeout", "bad bid")):
                    continue
                if self._declines_written.get((peer, name)) != reason:
                    self._declines_written[(peer, name)] = reason
                    declines.append(BidRow(self.book.id, "received", peer, name, "decline", reason))
        # The slot each winning lease went to (its own, or a twin's). An offer that placed
        # a twin says so on the other slots, whichever came first in the selection (a
        # strategy's "lost: ..." there read as if the offer had lost).
        won_as = {c.lease: name for name, c in decision.winners.items()}
        for name, candidates in pooled.items():
            winner = decision.winners.get(name)
            placed: dict[str, str] = {}  # peer -> the other slot an offer of its placed
            for c in candidates:
                other = won_as.get(c.lease)
                if other is not None and other != name:
                    placed.setdefault(c.peer_id, other)
            for peer in dict.fromkeys(c.peer_id for c in candidates):
                if peer in placed and (winner is None or winner.peer_id != peer):
                    reason = f"lost: its offer placed {placed[peer]}"
                else:
                    reason = decision.reasons.get((peer, name), "")
                self.book.slots[name].reasons[peer] = reason
        records: list[BidRow] = []
        losers: dict[str, list[Offer]] = {}
        for name, candidates in self._offers.items():
            for c in candidates:
                slot_won = won_as.get(c.lease)
                row_slot = slot_won or name
                reason = decision.reasons.get((c.peer_id, row_slot), "")
                if slot_won is None and reason.startswith("won"):
                    reason = "lost: another offer of this peer won the slot"
                records.append(
                    BidRow(self.book.id, "received", c.peer_id, row_slot,
                           "won" if slot_won else "lost", reason, lease_id=c.offer.lease_id,
                           price=c.offer.price)
                )  # fmt: skip
                if slot_won is None:
                    losers.setdefault(c.peer_id, []).append(c.offer)
        records += declines
        for name, chosen in sorted(decision.winners.items()):
            slot = self.book.slots[name]
            why = slot.reasons[chosen.peer_id]
            slot.choose(chosen.peer_id, chosen.offer.lease_id, f"won: {why}", self.book.deadlines)
            self._chosen_in[name] = rid
            self.book.event(f"{name}: chose {chosen.peer_id[-8:]} ({why})")
            self.host.commit(slot)
        for peer, offers in losers.items():
            self._give_back(peer, offers, rid)
        # Written once the commits are on their way (off the placement's path), with the
        # save of the slots' moves below.
        self.book.add_bids(records)
        unplaced = [n for n in self._offers if n not in decision.winners]
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
