"""What a mining report shows, as plain data: the rows in 2-D (PCA), the baseline's
agreement, convergence, time per phase, placement, the confusion matrix and what
each party learned. The page (``dms.report.page``) draws it and embeds it as JSON."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dms.mining.learned import learned_for
from dms.mining.metrics import adjusted_rand_index, matched_agreement, matched_labels

MAX_POINTS = 3000  # drawn in the scatter plots (a seeded sample beyond that)


@dataclass
class ReportInput:
    """What the CLI knows after a job: its result, its labels and the owner's data."""

    summary: dict[str, Any]  # result.json
    labels: list[Any]  # the job's labels (clusters) or predictions (k-NN)
    points: np.ndarray  # the rows labelled: records (k-means) or queries (k-NN)
    baseline: list[Any] | None = None  # plaintext k-means / k-NN labels, computed here
    truth: list[Any] | None = None  # true labels of the test rows (k-NN), if given
    columns: list[str] = field(default_factory=list)


# ---- data -----------------------------------------------------------------------------


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The rows projected on their first two principal components (zero-padded when the
    data has one attribute), and the share of variance each explains."""
    x = np.asarray(points, dtype=float)
    if x.ndim != 2 or x.shape[0] == 0:
        return np.zeros((0, 2)), [0.0, 0.0]
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:2].T
    if projected.shape[1] < 2:
        projected = np.hstack([projected, np.zeros((projected.shape[0], 1))])
    variance = s**2
    total = float(variance.sum()) or 1.0
    shares = [float(v / total) for v in variance[:2]] + [0.0] * (2 - min(2, len(variance)))
    return projected, shares


def _sample(n: int, limit: int = MAX_POINTS) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def confusion(truth: Sequence[Any], predicted: Sequence[Any]) -> tuple[list[str], list[list[int]]]:
    """Rows: true labels; columns: predicted labels (one shared, sorted list of names)."""
    names = sorted({str(t) for t in truth} | {str(p) for p in predicted})
    at = {n: i for i, n in enumerate(names)}
    matrix = [[0] * len(names) for _ in names]
    for t, p in zip(truth, predicted, strict=True):
        matrix[at[str(t)]][at[str(p)]] += 1
    return names, matrix


def _changes(summary: dict[str, Any]) -> list[float]:
    changes = summary.get("changes")
    if changes:
        return [float(c) for c in changes]
    steps = summary.get("steps") or []
    return [float(s["change"]) for s in steps if s.get("change") is not None]


def _round_times(summary: dict[str, Any]) -> list[float]:
    if summary.get("round_s"):
        return [float(s) for s in summary["round_s"]]
    return [float(s["s"]) for s in summary.get("steps") or [] if s.get("s") is not None]


def _phases(summary: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(who, phase, seconds): the owner's timings, and the worker's compute or CPU."""
    timings = summary.get("timings") or {}
    placed = bool(summary.get("placement"))
    rows: list[tuple[str, str, float]] = []
    for key in ("keygen", "encrypt", "decrypt"):
        if timings.get(key):
            rows.append(("owner", key, float(timings[key])))
    if placed:
        if summary.get("owner_cpu_s") is not None:
            rows.append(("owner", "session CPU", float(summary["owner_cpu_s"])))
        if summary.get("worker_cpu_s") is not None:
            rows.append(("workers", "CPU (all shards)", float(summary["worker_cpu_s"])))
    elif timings.get("compute"):
        rows.append(("worker", "compute", float(timings["compute"])))
    if timings.get("total"):
        rows.append(("job", "wall clock", float(timings["total"])))
    return rows


def report_data(job: ReportInput) -> dict[str, Any]:
    """Everything the page draws, as JSON holds it."""
    s = job.summary
    data: dict[str, Any] = {
        "job": {
            k: s.get(k)
            for k in ("algorithm", "scheme", "protocol", "distance", "k", "records", "attributes")
        },
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    labels = [str(x) for x in job.labels]
    projected, shares = pca_2d(job.points)
    picked = _sample(len(labels))
    clusters: dict[str, Any] = {
        "points": [[round(float(a), 5), round(float(b), 5)] for a, b in projected[picked]],
        "variance": [round(v, 4) for v in shares],
        "labels": [labels[i] for i in picked],
        "shown": len(picked),
        "total": len(labels),
    }
    if job.baseline is not None:
        base = [str(x) for x in job.baseline]
        if s.get("algorithm") in ("kmeans", "skmeans", "dbskmeans"):
            # cluster numbers are arbitrary: match the baseline's to the job's first
            base = [str(x) for x in matched_labels(labels, base)]
            clusters["adjusted_rand_index"] = round(adjusted_rand_index(labels, base), 4)
            clusters["matched_agreement"] = round(matched_agreement(labels, base), 4)
        else:
            same = sum(a == b for a, b in zip(labels, base, strict=True))
            clusters["agreement_with_plain"] = round(same / max(len(labels), 1), 4)
        clusters["baseline"] = [base[i] for i in picked]
    if job.truth is not None:
        clusters["truth"] = [str(job.truth[i]) for i in picked]
    data["clusters"] = clusters
    data["convergence"] = {
        "changes": _changes(s),
        "round_s": _round_times(s),
        "iterations": s.get("iterations"),
        "converged": s.get("converged"),
    }
    data["timings"] = [{"who": w, "phase": p, "s": round(v, 4)} for w, p, v in _phases(s)]
    data["placement"] = [
        {k: p.get(k) for k in ("shard", "peer_id", "rows", "mb_sent", "mb_received", "placements")}
        for p in s.get("placement") or []
    ]
    data["bytes"] = {"to_worker": s.get("bytes_to_worker"), "to_owner": s.get("bytes_to_owner")}
    if job.truth is not None and s.get("algorithm") in ("knn", "sknn"):
        names, matrix = confusion(job.truth, labels)
        data["confusion"] = {"labels": names, "matrix": matrix}
    row = learned_for(str(s.get("algorithm")), s.get("protocol"), str(s.get("scheme")))
    data["learned"] = {"case": row.case if row else None}
    return data
