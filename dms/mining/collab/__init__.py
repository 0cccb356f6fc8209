"""Joint k-means over rows held by several owners, combined by secure aggregation.

Horizontal k-means needs only per-cluster sums and counts, so each owner
computes them in the clear on its own rows, and an aggregator sums the owners'
masked vectors (Bonawitz et al., CCS 2017): pairwise masks from X25519 key
agreement cancel in the total, a self mask hides each input even from an
aggregator that lies about who dropped, and the seeds are Shamir-shared so a
dropped owner's masks can be removed. Pure: no network; the messages are
pydantic models. ``simulate`` runs owners and an aggregator in one process.
See specs/mining.md, section "Collaborative k-means".
"""

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
