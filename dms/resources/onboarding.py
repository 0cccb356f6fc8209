"""Onboarding: check the amounts against the machine, benchmark, record.

Used by the node actor (``/dms/node/onboarding/*``) and by ``dms onboard`` when
no daemon runs, so both paths apply the same rules: amounts are positive,
their units make sense, and they fit in this machine; changing them later is
allowed as long as what is locked or allocated still fits (the ledger checks
that inside its transaction).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dms.resources.amounts import KINDS, AmountError, Resources, parse_cpu, parse_size, show
from dms.resources.benchmark import STEP_S, Capability, Progress, run_benchmark
from dms.resources.ledger import Pools, ResourceError, ResourceLedger
from dms.resources.machine import machine_total
from dms.store import Database

CAPABILITY_KEY = "registered_capability"


class OnboardRequest(BaseModel):
    """What ``dms onboard`` sends: amounts as people write them."""

    model_config = ConfigDict(extra="forbid")

    cpu: str | float
    ram: str | float
    disk: str | float
    gpu: int = Field(default=0)
    price: float = Field(default=0.0)
    capability: Capability | None = None  # measured by the caller; else measured here
    benchmark: bool = False  # measure again even if a capability is registered


def checked_amounts(request: OnboardRequest, home: Path) -> Resources:
    """The requested amounts in ledger units, or ``AmountError`` with a one-line reason."""
    amounts = {
        "cpu": parse_cpu(request.cpu),
        "ram": parse_size(request.ram, "ram"),
        "disk": parse_size(request.disk, "disk"),
    }
    for kind, value in amounts.items():
        if value <= 0:
            raise AmountError(f"{kind}: must be more than zero, got {getattr(request, kind)!r}")
    if request.gpu < 0:
        raise AmountError(f"gpu: must not be negative, got {request.gpu}")
    if request.price < 0 or request.price != request.price:
        raise AmountError(f"price: must not be negative, got {request.price}")
    wanted = Resources(
        cpu_milli=amounts["cpu"], ram_mib=amounts["ram"], disk_mib=amounts["disk"], gpu=request.gpu
    )
    machine = machine_total(home)
    too_much = [
        f"{kind}: {show(kind, want)} asked, this machine has {show(kind, have)}"
        for kind, want, have in zip(KINDS[:3], wanted.as_tuple(), machine.as_tuple(), strict=False)
        if want > have
    ]
    if too_much:
        raise AmountError("more than this machine has: " + "; ".join(too_much))
    return wanted


class Onboarder:
    """One node's onboarding state: amounts in the ledger, capability in the store.
    ``step_s``: the benchmark's time per measurement (the ``benchmark_step_s`` setting)."""

    def __init__(
        self,
        db: Database,
        home: Path,
        ledger: ResourceLedger | None = None,
        step_s: float = STEP_S,
    ) -> None:
        self.db = db
        self.home = Path(home)
        self.ledger = ledger or ResourceLedger(db)
        self.step_s = step_s

    def capability(self) -> Capability | None:
        raw = self.db.get_setting(CAPABILITY_KEY)
        if raw is None:
            return None
        try:
            return Capability.model_validate(raw)
        except ValidationError:
            return None  # from an older benchmark version: measure again

    def register(self, capability: Capability) -> None:
        self.db.put_setting(CAPABILITY_KEY, capability.model_dump(mode="json"))
        self.db.record("capability.registered", seconds=capability.seconds)

    def benchmark(self, progress: Progress | None = None) -> Capability:
        capability = run_benchmark(self.home, progress, self.step_s)
        self.register(capability)
        return capability

    def needs_benchmark(self, request: OnboardRequest) -> bool:
        return request.capability is None and (request.benchmark or self.capability() is None)

    def onboard(self, request: OnboardRequest, progress: Progress | None = None) -> dict[str, Any]:
        amounts = checked_amounts(request, self.home)
        if request.capability is not None:
            self.register(request.capability)
        elif self.needs_benchmark(request):
            self.benchmark(progress)
        pools = self.ledger.onboard(amounts, price=request.price)
        return self.status(pools)

    def offboard(self, force: bool = False) -> dict[str, Any]:
        if not self.ledger.pools().is_onboarded:
            raise ResourceError("not_onboarded", "this node is not onboarded")
        released = self.ledger.offboard(force)
        return {"offboarded": True, "released": [lease.as_dict() for lease in released]}

    def status(self, pools: Pools | None = None) -> dict[str, Any]:
        pools = pools or self.ledger.pools()
        capability = self.capability()
        return {
            "onboarded": pools.is_onboarded,
            **pools.as_dict(),
            "capability": capability.model_dump(mode="json") if capability else None,
        }
