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

from typing import TYPE_CHECKING

from dms.mining.lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _WHERE, __all__)
