"""The messages of placement, as pydantic models (``specs/orchestration.md``).

Every message travels in a signed envelope, so a bid is signed by the provider
that makes it; the provider's host is authenticated by the libp2p connection
and is the lease holder's identity on the other side.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dms.actor import Handle
from dms.jobs.spec import MAX_SLOTS, Constraints
from dms.resources import Resources

REQUEST = "/dms/deployment/request"
BID = "/dms/deployment/bid"
COMMIT = "/dms/deployment/commit"
ALLOCATE = "/dms/deployment/allocate"
REVERT = "/dms/deployment/revert"
UPDATE = "/dms/deployment/update"
DEPLOYMENT_TOPIC = "/dms/deployment"
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SlotRequest(_Message):
    slot: str = Field(pattern=ID_PATTERN)
    executor: str = Field(min_length=1, max_length=64)
    resources: Resources
    constraints: Constraints = Field(default_factory=Constraints)


class BidRequest(_Message):
    deployment_id: str = Field(pattern=ID_PATTERN)
    slots: list[SlotRequest] = Field(min_length=1, max_length=MAX_SLOTS)
    lease_s: float = Field(gt=0, le=600)
    reply_to: Handle | None = None  # set on gossip requests: bids go point to point


class Offer(_Message):
    slot: str
    lease_id: str
    price: float
    expires_at: float


class Decline(_Message):
    slot: str
    reason: str


class Bid(_Message):
    deployment_id: str
    peer_id: str
    did: str
    offers: list[Offer] = Field(default_factory=list)
    declines: list[Decline] = Field(default_factory=list)
    price: float = 0.0
    scores: dict[str, float] = Field(default_factory=dict)
    free: dict[str, float] = Field(default_factory=dict)
    onboarded: dict[str, float] = Field(default_factory=dict)


class CommitRequest(_Message):
    deployment_id: str = Field(pattern=ID_PATTERN)
    slot: str = Field(pattern=ID_PATTERN)
    lease_id: str = Field(min_length=1, max_length=64)


class AllocateRequest(_Message):
    deployment_id: str = Field(pattern=ID_PATTERN)
    slot: str = Field(pattern=ID_PATTERN)
    lease_id: str = Field(min_length=1, max_length=64)
    executor: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    reply_to: Handle | None = None


class RevertRequest(_Message):
    deployment_id: str = Field(pattern=ID_PATTERN)
    lease_ids: list[str] = Field(default_factory=list, max_length=MAX_SLOTS)
    everything: bool = False  # also every other lease the caller holds for this deployment
