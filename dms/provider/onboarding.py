"""The node's provider side: onboarding, resources, hardware and capability behaviours.

A role of :class:`dms.node.node.NodeActor` (:class:`Provider`). Amounts and
leases live in the store (``dms.resources``); this role only exposes them and
keeps the heartbeat's summary fresh. See ``specs/node.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dms.actor import ErrorCode, Refusal, Request, behaviour
from dms.actor.runtime import NodeRuntime
from dms.resources import (
    Capability,
    Onboarder,
    OnboardRequest,
    ResourceLedger,
    Resources,
)
from dms.resources.machine import hardware_spec, hardware_usage
from dms.store import STORE_RETRY

log = logging.getLogger("dms.node")


class OffboardPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: bool = False


class CapabilityPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    capability: Capability | None = None  # None: measure here


class LockPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resources: Resources
    lease_s: float = Field(default=30.0, gt=0)
    ref: str = Field(default="", max_length=256)


class LeasePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)
    ref: str | None = Field(default=None, max_length=256)


def need_ledger(ledger: ResourceLedger | None) -> ResourceLedger:
    if ledger is None:
        raise Refusal(ErrorCode.UNKNOWN_BEHAVIOUR, "this node keeps no resource ledger")
    return ledger


class Benchmark:
    """The node's measured capability, read from the store at start and after each
    change: bids and heartbeats carry its scores."""

    def __init__(self, onboarder: Onboarder | None) -> None:
        self.onboarder = onboarder
        self.capability: Capability | None = None

    def refresh(self) -> None:
        if self.onboarder is not None:
            self.capability = self.onboarder.capability()

    def scores(self) -> dict[str, float]:
        return self.capability.scores() if self.capability is not None else {}


class Provider:
    """Onboarding, resources and hardware. ``changed``: tell peers now (a heartbeat);
    ``released``: stop the allocations of leases the owner released."""

    def __init__(
        self,
        node: NodeRuntime,
        *,
        benchmark: Benchmark,
        changed: Callable[[], None],
        released: Callable[[list[str]], None],
        onboarder: Onboarder | None = None,
        ledger: ResourceLedger | None = None,
        home: Path | None = None,
        expire_every_s: float = 5.0,
    ) -> None:
        self.node = node
        self.benchmark = benchmark
        self.changed = changed
        self.released = released
        self.onboarder = onboarder
        self.ledger = ledger
        self.home = home
        self.expire_every_s = expire_every_s

    def start(self) -> None:
        if self.onboarder is None:
            return
        self.benchmark.refresh()
        expired = self._ledger().expire()  # what ran out while the node was down
        live = self._ledger().live()
        self.onboarder.db.record(
            "node.restored",
            expired=len(expired),
            allocations=sum(1 for lease in live if lease.state == "allocated"),
            leases=sum(1 for lease in live if lease.state == "locked"),
        )
        self.node.call_later(self.expire_every_s, self._expire)

    def _expire(self, retry_s: float = 0.0) -> None:
        """Mark the leases past their expiry, every ``expire_every_s``. A store that is
        busy (another process holds it locked: the node's thread waits ``store_wait_s``
        at most) or refuses is asked again sooner, waiting longer each time (``retry_s``:
        the last wait) up to the usual period; the sums ignore expired leases anyway."""
        every = self.expire_every_s
        try:
            ids = self._ledger().expire()
            if ids:
                log.info("%d lease(s) expired", len(ids))
        except Exception as exc:
            retry = min(every, STORE_RETRY.after(retry_s) if retry_s else STORE_RETRY.first_s)
            log.warning("could not expire leases (%s): trying again in %g s", exc, retry)
            self.node.call_later(retry, lambda: self._expire(retry))
            return
        self.node.call_later(every, self._expire)

    def resource_summary(self, wait_s: float | None = None) -> dict[str, Any]:
        """The figures a heartbeat carries; ``wait_s``: the longest wait for the store."""
        summary: dict[str, Any] = {}
        if self.ledger is not None:
            pools = self.ledger.pools(wait_s)
            summary.update(
                onboarded=pools.onboarded.human(),
                free=pools.free.human(),
                allocations=pools.allocations,
                price=pools.price,
            )
        if self.benchmark.capability is not None:
            summary["scores"] = self.benchmark.capability.scores()
        return summary

    # ---- onboarding ----------------------------------------------------------------

    @behaviour("/dms/node/onboarding/onboard", payload=OnboardRequest)
    def onboard(self, request: Request) -> Any:
        onboarder, payload = self._onboarder(), request.payload
        if onboarder.needs_benchmark(payload):  # tens of seconds at most, off the mailbox
            self.node.in_background(request, lambda: onboarder.onboard(payload), then=self._changed)
            return None
        result = onboarder.onboard(payload)
        self._changed(result)
        return result

    @behaviour("/dms/node/onboarding/offboard", payload=OffboardPayload)
    def offboard(self, request: Request) -> dict[str, Any]:
        result = self._onboarder().offboard(force=request.payload.force)
        self.released([lease["id"] for lease in result["released"]])
        self._changed(result)
        return result

    @behaviour("/dms/node/onboarding/status")
    def onboarding_status(self, request: Request) -> dict[str, Any]:
        return self._onboarder().status()

    @behaviour("/dms/node/onboarding/capability", payload=CapabilityPayload)
    def register_capability(self, request: Request) -> Any:
        """Register a capability measured by the CLI, or measure it here."""
        onboarder, capability = self._onboarder(), request.payload.capability
        if capability is None:
            self.node.in_background(
                request,
                lambda: onboarder.benchmark().model_dump(mode="json"),
                then=self._changed,
            )
            return None
        onboarder.register(capability)
        self._changed(None)
        return capability.model_dump(mode="json")

    # ---- resources -----------------------------------------------------------------

    @behaviour("/dms/node/resources/onboarded")
    def resources_onboarded(self, request: Request) -> dict[str, Any]:
        pools = self._ledger().pools()
        return {**pools.onboarded.human(), "price": pools.price}

    @behaviour("/dms/node/resources/free")
    def resources_free(self, request: Request) -> dict[str, Any]:
        return self._ledger().pools().free.human()

    @behaviour("/dms/node/resources/allocated")
    def resources_allocated(self, request: Request) -> dict[str, Any]:
        ledger = self._ledger()
        pools = ledger.pools()
        return {
            "allocated": pools.allocated.human(),
            "locked": pools.locked.human(),
            "leases": [lease.as_dict() for lease in ledger.live()],
        }

    @behaviour("/dms/node/resources/pools")
    def resources_pools(self, request: Request) -> dict[str, Any]:
        return self._ledger().pools().as_dict()

    @behaviour("/dms/node/resources/lock", payload=LockPayload)
    def resources_lock(self, request: Request) -> dict[str, Any]:
        """Hold resources by hand (the bidder does this for bids)."""
        p: LockPayload = request.payload
        lease = self._ledger().lock(p.resources, p.lease_s, holder=request.sender.did, ref=p.ref)
        return lease.as_dict()

    @behaviour("/dms/node/resources/commit", payload=LeasePayload)
    def resources_commit(self, request: Request) -> dict[str, Any]:
        return self._ledger().commit(request.payload.id, request.payload.ref).as_dict()

    @behaviour("/dms/node/resources/release", payload=LeasePayload)
    def resources_release(self, request: Request) -> dict[str, Any]:
        lease = self._ledger().release(request.payload.id)
        self.released([lease.id])
        return lease.as_dict()

    # ---- hardware ------------------------------------------------------------------

    @behaviour("/dms/node/hardware/spec")
    def hardware_spec(self, request: Request) -> dict[str, Any]:
        return hardware_spec(self._home())

    @behaviour("/dms/node/hardware/usage")
    def hardware_usage(self, request: Request) -> dict[str, Any]:
        return hardware_usage(self._home())

    # ---- helpers -------------------------------------------------------------------

    def _changed(self, _result: Any) -> None:
        self.benchmark.refresh()
        self.changed()

    def _ledger(self) -> ResourceLedger:
        return need_ledger(self.ledger)

    def _onboarder(self) -> Onboarder:
        if self.onboarder is None:
            raise Refusal(ErrorCode.UNKNOWN_BEHAVIOUR, "this node keeps no onboarding state")
        return self.onboarder

    def _home(self) -> Path:
        return self.home or Path(".")
