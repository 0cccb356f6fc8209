"""Joint k-means over rows held by several owners, combined by secure aggregation.

Horizontal k-means needs only per-cluster sums and counts, so each owner
computes them in the clear on its own rows, and an aggregator sums the owners'
masked vectors (Bonawitz et al., CCS 2017): pairwise masks from X25519 key
agreement cancel in the total, a self mask hides each input even from an
aggregator that lies about who dropped, and the seeds are Shamir-shared so a
dropped owner's masks can be removed. Pure: no network; the messages are
pydantic models. ``simulate`` runs owners and an aggregator in one process.
See specs/mining.md, section "Collaborative k-means".

The names below load on first use (PEP 562), as in ``dms.mining``: the messages and
errors load no NumPy, so a node that only checks a proposal or relays messages (the
proposer's session, a bid on an aggregator) does not pay for the owner's and the
aggregator's arithmetic until it runs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dms.mining.lazy import lazy_names

if TYPE_CHECKING:
    from dms.mining.collab.aggregator import CollabAggregator
    from dms.mining.collab.errors import CollabFailed, Refused
    from dms.mining.collab.messages import Init, OwnerResult, Privacy, Proposal
    from dms.mining.collab.owner import CollabOwner

__all__ = [
    "CollabAggregator",
    "CollabFailed",
    "CollabOwner",
    "Init",
    "OwnerResult",
    "Privacy",
    "Proposal",
    "Refused",
]

# Each public name: the module that defines it.
_WHERE = {
    "CollabAggregator": "dms.mining.collab.aggregator",
    "CollabFailed": "dms.mining.collab.errors",
    "CollabOwner": "dms.mining.collab.owner",
    "Init": "dms.mining.collab.messages",
    "OwnerResult": "dms.mining.collab.messages",
    "Privacy": "dms.mining.collab.messages",
    "Proposal": "dms.mining.collab.messages",
    "Refused": "dms.mining.collab.errors",
}


__getattr__, __dir__ = lazy_names(__name__, _WHERE, __all__)
