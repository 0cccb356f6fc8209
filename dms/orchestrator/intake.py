"""Taking a round's bids in: what each answer adds to the offers in hand.

One offer a peer a slot a round: a peer's first offer for a slot is taken, a later
one (a hostile provider answering both the direct and the published request) is
refused at arrival with its row in the bid index and given back; a decline leaves the
round's offer as it was, and an offer undoes the round's decline (``BidIntake.take``).
One slot a lease: an offer naming a lease of its peer that stands for another slot
(an offer of the round kept for it, or a slot that holds it) is refused likewise,
and gives nothing back (the lease is that slot's). A lease given back this round is
refused when named again, and goes back once (``BidIntake.returning``).

A peer's reason for a slot is its last word: one a round gave it (not asked, no
answer of its own, gone) carries what the peer itself answered before after it
(``own_answer``). The rounds themselves (asking, closing) are ``rounds.py``; what
they choose and commit among the offers in hand, ``choosing.py``.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import ValidationError

from dms.actor import ErrorCode
from dms.jobs.spec import MAX_SLOTS
from dms.orchestrator.base import GONE_PREFIX, DeploymentBook, log
from dms.orchestrator.messages import Bid, Offer
from dms.orchestrator.records import BidRow
from dms.orchestrator.selection import Candidate
from dms.orchestrator.slots import HELD, Slot

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


class Exclusions(Protocol):
    """What taking bids in asks of the deployment."""

    def excludes(self, name: str, peer: str) -> bool:
        """Whether slot ``name`` may not go to ``peer``."""
        ...


class BidIntake:
    """The offers a round has in hand, and what each bid adds to them: arrival, the
    checks (one offer a peer a slot, one slot a lease, a lease given back is not taken
    again) and the refusals' rows. It gives nothing back and closes nothing: it says
    what goes back (``take``, ``returning``), the rounds do the rest."""

    def __init__(self, book: DeploymentBook, host: Exclusions) -> None:
        self.book = book
        self.host = host
        self._offers: dict[str, list[Candidate]] = {}
        # This round's offers, by (peer, slot): a peer's first offer for a slot is taken,
        # a later one refused (``take``); the leases that stand for a slot, by (peer,
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
        # (``returning``); its revert may wait for an allocate in flight, so one named
        # again is refused, never kept (``take``).
        self._returned: set[tuple[str, str]] = set()
        self._arrived = 0  # offers taken so far: each candidate's ``seq``

    def begin(self, open_slots: list[Slot]) -> None:
        """A round begins for ``open_slots``: no offer in hand, nothing given back."""
        self._offers = {s.name: [] for s in open_slots}
        # No slot is chosen until the round closes: the leases held now are all the held
        # ones a bid of the round can name.
        self._kept = {held: s.name for s in self.book.slots.values() if (held := held_lease(s))}
        self._offered, self._refused_noted, self._returned = set(), set(), set()
        self._declined = {}

    @property
    def offers(self) -> dict[str, list[Candidate]]:
        """The round's offers in hand, by open slot, each slot's in arrival order."""
        return self._offers

    def chose(self, name: str, rid: int) -> None:
        """Round ``rid``'s close chose slot ``name``'s lease (a refusal says since when)."""
        self._chosen_in[name] = rid

    def note_unanswered(self, peer: str, slots: list[str], why: str) -> None:
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

    def take(self, rid: int, bid: Bid) -> tuple[list[Offer], bool]:
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
        committed, then reverted), given back no second time. Returns the offers to give
        back (none naming a lease that stands for a slot) and whether the bid changed
        anything (an offer taken, a decline)."""
        peer = bid.peer_id
        changed = False
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
        return self.not_kept(peer, back), changed

    def unoffered(self, peer: str) -> list[str]:
        """This round's slots ``peer`` has no offer taken for: a reply that is no bid
        (an error, a bad bid) is its reason for those only, its first answer standing
        for the others (one that came first, for the published request)."""
        return [n for n in self._offers if (peer, n) not in self._offered]

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

    def not_kept(self, peer: str, offers: list[Offer]) -> list[Offer]:
        """``offers`` without those naming a lease of ``peer`` that an offer kept this
        round or a slot holds: a bid that names it again gives back nothing of it."""
        if not offers:
            return []
        free = set(self.not_kept_ids(peer, [o.lease_id for o in offers]))
        return [o for o in offers if o.lease_id in free]

    def not_kept_ids(self, peer: str, lease_ids: list[str]) -> list[str]:
        """``lease_ids`` of ``peer`` without those an offer kept this round or a slot
        holds (``not_kept``; a bad bid's, ``BidRounds._bad_bid``)."""
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

    def returning(self, peer: str, lease_ids: list[str]) -> list[str]:
        """``lease_ids`` of ``peer`` to give back now: each once, and none given back
        already this round, noted as given back. A peer may name a lease again (for a
        slot not open, in a later bid, twice in one bid): it went back the first time,
        and each revert of it more counted its resources free on the peer once more."""
        fresh = [i for i in dict.fromkeys(lease_ids) if (peer, i) not in self._returned]
        self._returned.update((peer, i) for i in fresh)
        return fresh
