"""Choosing among bids: ``score``, ``round-robin``, ``two-choices``, ``random``,
``first-offer``.

Each strategy assigns every open slot at most one offer, and says why every
offer won or lost; the requester records those reasons with the decision.

``score`` is the requester's comparator, deterministic: free capacity after
the offer (cpu .4, ram .3, disk .2, gpu .1, as NuNet weighs it) + 0.3 x the
bidder's ``cpu_single_mops`` relative to the best bidder - 0.3 x its price
relative to the dearest, minus 0.2 for each slot the peer already won in this
round or holds already (spreading a deployment makes it survive one provider,
and puts a mining job's shards on distinct peers when enough bid); ties go to the
lower peer id. The other three are the reference system's load balancers,
run by the requester: a round-robin cursor over peer ids, the better of two
random offers (more free cpu wins), and a uniformly random offer.
``first-offer`` is late binding, as Sparrow schedules: the offer that came in
first wins, and its round closes as soon as this selection, run on the offers
in hand, places every open slot (``choosing.py``; the peer that answers first is
the one with time to spare now; the round does not wait for the slower one).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from dms.orchestrator.messages import Bid, Offer

WEIGHTS = {"cpu": 0.4, "ram_gib": 0.3, "disk_gib": 0.2, "gpu": 0.1}
SPREAD_PENALTY = 0.2


@dataclass(frozen=True)
class Candidate:
    bid: Bid
    offer: Offer
    # Its place in the round's arrivals: a slot's offers pooled with its twins'
    # (``choosing.py``) are listed in arrival order by it, which ``first-offer`` goes by.
    seq: int = 0

    @property
    def peer_id(self) -> str:
        return self.bid.peer_id

    @property
    def lease(self) -> tuple[str, str]:
        """The lease offered, as its provider's: a lease id is the provider's to choose,
        so one that names another peer's lease is another lease (it cannot place that
        peer's, nor keep it from being given back)."""
        return (self.bid.peer_id, self.offer.lease_id)


@dataclass
class Decision:
    winners: dict[str, Candidate]  # slot -> chosen offer
    reasons: dict[tuple[str, str], str]  # (peer id, slot) -> why it won or lost


class RoundRobin:
    """A cursor over peer ids shared by a node's deployments (thread-safe)."""

    def __init__(self) -> None:
        self._last = ""
        self._lock = threading.Lock()

    def pick(self, peers: list[str]) -> str:
        with self._lock:
            ordered = sorted(peers)
            chosen = next((p for p in ordered if p > self._last), ordered[0])
            self._last = chosen
            return chosen


def free_fraction(bid: Bid) -> float:
    total = 0.0
    for kind, weight in WEIGHTS.items():
        onboarded = bid.onboarded.get(kind, 0) or 0
        if onboarded > 0:
            total += weight * (bid.free.get(kind, 0) or 0) / onboarded
    return total


def _scores(candidates: list[Candidate]) -> dict[str, float]:
    best_cpu = max((c.bid.scores.get("cpu_single_mops", 0.0) for c in candidates), default=0.0)
    dearest = max((c.offer.price for c in candidates), default=0.0)
    out = {}
    for c in candidates:
        score = free_fraction(c.bid)
        if best_cpu > 0:
            score += 0.3 * c.bid.scores.get("cpu_single_mops", 0.0) / best_cpu
        if dearest > 0:
            score -= 0.3 * c.offer.price / dearest
        out[c.peer_id] = round(score, 4)
    return out


def distinct_matching(offers: dict[str, list[Candidate]], taken: set[str]) -> dict[str, str]:
    """As many slots as possible on peers of their own (none in ``taken``): a maximum
    bipartite matching (augmenting paths), each slot trying its best-scored peers first.
    Greedy choice slot by slot can leave two slots one peer where a matching exists."""
    prefs = {
        slot: [
            peer
            for peer, _ in sorted(_scores(cands).items(), key=lambda item: (-item[1], item[0]))
            if peer not in taken
        ]
        for slot, cands in offers.items()
    }
    holder: dict[str, str] = {}  # peer -> slot

    def assign(slot: str, seen: set[str]) -> bool:
        for peer in prefs[slot]:
            if peer in seen:
                continue
            seen.add(peer)
            if peer not in holder or assign(holder[peer], seen):
                holder[peer] = slot
                return True
        return False

    for slot in sorted(offers, key=lambda name: (len(offers[name]), name)):
        assign(slot, set())
    return {slot: peer for peer, slot in holder.items()}


def _one_a_peer(candidates: list[Candidate], slot: str) -> list[Candidate]:
    """A slot's choice is among peers: an offer made for a twin (``choosing.py``) stands
    for its peer only where the peer has none of the slot's own, the first in list
    order (arrival). Each offer of the slot's own stays (no twins: nothing changes)."""
    own = {c.peer_id for c in candidates if c.offer.slot == slot}
    seen: set[str] = set()
    kept = []
    for c in candidates:
        if c.offer.slot != slot:
            if c.peer_id in own or c.peer_id in seen:
                continue
            seen.add(c.peer_id)
        kept.append(c)
    return kept


def _last_lease(
    c: Candidate,
    offers: dict[str, list[Candidate]],
    pending: dict[str, str],
    used: set[tuple[str, str]],
) -> bool:
    """Whether ``c`` is the last lease its peer has left for the slot that the
    ``distinct`` matching gave it and that is still to choose (``pending``)."""
    matched = pending.get(c.peer_id)
    if matched is None:
        return False
    return not any(
        o.peer_id == c.peer_id and o.lease != c.lease and o.lease not in used
        for o in offers[matched]
    )


def select(
    strategy: str,
    offers: dict[str, list[Candidate]],
    rng: random.Random,
    cursor: RoundRobin,
    taken: dict[str, int] | None = None,
    distinct: bool = False,
) -> Decision:
    """``taken``: slots of this deployment each peer already holds (``score`` spreads
    new slots away from them too). ``distinct``: a peer that holds or wins a slot
    gets another only when no other peer offered (every strategy). An offer may be
    listed under several slots (twins: ``choosing.py``, in arrival order): it wins one
    at most, stands for its peer only where the peer has no unused offer of the
    slot's own (``_one_a_peer``), and with ``distinct`` a slot left out of the
    matching takes no peer's last lease for the slot matched to it."""
    winners: dict[str, Candidate] = {}
    reasons: dict[tuple[str, str], str] = {}
    won: dict[str, int] = dict(taken or {})
    used: set[tuple[str, str]] = set()  # leases that won: one listed under twins wins once
    apart = distinct_matching(offers, set(won)) if distinct else {}
    pending = {peer: slot for slot, peer in apart.items()}  # matched, yet to choose
    # The slot with the fewest offers first: it has the least choice (so a job spread
    # over several peers is not left with one peer for two slots).
    for slot in sorted(offers, key=lambda name: (len(offers[name]), name)):
        candidates = sorted(offers[slot], key=lambda c: c.peer_id)
        if slot in apart:
            for c in candidates:
                if c.peer_id != apart[slot]:
                    reasons[(c.peer_id, slot)] = "lost: the job's allocations go to distinct peers"
            candidates = [c for c in candidates if c.peer_id == apart[slot]]
            pending.pop(apart[slot], None)
        candidates = [c for c in candidates if c.lease not in used]
        if pending and slot not in apart:
            candidates = [c for c in candidates if not _last_lease(c, offers, pending, used)]
        candidates = _one_a_peer(candidates, slot)
        if not candidates:
            continue
        if strategy == "score":
            base = _scores(candidates)
            final = {p: s - SPREAD_PENALTY * won.get(p, 0) for p, s in base.items()}
            chosen = min(candidates, key=lambda c: (-final[c.peer_id], c.peer_id))
            why_won = f"won: score {final[chosen.peer_id]:.3f}, best of {len(candidates)}"
            top = final[chosen.peer_id]
            why_lost = {
                c.peer_id: f"lost: score {final[c.peer_id]:.3f} < {top:.3f}"
                if final[c.peer_id] < top
                else f"lost: tied at {top:.3f}, lower peer id wins"
                for c in candidates
            }
        elif strategy == "round-robin":
            peer = cursor.pick([c.peer_id for c in candidates])
            chosen = next(c for c in candidates if c.peer_id == peer)
            why_won = "won: next in round-robin order"
            why_lost = {c.peer_id: f"lost: round-robin chose {peer}" for c in candidates}
        elif strategy == "two-choices":
            pair = rng.sample(candidates, 2) if len(candidates) >= 2 else candidates
            chosen = max(pair, key=lambda c: (c.bid.free.get("cpu", 0.0), c.peer_id))
            other = [c.peer_id for c in pair if c is not chosen]
            why_won = (
                f"won: more free cpu than {other[0]}" if other else "won: the only offer drawn"
            )
            drawn = {c.peer_id for c in pair}
            why_lost = {
                c.peer_id: "lost: less free cpu in the pair drawn"
                if c.peer_id in drawn
                else "lost: not among the two drawn"
                for c in candidates
            }
        elif strategy == "first-offer":
            listed = {id(c) for c in candidates}
            chosen = next(c for c in offers[slot] if id(c) in listed)  # in arrival order
            why_won = f"won: first in of {len(candidates)} offer(s)"
            why_lost = {c.peer_id: "lost: another offer came in first" for c in candidates}
        elif strategy == "random":
            chosen = rng.choice(candidates)
            why_won = f"won: drawn at random from {len(candidates)}"
            why_lost = {c.peer_id: "lost: not drawn" for c in candidates}
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        winners[slot] = chosen
        used.add(chosen.lease)
        won[chosen.peer_id] = won.get(chosen.peer_id, 0) + 1
        for c in candidates:
            if c is not chosen and c.peer_id == chosen.peer_id:
                continue  # its other offer (a bid request answered twice): the peer won
            reasons[(c.peer_id, slot)] = why_won if c is chosen else why_lost[c.peer_id]
    if not distinct and len(winners) < len(offers):  # most often every slot has placed
        _complete(offers, winners, reasons)
    return Decision(winners=winners, reasons=reasons)


def _complete(
    offers: dict[str, list[Candidate]],
    winners: dict[str, Candidate],
    reasons: dict[tuple[str, str], str],
) -> None:
    """Place slots the choice slot by slot left out, by moving twins: a slot takes an
    offer listed under it (the same one, pooled: ``choosing.py``) that a twin won, the
    twin one still free that it may take, or in turn one another twin won (augmenting
    paths). Twins that lost on different peers could be left one short where a
    placement of all existed: ``w.0`` lost on ``b``, ``w.1`` on ``a``, ``w.2`` on ``c``,
    offers ``a:w.0``, ``b:w.1``, ``c:w.0``. Slots of their own (no twins) list no offer
    another slot won: nothing changes for them."""
    holder = {c.lease: name for name, c in winners.items()}

    def free(slot: str) -> Candidate | None:
        return next((c for c in offers[slot] if c.lease not in holder), None)

    def place(slot: str, seen: set[str]) -> Candidate | None:
        found = free(slot)
        if found is not None:
            return found
        for c in offers[slot]:
            twin = holder.get(c.lease)
            if twin is None or twin in seen or winners[twin] is not c:
                continue
            seen.add(twin)
            moved = place(twin, seen)
            if moved is not None:
                winners[twin] = moved
                holder[moved.lease] = twin
                reasons[(moved.peer_id, twin)] = f"won: moved here so that {slot} places"
                return c
        return None

    for slot in sorted(offers, key=lambda name: (len(offers[name]), name)):
        if slot in winners or not offers[slot]:
            continue
        chosen = place(slot, {slot})
        if chosen is not None:
            winners[slot] = chosen
            holder[chosen.lease] = slot
            reasons[(chosen.peer_id, slot)] = "won: its twin moved to another offer"
