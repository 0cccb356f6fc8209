"""Privacy-preserving data mining: schemes, algorithms, owner and worker sides.

Depends on nothing else in ``dms``. Each algorithm has a data-owner side
(keys, encryption, decryption) and a worker side (computes on ciphertexts,
never holds a secret key) that talk through pydantic messages with ``bytes``
payloads. ``dms.mining.local`` runs both sides in one process.

The names below load on first use (PEP 562): importing ``dms.mining`` or a light
module of it (``errors``, ``learned``, ``defaults``) loads neither NumPy nor TenSEAL,
so a command line that only shows its help does not pay for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dms.mining.distance import Distance
    from dms.mining.errors import MiningError, WorkerMisbehaved
    from dms.mining.local import MiningResult, run_classification, run_clustering
    from dms.mining.plain import ClusteringParams

__all__ = [
    "ClusteringParams",
    "Distance",
    "MiningError",
    "MiningResult",
    "WorkerMisbehaved",
    "run_classification",
    "run_clustering",
]

# Each public name: the module that defines it.
_WHERE = {
    "ClusteringParams": "dms.mining.plain",
    "Distance": "dms.mining.distance",
    "MiningError": "dms.mining.errors",
    "MiningResult": "dms.mining.local",
    "WorkerMisbehaved": "dms.mining.errors",
    "run_classification": "dms.mining.local",
    "run_clustering": "dms.mining.local",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:  # a submodule not yet imported, or a mistake: the import system decides
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
