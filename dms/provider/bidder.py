"""The provider's side of a bid request: semantic checks, then resources, then a bid.

Checks run in a fixed order and the first that fails is the slot's decline
reason, sent back so the requester can explain (NuNet users asked "why did no
node bid?"): executor and its params, the node's preferences, the job's
constraints, price, and only then the ledger, whose lease is what makes the
offer binding. A decline for the executor or its params is ``permanent``: no
retry changes it, and the requester stops asking (``rounds.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from dms.jobs.executors import EXECUTORS, ExecutorError
from dms.jobs.spec import MAX_SLOTS
from dms.orchestrator.messages import Bid, BidRequest, Decline, Offer, SlotRequest
from dms.resources import Pools, Preferences, ResourceError, ResourceLedger, Resources
from dms.resources.amounts import KINDS, ZERO, show
from dms.resources.ledger import Held

MAX_REASON = 512


def _always(peer: str) -> bool:
    return True


@dataclass
class BidderView:
    """What the bidder knows of its own node."""

    peer_id: str
    did: str
    ledger: ResourceLedger
    preferences: Preferences
    scores: dict[str, float] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    max_slots: int = MAX_SLOTS  # slots of one request considered (max_bid_slots)
    # Whether this node has a stake in a peer; those without one together hold at
    # most ``unknown_share`` of each onboarded resource (dms.node.stakes).
    stake: Callable[[str], bool] = _always
    unknown_share: float = 1.0


def job_refusal(slot: SlotRequest) -> str | None:
    """Why no retry could ever make this node take ``slot``, or None: it has no such
    executor, or the executor rejects the params within the slot's resources."""
    executor = EXECUTORS.get(slot.executor)
    if executor is None:
        return f"no executor {slot.executor!r} on this node"
    if slot.params is None:
        return None
    try:
        executor.check(slot.params, slot.resources)
    except ExecutorError as exc:
        return exc.message[:MAX_REASON]
    except Exception as exc:  # odd params break a check: still a refusal, with why
        return f"{slot.executor} params: {type(exc).__name__}: {exc}"[:MAX_REASON]
    return None


def semantic_refusal(
    slot: SlotRequest,
    me: BidderView,
    requester_did: str,
    price: float,
    allocations: int,
    job: str | None = "",
) -> str | None:
    """Why this node cannot take ``slot`` whatever its free resources, or None.
    ``job``: the slot's :func:`job_refusal` when the caller has it already (None: it
    has none), so a bid checks each slot's params once."""
    refusal = job_refusal(slot) if job == "" else job
    if refusal:
        return refusal
    c = slot.constraints
    refusal = me.preferences.refusal(
        kind=slot.executor, requester=requester_did, max_price=c.max_price, allocations=allocations
    )
    if refusal:
        return refusal
    if me.peer_id in c.exclude_peers:
        return "this node is excluded by the job"
    if c.include_peers and me.peer_id not in c.include_peers:
        return "this node is not among the job's included peers"
    missing = [label for label in c.labels if label not in me.labels]
    if missing:
        return f"this node lacks the labels {', '.join(missing)}"
    for name, minimum in sorted(c.min_scores.items()):
        score = me.scores.get(name)
        if score is None:
            return f"this node has no benchmark score {name!r}"
        if score < minimum:
            return f"benchmark {name} {score:g} < {minimum:g} required"
    if c.max_price is not None and price > c.max_price:
        return f"this node asks {price:g}, the job pays at most {c.max_price:g}"
    return None


def _over_caps(prefs: Preferences, held: int, in_use: int) -> str | None:
    """Why one more lease would lock more than this node offers (``held``: what this
    requester holds; ``in_use``: leases and allocations of everyone), or None."""
    if prefs.max_leases_per_peer and held >= prefs.max_leases_per_peer:
        return (
            f"this requester holds {held} leases and allocations here, the most one peer "
            f"may hold (max_leases_per_peer)"
        )
    if prefs.max_allocations and in_use >= prefs.max_allocations:
        return (
            f"this node holds {in_use} leases and allocations, its maximum "
            f"(max_allocations {prefs.max_allocations})"
        )
    return None


def _never_fits(slot: SlotRequest, asked: Resources, onboarded: Resources) -> str | None:
    """Why ``slot`` could never run here beside the slots before it (``asked``: theirs),
    whatever is free: together they pass what the node onboarded. None if it fits."""
    if (asked + slot.resources).fits_in(onboarded):
        return None
    return (
        "this node could never run this slot beside the ones before it in this request: "
        "together they ask more than it offers in all"
    )


def _unknown_held(requester: str, me: BidderView, holders: Mapping[str, Held]) -> Resources | None:
    """What peers without a stake here hold (``requester`` included), if ``requester``
    is one of them and others hold something too; None: no bound. A lone newcomer
    may take what it likes (within ``max_peer_share``): a crowd of keys, only
    ``unknown_share`` together."""
    if me.unknown_share >= 1.0 or me.stake(requester):
        return None
    held = others = ZERO
    for holder, holding in holders.items():
        amount = holding.amount
        if holder != requester and not me.stake(holder):
            others = others + amount
        if not me.stake(holder):
            held = held + amount
    return None if others.is_zero() else held


def _over_unknown_share(held: Resources, onboarded: Resources, share: float) -> str | None:
    for kind, have, total in zip(KINDS, held.as_tuple(), onboarded.as_tuple(), strict=True):
        if total and have > share * total:
            return (
                f"peers this node has no stake in would hold {show(kind, have)} of its "
                f"{show(kind, total)}, more than their share (unknown_share {share:g})"
            )
    return None


def make_bid(request: BidRequest, requester_peer: str, requester_did: str, me: BidderView) -> Bid:
    """Check every slot and lease what fits; leases are held for ``request.lease_s``, at
    most the node's ``max_lease_s``.

    A request locks no more than this node would really run: one requester holds at
    most ``max_leases_per_peer`` leases and allocations here, and with
    ``max_allocations`` set, leases and allocations together stay within it.
    Slots are tried from a random starting point: providers that can take only
    some of the slots then offer different ones, and one round places more.

    And costs no more than that: only ``me.max_slots`` slots are considered (the
    rest are declined at once, ``max_bid_slots``), and once the slots so far ask
    for all this node onboarded, the rest are declined without their checks."""
    offers: list[Offer] = []
    declines: list[Decline] = []
    start = random.randrange(len(request.slots))
    slots = request.slots[start:] + request.slots[:start]
    slots, unread = slots[: me.max_slots], slots[me.max_slots :]
    if unread:
        reason = (
            f"this node considers at most {me.max_slots} slots of one bid request "
            f"(max_bid_slots); {len(unread)} were not"
        )
        declines = [Decline(slot=slot.slot, reason=reason) for slot in unread]
    jobs = [job_refusal(slot) for slot in slots]  # once a slot: the params' check runs
    for_good = {slot.slot for slot, job in zip(slots, jobs, strict=True) if job is not None}
    prefs = me.preferences

    def screen(pools: Pools) -> list[str | None]:
        mine = pools.holders.get(requester_peer)
        held = mine.count if mine is not None and prefs.max_leases_per_peer else 0
        unknown = _unknown_held(requester_peer, me, pools.holders)
        refusals: list[str | None] = []
        taken = 0
        asked = taking = ZERO
        for slot, job in zip(slots, jobs, strict=True):
            if pools.is_onboarded and slot.slot not in for_good:
                refusal = _never_fits(slot, asked, pools.onboarded)
                if refusal is not None:
                    refusals.append(refusal)
                    continue
                asked = asked + slot.resources
            refusal = semantic_refusal(slot, me, requester_did, pools.price, pools.allocations, job)
            if refusal is None:
                refusal = _over_caps(prefs, held + taken, pools.allocations + pools.leases + taken)
            if refusal is None and unknown is not None:
                refusal = _over_unknown_share(
                    unknown + taking + slot.resources, pools.onboarded, me.unknown_share
                )
            if refusal is None:
                taking = taking + slot.resources
            taken += refusal is None
            refusals.append(refusal)
        return refusals

    # One transaction: the checks that need the pools or what each peer holds run on
    # what it read.
    leases, after = me.ledger.lock_many(
        [(s.resources, f"dep:{request.deployment_id}/{s.slot}") for s in slots],
        min(request.lease_s, prefs.max_lease_s),
        holder=requester_peer,
        screen=screen,
        holders=True,
    )
    for slot, lease in zip(slots, leases, strict=True):
        if isinstance(lease, ResourceError):
            declines.append(
                Decline(slot=slot.slot, reason=lease.message, permanent=slot.slot in for_good)
            )
        else:
            assert lease.expires_at is not None
            offers.append(
                Offer(
                    slot=slot.slot,
                    lease_id=lease.id,
                    price=after.price,
                    expires_at=lease.expires_at,
                )
            )
    return Bid(
        deployment_id=request.deployment_id,
        peer_id=me.peer_id,
        did=me.did,
        offers=offers,
        declines=declines,
        price=after.price,
        scores=me.scores,
        free=after.free.human(),
        onboarded=after.onboarded.human(),
    )
