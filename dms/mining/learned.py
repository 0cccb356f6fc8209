"""What each party learns, per algorithm, protocol and scheme.

The one place this table lives in code; ``specs/mining.md`` ("What each party
learns") holds the same rows with their reasoning, and the mining report prints
the row of the job it describes beside the others.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Learned:
    """One row: which jobs it covers, and what the worker and the data owner learn."""

    case: str
    algorithms: tuple[str, ...]
    protocol: str  # plain | udm | blind
    schemes: tuple[str, ...]
    worker: str
    owner: str

    def covers(self, algorithm: str, protocol: str, scheme: str) -> bool:
        return algorithm in self.algorithms and protocol == self.protocol and scheme in self.schemes


LEARNED: tuple[Learned, ...] = (
    Learned(
        "kmeans, knn (plaintext baselines)",
        ("kmeans", "knn"),
        "plain",
        ("plain",),
        "everything: the data, the labels, the result",
        "the result",
    ),
    Learned(
        "SKMeans, udm, Liu",
        ("skmeans",),
        "udm",
        ("liu",),
        "U = D - C in the clear: the data up to a translation per centroid; the labels, "
        "every shift S, the cluster sizes, and Liu ciphertexts of D. Liu is not IND-CPA: "
        "about m known plaintext/ciphertext pairs reveal the key. Treat the data as exposed.",
        "labels, centroids (its own data's)",
    ),
    Learned(
        "SKMeans, udm, CKKS",
        ("skmeans",),
        "udm",
        ("ckks",),
        "U in the clear (the data up to a translation per centroid), labels, S, cluster "
        "sizes; CKKS ciphertexts of D (IND-CPA under RLWE) and the public context",
        "labels, centroids; per-record weighted values of its own data",
    ),
    Learned(
        "SKMeans, blind, CKKS (default)",
        ("skmeans",),
        "blind",
        ("ckks",),
        "CKKS ciphertexts only (columns, centroids), the public context (no Galois keys), "
        "and sizes: k, a, the number of chunks of N/2 records, the distance name and the "
        "announced number of rounds (not when k-means converged). No centroids, distances, "
        "labels, counts or shifts, and nothing that depends on what it returned.",
        "its own data's distances to the centroids, labels, centroids",
    ),
    Learned(
        "DBSKMeans, udm, Liu/CKKS",
        ("dbskmeans",),
        "udm",
        ("liu", "ckks"),
        "OPE(U) under a fresh key, one image of each U (every dummy round resends the "
        "last): the order of |U| entries and their signs, and |U| within each OPE interval "
        "up to an affine map; when k-means converged; the labels, cluster sizes and the "
        "ciphertexts of D; max_iterations rounds whatever it returned",
        "labels, centroids",
    ),
    Learned(
        "SKNN, udm, Liu",
        ("sknn",),
        "udm",
        ("liu",),
        "the training labels (plaintext), Liu ciphertexts of training and query rows, the "
        "neighbour indices, the predictions",
        "distances, neighbours",
    ),
    Learned(
        "SKNN, udm, CKKS",
        ("sknn",),
        "udm",
        ("ckks",),
        "training labels, CKKS ciphertexts, neighbour indices, predictions",
        "per-attribute differences to its own rows",
    ),
    Learned(
        "SKNN, blind, CKKS (default)",
        ("sknn",),
        "blind",
        ("ckks",),
        "CKKS ciphertexts of the training columns and of the queries, the public context, "
        "and sizes: a, chunks, the block size and the number of blocks. No labels, no "
        "indices, no predictions.",
        "distances from its queries to its training rows, neighbours, predictions",
    ),
)

# Placed on other nodes, the provider's node and its operator see this too.
PROVIDER_NODE = (
    "the job's params (algorithm, scheme, protocol, level, k, n, a, number of queries, "
    "distance), the requester's peer id and its session actor's key, when each operation "
    "arrives and how large it is, and the chunk store's contents while the allocation "
    "lives (ciphertexts and public contexts named by their sha256)"
)


def learned_for(algorithm: str, protocol: str | None, scheme: str) -> Learned | None:
    """The row for one job (``protocol`` None or ``plain`` for the baselines)."""
    protocol = protocol or "plain"
    for row in LEARNED:
        if row.covers(algorithm, protocol, scheme):
            return row
    return None


def worker_learns(algorithm: str, protocol: str | None, scheme: str) -> str:
    """One line for the CLI and the session log: what the worker of this job will learn."""
    row = learned_for(algorithm, protocol, "plain" if algorithm in ("kmeans", "knn") else scheme)
    if row is None:
        return f"{algorithm} ({scheme}, {protocol}): no entry in the table of what a worker learns"
    leaky = "" if row.protocol == "blind" else " (a leaky protocol, run because it was named)"
    return f"the worker learns{leaky}: {row.worker.rstrip('.')}"
