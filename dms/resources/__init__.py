"""Resources: what a node has, what it promised, what it runs.

Amounts in exact units, the transactional ledger of leases and allocations,
the capability benchmark, onboarding, and the node's preferences.
"""

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
