"""Agreement measures: adjusted Rand index and matched agreement (clusterings), accuracy
(labels)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import permutations

import numpy as np


def _pairs(x: np.ndarray) -> float:
    return float((x * (x - 1) / 2).sum())


def adjusted_rand_index(a: Sequence[object], b: Sequence[object]) -> float:
    """1.0 for identical partitions (up to renaming), about 0 for chance."""
    if len(a) != len(b):
        raise ValueError("partitions of different lengths")
    _, ia = np.unique(np.asarray(a, dtype=object).astype(str), return_inverse=True)
    _, ib = np.unique(np.asarray(b, dtype=object).astype(str), return_inverse=True)
    table = np.zeros((ia.max(initial=0) + 1, ib.max(initial=0) + 1))
    np.add.at(table, (ia, ib), 1)
    index = _pairs(table)
    rows, cols = _pairs(table.sum(axis=1)), _pairs(table.sum(axis=0))
    total = _pairs(np.array([len(a)]))
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


def accuracy(predicted: Sequence[object], truth: Sequence[object]) -> float:
    if len(predicted) != len(truth):
        raise ValueError("different lengths")
    if not predicted:
        return 1.0
    return sum(str(p) == str(t) for p, t in zip(predicted, truth, strict=True)) / len(predicted)


def matched_labels(reference: Sequence[object], labels: Sequence[object]) -> list[object]:
    """``labels`` renamed to agree best with ``reference``: cluster ids are arbitrary, so
    two clusterings are compared after matching each cluster of one to one of the other
    (the one-to-one matching with the most records in common; exhaustive up to 7
    clusters, greedy beyond)."""
    if len(reference) != len(labels):
        raise ValueError("partitions of different lengths")
    ref_names = sorted({str(r) for r in reference})
    names = sorted({str(x) for x in labels})
    ref_index = {n: i for i, n in enumerate(ref_names)}
    index = {n: i for i, n in enumerate(names)}
    table = np.zeros((len(names), len(ref_names)), dtype=np.int64)
    for r, x in zip(reference, labels, strict=True):
        table[index[str(x)], ref_index[str(r)]] += 1
    mapping: dict[int, int] = {}
    if len(names) <= 7 and len(ref_names) <= 7:
        best, best_score = (), -1
        size = max(len(names), len(ref_names))
        padded = np.zeros((size, size), dtype=np.int64)
        padded[: len(names), : len(ref_names)] = table
        for perm in permutations(range(size)):
            score = int(padded[np.arange(size), perm].sum())
            if score > best_score:
                best, best_score = perm, score
        mapping = {i: j for i, j in enumerate(best) if i < len(names) and j < len(ref_names)}
    else:
        work = table.astype(float)
        while work.size and work.max() >= 0:
            i, j = np.unravel_index(int(np.argmax(work)), work.shape)
            mapping[int(i)] = int(j)
            work[i, :], work[:, j] = -1, -1
    by_name = {names[i]: ref_names[j] for i, j in mapping.items()}
    first = {str(r): r for r in reference}
    return [first[by_name[str(x)]] if str(x) in by_name else x for x in labels]


def matched_agreement(reference: Sequence[object], labels: Sequence[object]) -> float:
    """The share of records in the same cluster once clusters are matched: 1.0 for the
    same partition whatever its numbering (``matched_labels``)."""
    if not reference:
        return 1.0
    matched = matched_labels(reference, labels)
    return sum(str(r) == str(m) for r, m in zip(reference, matched, strict=True)) / len(reference)
