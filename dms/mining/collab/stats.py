"""The owner's statistics in the clear on its own rows, and what everyone computes from totals."""

from __future__ import annotations

import numpy as np

from dms.mining.distance import Distance
from dms.mining.plain import assign


def kmeans_statistics(rows: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of ``rows`` for ``centroids``, and the vector: k x a cluster sums, then k counts."""
    k = centroids.shape[0]
    labels = assign(rows[:, None, :] - centroids[None, :, :], Distance.EUCLIDEAN)
    sums = np.zeros_like(centroids)
    np.add.at(sums, labels, rows)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return labels, np.concatenate([sums.ravel(), counts])


def moments_statistics(rows: np.ndarray) -> np.ndarray:
    """Round 0 of init moments: row count, per-attribute sums and sums of squares."""
    return np.concatenate([[float(rows.shape[0])], rows.sum(axis=0), (rows**2).sum(axis=0)])


def next_centroids(values: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Mean of each cluster from the totals; a cluster with no rows (count below one half,
    which only noise can make fractional) keeps its previous centroid, as plain k-means."""
    k, a = previous.shape
    sums = values[: k * a].reshape(k, a)
    counts = values[k * a :]
    out = previous.copy()
    filled = counts >= 0.5
    out[filled] = sums[filled] / counts[filled, None]
    return out


def drawn_centroids(values: np.ndarray, k: int, a: int, seed: int) -> np.ndarray:
    """Init moments: k points drawn (seeded) from a normal with the union's mean and spread."""
    n = max(values[0], 1.0)
    mean = values[1 : 1 + a] / n
    spread = np.sqrt(np.maximum(values[1 + a : 1 + 2 * a] / n - mean**2, 0.0))
    return mean + spread * np.random.default_rng(seed).standard_normal((k, a))
