"""The node's own policy for the work it accepts (the seed's capability comparator).

Kept in ``config.toml`` under ``[preferences]`` (or ``DMS_PREFERENCES`` as JSON),
so ``dms config show`` shows it; the bidder asks :meth:`Preferences.refusal`
before it looks at resources, and every refusal is a reason people can read.

It also bounds what any one requester can hold here (``specs/security.md``, issue
17 item 4): leases held at once, the share of each resource they hold,
bid requests a second, how long a bid's lease lasts, and how long a committed
lease waits for its allocation.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ANY_KIND = "*"


class Preferences(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_price: float = Field(default=0.0, ge=0, description="decline jobs paying less")
    job_kinds: list[str] = Field(
        default_factory=lambda: [ANY_KIND], description="executor kinds accepted; * for any"
    )
    max_allocations: int = Field(
        default=0, ge=0, description="most allocations at once; 0 for no limit"
    )
    allow_dids: list[str] = Field(
        default_factory=list, description="only these requesters; empty for anyone"
    )
    deny_dids: list[str] = Field(default_factory=list, description="never these requesters")
    max_leases_per_peer: int = Field(
        default=64, ge=0, description="leases and allocations one requester holds at once; 0: any"
    )
    max_peer_share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="largest share of each onboarded resource one requester holds at once "
        "(leases and allocations); 1: all of it",
    )
    bid_requests_per_s: float = Field(
        default=50.0, ge=0, description="bid requests a second from one peer; 0: no limit"
    )
    bid_request_burst: int = Field(
        default=100, ge=1, description="bid requests one peer may send at once, then at the rate"
    )
    max_lease_s: float = Field(
        default=60.0, gt=0, le=600, description="longest a bid's lease holds, whatever is asked"
    )
    allocate_within_s: float = Field(
        default=30.0, gt=0, description="a committed lease not allocated this soon is released"
    )
    lapse_cooldown_s: float = Field(
        default=60.0,
        ge=0,
        description="after a requester lets a committed lease lapse, no bids to it this long "
        "(doubling with each further lapse, up to an hour); 0: none",
    )

    def refusal(
        self, *, kind: str, requester: str, max_price: float | None, allocations: int
    ) -> str | None:
        """Why this node will not take the job, or None when its policy allows it."""
        if requester in self.deny_dids:
            return "requester is on this node's deny list"
        if self.allow_dids and requester not in self.allow_dids:
            return "requester is not on this node's allow list"
        if ANY_KIND not in self.job_kinds and kind not in self.job_kinds:
            return f"this node does not run {kind!r} jobs (accepts {', '.join(self.job_kinds)})"
        if max_price is not None and max_price < self.min_price:
            return f"job pays at most {max_price:g}, this node's minimum is {self.min_price:g}"
        if self.max_allocations and allocations >= self.max_allocations:
            return f"this node already runs its maximum of {self.max_allocations} allocations"
        return None
