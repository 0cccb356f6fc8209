"""The messages of placement, as pydantic models (``specs/orchestration.md``).

Every message travels in a signed envelope, so a bid is signed by the provider
that makes it; the provider's host is authenticated by the libp2p connection
and is the lease holder's identity on the other side.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dms.actor import Handle
from dms.jobs.allocation import AllocationState
from dms.jobs.spec import MAX_SLOTS, Constraints
from dms.resources import Resources

REQUEST = "/dms/deployment/request"
BID = "/dms/deployment/bid"
COMMIT = "/dms/deployment/commit"
ALLOCATE = "/dms/deployment/allocate"
REVERT = "/dms/deployment/revert"
UPDATE = "/dms/deployment/update"
STILL_HELD = "/dms/deployment/held"  # not slots.HELD (the states that hold a lease)
DEPLOYMENT_TOPIC = "/dms/deployment"
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_RESULT_BYTES = 256 * 1024  # an allocation's result, as JSON, kept in the deployment's row
MAX_ERROR_CHARS = 2048

Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SlotRequest(_Message):
    slot: str = Field(pattern=ID_PATTERN)
    executor: str = Field(min_length=1, max_length=64)
    resources: Resources
    constraints: Constraints = Field(default_factory=Constraints)
    # The executor's params, so a provider can check them before it bids (absent: not checked).
    params: dict[str, Any] | None = None


PeerId = Annotated[str, Field(min_length=1, max_length=128)]


class BidRequest(_Message):
    deployment_id: str = Field(pattern=ID_PATTERN)
    slots: list[SlotRequest] = Field(min_length=1, max_length=MAX_SLOTS)
    lease_s: float = Field(gt=0, le=600)
    reply_to: Handle | None = None  # set on gossip requests: bids go point to point
    # On a gossip request: the peers its round also asked directly, which answer that
    # request and not this one (one bid a peer a round). Fewer than the round's open
    # slots (a round publishes only when it asks fewer), so at most MAX_SLOTS; sent only
    # when it names some (absent, as before the field: none).
    asked: list[PeerId] = Field(default_factory=list, max_length=MAX_SLOTS)


class Offer(_Message):
    slot: str = Field(max_length=128)
    lease_id: str = Field(min_length=1, max_length=64)
    price: Finite = Field(ge=0)
    expires_at: Finite


class Decline(_Message):
    slot: str = Field(max_length=128)
    reason: str = Field(max_length=4096)
    # A reason no retry changes (no such executor there, params its executor rejects).
    permanent: bool = False


class Bid(_Message):
    deployment_id: str = Field(max_length=128)
    peer_id: str = Field(max_length=128)
    did: str = Field(max_length=256)
    offers: list[Offer] = Field(default_factory=list, max_length=MAX_SLOTS)
    declines: list[Decline] = Field(default_factory=list, max_length=MAX_SLOTS)
    price: Finite = Field(default=0.0, ge=0)
    scores: dict[str, Finite] = Field(default_factory=dict)
    free: dict[str, Finite] = Field(default_factory=dict)
    onboarded: dict[str, Finite] = Field(default_factory=dict)


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
    # Commit the bid's lease first, in the same exchange (one round trip, not two).
    commit: bool = False


class RevertRequest(_Message):
    deployment_id: str = Field(pattern=ID_PATTERN)
    lease_ids: list[str] = Field(default_factory=list, max_length=MAX_SLOTS)
    everything: bool = False  # also every other lease the caller holds for this deployment


MAX_HELD_ASKED = 256  # leases one held question names


class HeldLease(_Message):
    deployment_id: str = Field(pattern=ID_PATTERN)
    lease_id: str = Field(min_length=1, max_length=64)


class HeldQuestion(_Message):
    """``/dms/deployment/held``: a provider asks a requester that went silent which of
    these leases (its allocations there) it still holds."""

    leases: list[HeldLease] = Field(min_length=1, max_length=MAX_HELD_ASKED)


class HeldAnswer(BaseModel):
    """The requester's answer: the asked leases it still holds; the others it let go."""

    model_config = ConfigDict(extra="ignore")

    held: list[str] = Field(max_length=MAX_HELD_ASKED)


class AllocationStatus(BaseModel):
    """What a provider says of an allocation (a status poll's answer, an update, the
    status in an allocate reply); the requester reads only these fields."""

    model_config = ConfigDict(extra="ignore")

    state: AllocationState
    result: Any = None
    error: str | None = None

    @field_validator("result")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        try:
            size = len(json.dumps(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the result cannot be stored as JSON: {exc}") from None
        if size > MAX_RESULT_BYTES:
            raise ValueError(f"the result is {size} bytes of JSON, over {MAX_RESULT_BYTES}")
        return value

    @field_validator("error")
    @classmethod
    def _short(cls, value: str | None) -> str | None:
        return value[:MAX_ERROR_CHARS] if value is not None else None


class AllocationUpdate(AllocationStatus):
    """``/dms/deployment/update``: an allocation's end, pushed by its provider."""

    slot: str = Field(pattern=ID_PATTERN)
    lease_id: str = Field(min_length=1, max_length=64)


class AllocateReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    allocation: Handle
    status: AllocationStatus | None = None
