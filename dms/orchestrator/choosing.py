"""Choosing and committing: what a round makes of the offers in hand.

Each open slot is chosen among its own offers and its twins' (``pooled``: the open
slots of one allocation take each other's offers) by the deployment's strategy
(``selection.py``); ``first-offer`` closes a round early as soon as the offers in
hand place every open slot (``trial``, the same ``select`` deciding). Each winner is
committed (the slot moves to ``committing``; ``supervision.py`` takes it from there),
each peer's reason and bid row written, and the losers given back once no allocate
of the deployment is in flight (``DeploymentBook.give_back``), a lease once a round.
Taking the bids in is ``intake.py``; the rounds' own life, ``rounds.py``.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from dms.orchestrator.base import DeploymentBook
from dms.orchestrator.givenback import GivenBackBook
from dms.orchestrator.intake import BidIntake, Exclusions
from dms.orchestrator.messages import Offer
from dms.orchestrator.records import BidRow
from dms.orchestrator.selection import Candidate, Decision, select
from dms.orchestrator.slots import HELD, Slot
from dms.resources.amounts import ZERO


class ChoiceHost(Exclusions, Protocol):
    """What choosing asks of the deployment."""

    def commit(self, slot: Slot) -> None:
        """A slot was won: commit its lease and start its allocation."""
        ...


class Chooser:
    """A deployment's choices among each round's offers in hand (``BidIntake``): the
    selection, the commits and the give-backs."""

    def __init__(
        self,
        book: DeploymentBook,
        host: ChoiceHost,
        intake: BidIntake,
        given_back: GivenBackBook,
    ) -> None:
        self.book = book
        self.host = host
        self.intake = intake
        # Leases given back that a peer's last heartbeat may still count as held.
        self.given_back = given_back
        # The last decline written to the bid index for (peer, slot): a reason stays on
        # its slot for the rounds after, and is written again only when it changes.
        self._declines_written: dict[tuple[str, str], str] = {}

    def choose(
        self, rid: int, pooled: dict[str, list[Candidate]], decision: Decision | None = None
    ) -> list[str]:
        """Round ``rid``'s choice among ``pooled`` (each open slot's offers and its
        twins', ``pooled``): select (``decision``: ``first-offer``'s, made on the offers
        in hand just now, ``trial``), write each peer's reason and the bid rows, commit
        each winner, give the losers back. Returns the open slots left unplaced."""
        if decision is None:
            decision = select(
                self.book.spec.strategy,
                pooled,
                self.book.o.rng,
                self.book.o.cursor,
                self.holders(),
                distinct=self.book.spec.distinct_peers,
            )
        # A peer's declines, written before its reasons below replace them: one that
        # declined a slot and offered for its twin declined that slot all the same.
        declines: list[BidRow] = []
        for name in self.intake.offers:
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
        for name, candidates in self.intake.offers.items():
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
            self.intake.chose(name, rid)
            self.book.event(f"{name}: chose {chosen.peer_id[-8:]} ({why})")
            self.host.commit(slot)
        for peer, offers in losers.items():
            self.give_back(peer, offers, rid)
        # Written once the commits are on their way (off the placement's path), with the
        # save of the slots' moves that follows (``BidRounds._close``).
        self.book.add_bids(records)
        return [n for n in self.intake.offers if n not in decision.winners]

    def give_back(self, peer: str, offers: list[Offer], rid: int) -> None:
        """Revert ``peer``'s ``offers`` (made in round ``rid``); once the revert is sent
        (it may wait for an allocate in flight: ``DeploymentBook.give_back``), what they
        held counts as free on it while its last heartbeat may still count them
        (``GivenBackBook``, from the heartbeat heard then). A lease goes back once a
        round (``BidIntake.returning``)."""
        lease_ids = self.intake.returning(peer, [o.lease_id for o in offers])
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

    def pooled(self) -> dict[str, list[Candidate]]:
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
        for name, own in self.intake.offers.items():
            pooled[name] = list(own)
            for other, offers in self.intake.offers.items():
                if other != name and by_slot[other] is by_slot[name]:
                    pooled[name] += [c for c in offers if not self.host.excludes(name, c.peer_id)]
            # ``first-offer`` goes by it: a slot's own offer that came in last was taken
            # before a twin's that came first.
            pooled[name].sort(key=lambda c: c.seq)
        return pooled

    def short_of_offers(self) -> bool:
        """Whether the offers in hand cannot place every open slot (``trial``)."""
        return self.trial() is None

    def trial(self) -> tuple[dict[str, list[Candidate]], Decision] | None:
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
        bid that closes the round, whose decision ``BidRounds._close`` then uses."""
        by_slot = self.book.by_slot
        offered: dict[int, list[Candidate]] = {}  # each allocation's, its open slots'
        names: Counter[int] = Counter()
        for name, offers in self.intake.offers.items():
            group = id(by_slot[name])
            names[group] += 1
            offered.setdefault(group, []).extend(offers)
        if any(len({c.lease for c in offered[g]}) < count for g, count in names.items()):
            return None
        for name, offers in self.intake.offers.items():
            twins = offered[id(by_slot[name])]
            if not offers and all(self.host.excludes(name, c.peer_id) for c in twins):
                return None
        if self._excluded_short(offered):
            return None
        holders = self.holders()
        distinct = self.book.spec.distinct_peers
        if distinct:
            bidders = {c.peer_id for offers in self.intake.offers.values() for c in offers}
            if len(bidders - set(holders)) < len(self.intake.offers):
                return None
        pooled = self.pooled()
        # ``first-offer`` draws nothing from the rng nor the round-robin cursor.
        decision = select(
            "first-offer", pooled, self.book.o.rng, self.book.o.cursor, holders, distinct
        )
        if len(decision.winners) < len(self.intake.offers):
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
        for name in self.intake.offers:
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
                    may.update(c.lease for c in self.intake.offers[name])
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

    def holders(self) -> dict[str, int]:
        """Peers that hold slots of this deployment (committing, allocating, running):
        how many each."""
        taken: dict[str, int] = {}
        for slot in self.book.slots.values():
            if slot.peer_id and slot.state in HELD:
                taken[slot.peer_id] = taken.get(slot.peer_id, 0) + 1
        return taken
