"""Agreement measures: adjusted Rand index (clusterings) and accuracy (labels)."""

from __future__ import annotations

from collections.abc import Sequence

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
