"""What a deployment gave back to a peer that the peer's last heartbeat may still count.

A provider leases what it offers as it bids; a heartbeat it sends before the
requester gives those leases back (its bid lost, or came after the round closed)
shows them held, and stays its last word on free resources until its next beat
(seconds away, longer in a large network: ``heartbeat_interval``). Read as it is,
an idle provider looked too small to ask for a slot placed again meanwhile, which
then went to a peer holding another slot of the job (distinct peers broken, though
this one stood idle). Each give-back is noted with the peer's heartbeat then
heard; it counts as free on that peer until a heartbeat two beats later (the next
one may have left before the revert arrived) or from a restarted process. Rounds
come faster than heartbeats and lease the same cores again, one after another: what
is credited is the most one round gave back (what its rounds gave back together,
counted once a round, had a provider of 2 cores read as 4 free), and never more than
that heartbeat shows held (:func:`free_with`; it counts other jobs' allocations too,
so that bound alone had a provider of 4 cores holding 2 for another job read as 4
free after two rounds gave back 2 each).
See ``specs/orchestration.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dms.network.peertable import PeerRecord
from dms.resources import Resources
from dms.resources.amounts import ZERO

# A peer's heartbeats that may have left before a revert sent after this one arrived.
BEATS_IN_FLIGHT = 1
# At most this many give-backs noted per peer (one a round and peer at most).
MAX_NOTED = 64


@dataclass(frozen=True)
class GivenBack:
    nonce: str  # the peer's process, by its heartbeat
    seq: int  # its heartbeat heard when the leases went back
    amount: Resources
    round: int = 0  # the bid round whose offers these were


class GivenBackBook:
    """Leases a deployment gave back, per peer, while its heartbeats may still count them."""

    def __init__(self) -> None:
        self._by_peer: dict[str, list[GivenBack]] = {}

    def note(self, record: PeerRecord | None, amount: Resources, round_id: int = 0) -> None:
        """``amount`` was given back to ``record``'s peer now (its leases reverted), the
        offers of round ``round_id``."""
        if record is None or record.heartbeat is None or amount.is_zero():
            return  # never judged by a heartbeat: nothing to correct
        hb = record.heartbeat
        noted = self._by_peer.setdefault(record.peer_id, [])
        noted.append(GivenBack(hb.nonce, hb.seq, amount, round_id))
        del noted[:-MAX_NOTED]

    def credit(self, record: PeerRecord) -> Resources:
        """What ``record``'s last heartbeat may still count as held that was given back."""
        hb = record.heartbeat
        noted = self._by_peer.get(record.peer_id)
        if not noted:
            return ZERO
        noted = [
            g
            for g in noted
            if hb is not None and g.nonce == hb.nonce and hb.seq <= g.seq + BEATS_IN_FLIGHT
        ]
        if not noted:
            self._by_peer.pop(record.peer_id, None)
            return ZERO
        self._by_peer[record.peer_id] = noted
        # One round's leases are given back before the next round leases the same
        # resources again: a heartbeat counts one round's as held, not their sum.
        by_round: dict[int, Resources] = {}
        for given in noted:
            by_round[given.round] = by_round.get(given.round, ZERO) + given.amount
        most = (0, 0, 0, 0)
        for amount in by_round.values():
            most = tuple(max(a, b) for a, b in zip(most, amount.as_tuple(), strict=True))
        return Resources.of(most)  # type: ignore[arg-type]


_NOTHING_BACK = ZERO.human()  # read only


def free_with(record: PeerRecord, given_back: Resources) -> dict[str, float]:
    """The peer's free resources by its last heartbeat (human units) with ``given_back``
    added, none past what it onboarded: what its heartbeat showed held is all that can
    have been given back since."""
    hb = record.heartbeat
    if hb is None:
        return {}
    back = _NOTHING_BACK if given_back is ZERO else given_back.human()
    free: dict[str, float] = {}
    for kind in {*hb.free, *back}:
        amount = (hb.free.get(kind, 0) or 0) + back.get(kind, 0)
        onboarded = hb.onboarded.get(kind)
        free[kind] = amount if onboarded is None else min(amount, max(onboarded, 0))
    return free
