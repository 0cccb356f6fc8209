"""Resources: what a node has, what it promised, what it runs.

Amounts in exact units, the transactional ledger of leases and allocations,
the capability benchmark, onboarding, and the node's preferences.

Names load on first use (PEP 562): ``dms.config`` needs only the preferences, and
every CLI command starts faster without the ledger's SQLAlchemy and the
benchmark's NumPy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dms.resources.amounts import ZERO, AmountError, Resources, parse_cpu, parse_size
    from dms.resources.benchmark import Capability, run_benchmark
    from dms.resources.ledger import (
        ALLOCATED,
        EXPIRED,
        LOCKED,
        RELEASED,
        LeaseView,
        Pools,
        ResourceError,
        ResourceLedger,
    )
    from dms.resources.onboarding import Onboarder, OnboardRequest, checked_amounts
    from dms.resources.preferences import Preferences

_HOMES = {
    "amounts": ("ZERO", "AmountError", "Resources", "parse_cpu", "parse_size"),
    "benchmark": ("Capability", "run_benchmark"),
    "ledger": (
        "ALLOCATED",
        "EXPIRED",
        "LOCKED",
        "RELEASED",
        "LeaseView",
        "Pools",
        "ResourceError",
        "ResourceLedger",
    ),
    "onboarding": ("Onboarder", "OnboardRequest", "checked_amounts"),
    "preferences": ("Preferences",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "ALLOCATED",
    "EXPIRED",
    "LOCKED",
    "RELEASED",
    "ZERO",
    "AmountError",
    "Capability",
    "LeaseView",
    "OnboardRequest",
    "Onboarder",
    "Pools",
    "Preferences",
    "ResourceError",
    "ResourceLedger",
    "Resources",
    "checked_amounts",
    "parse_cpu",
    "parse_size",
    "run_benchmark",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
