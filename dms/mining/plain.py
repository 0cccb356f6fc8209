"""Plaintext baselines and the pieces the encrypted algorithms share with them.

The encrypted algorithms must give the same answers as these (same initial
centroids, same assignment rule, same convergence test, same vote), so both
use the functions here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dms.mining.defaults import DEFAULT_MAX_ITERATIONS, DEFAULT_MIN_ERROR
from dms.mining.distance import Distance
from dms.mining.errors import MiningError

RoundCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class ClusteringParams:
    """How a k-means runs, whichever protocol runs it: the settings the plaintext
    baseline, the UDM owner (SKMeans, DBSKMeans) and the blind owner share
    (``dms mine`` flags, ``MiningSettings`` in a job; ``specs/mining.md``)."""

    k: int
    distance: Distance = Distance.EUCLIDEAN
    min_error: float = DEFAULT_MIN_ERROR  # converged once the centroids move no more
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    init: str = "first"  # first | kmeans++
    seed: int | None = None  # kmeans++
    level: int = 128  # CKKS security level (the plaintext baseline encrypts nothing)
    shards: int = 1  # workers the records are split over (the baseline runs here, whole)

    def __post_init__(self) -> None:
        object.__setattr__(self, "distance", Distance.parse(self.distance))


def check_k(k: int, rows: int, what: str = "records") -> None:
    if k < 1:
        raise MiningError(f"k must be at least 1, not {k}")
    if k > rows:
        raise MiningError(f"k = {k} exceeds the {rows} {what}")


def initial_centroids(
    data: np.ndarray, k: int, init: str = "first", seed: int | None = None
) -> np.ndarray:
    """``first``: the first k records (as the reference); ``kmeans++``: seeded D^2 sampling."""
    check_k(k, data.shape[0])
    if init == "first":
        return data[:k].astype(np.float64).copy()
    if init != "kmeans++":
        raise MiningError(f"unknown init {init!r}: use first or kmeans++")
    rng = np.random.default_rng(seed)
    centers = [data[int(rng.integers(data.shape[0]))]]
    closest = ((data - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = closest.sum()
        index = (
            int(rng.integers(data.shape[0]))
            if total == 0
            else int(rng.choice(data.shape[0], p=closest / total))
        )
        centers.append(data[index])
        closest = np.minimum(closest, ((data - data[index]) ** 2).sum(axis=1))
    return np.array(centers, dtype=np.float64)


def assign(differences: np.ndarray, distance: Distance) -> np.ndarray:
    """n x k x a differences (record minus centroid) -> nearest centroid per record."""
    return np.argmin(distance.reduce(differences), axis=1)


def update_centroids(data: np.ndarray, labels: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Mean of each cluster; an empty cluster keeps its previous centroid."""
    k = previous.shape[0]
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros_like(previous)
    np.add.at(sums, labels, data)
    out = previous.copy()
    filled = counts > 0
    out[filled] = sums[filled] / counts[filled, None]
    return out


def centroid_change(old: np.ndarray, new: np.ndarray) -> float:
    """Mean over centroids of ||new - old|| / ||old|| (checked on decrypted values only)."""
    norms = np.linalg.norm(old, axis=1)
    moves = np.linalg.norm(new - old, axis=1)
    return float(np.mean(moves / np.maximum(norms, 1e-12)))


@dataclass
class ClusteringOutcome:
    labels: np.ndarray
    centroids: np.ndarray
    iterations: int
    converged: bool
    changes: list[float] = field(default_factory=list)


def kmeans(
    data: np.ndarray,
    params: ClusteringParams,
    *,
    centroids: np.ndarray | None = None,
    on_round: RoundCallback | None = None,
) -> ClusteringOutcome:
    data = np.asarray(data, dtype=np.float64)
    k, distance, min_error = params.k, params.distance, params.min_error
    max_iterations = params.max_iterations
    if max_iterations < 1:
        raise MiningError(f"max iterations must be at least 1, not {max_iterations}")
    current = (
        initial_centroids(data, k, params.init, params.seed)
        if centroids is None
        else centroids.copy()
    )
    changes: list[float] = []
    labels = np.zeros(data.shape[0], dtype=np.int64)
    converged = False
    for iteration in range(1, max_iterations + 1):
        labels = assign(data[:, None, :] - current[None, :, :], distance)
        new = update_centroids(data, labels, current)
        change = centroid_change(current, new)
        changes.append(change)
        current = new
        if on_round:
            on_round(iteration, change)
        if change <= min_error:
            converged = True
            break
    return ClusteringOutcome(labels, current, len(changes), converged, changes)


def vote(neighbour_labels: Sequence[Any]) -> Any:
    """Majority among neighbours ordered nearest first; a tie goes to the nearest tied label."""
    counts: dict[Any, int] = {}
    for label in neighbour_labels:
        counts[label] = counts.get(label, 0) + 1
    best = max(counts.values())
    for label in neighbour_labels:  # nearest first
        if counts[label] == best:
            return label
    raise MiningError("no neighbours to vote")


def nearest(distances: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest distances per row, nearest first; equal distances by index."""
    order = np.argsort(distances, axis=1, kind="stable")
    return order[:, :k]


def knn(
    train: np.ndarray,
    labels: Sequence[Any],
    test: np.ndarray,
    k: int,
    *,
    distance: Distance = Distance.EUCLIDEAN,
) -> list[Any]:
    check_k(k, train.shape[0], "training records")
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    out: list[Any] = []
    for block in _blocks(test.shape[0], train.shape[0] * train.shape[1]):
        dist = distance.reduce(test[block, None, :] - train[None, :, :])
        out.extend(vote([labels[i] for i in row]) for row in nearest(dist, k))
    return out


def boundary_ties(distances: np.ndarray, k: int, rtol: float = 1e-9) -> np.ndarray:
    """Queries whose k+1 nearest include two equal distances (equal up to float rounding:
    values such as 0.1 make distances that are equal in exact arithmetic differ by 1e-16)."""
    part = np.sort(distances, axis=1)[:, : k + 1]
    return (np.diff(part, axis=1) <= rtol * np.maximum(np.abs(part[:, 1:]), 1e-300)).any(axis=1)


def _blocks(rows: int, width: int, budget: int = 8_000_000) -> list[slice]:
    step = max(1, budget // max(width, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]
