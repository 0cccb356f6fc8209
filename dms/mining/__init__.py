"""Privacy-preserving data mining: schemes, algorithms, owner and worker sides.

Depends on nothing else in ``dms``. Each algorithm has a data-owner side
(keys, encryption, decryption) and a worker side (computes on ciphertexts,
never holds a secret key) that talk through pydantic messages with ``bytes``
payloads. ``dms.mining.local`` runs both sides in one process.
"""

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
