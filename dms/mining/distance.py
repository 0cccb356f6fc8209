"""Distances: Euclidean (compared as sums of squares) and Manhattan."""

from __future__ import annotations

from enum import StrEnum

import numpy as np

from dms.mining.errors import MiningError


class Distance(StrEnum):
    EUCLIDEAN = "euclidean"
    MANHATTAN = "manhattan"

    @classmethod
    def parse(cls, name: str | Distance) -> Distance:
        if isinstance(name, Distance):
            return name
        key = name.strip().lower()
        if key == "manhathan":  # the reference system's spelling
            key = "manhattan"
        try:
            return cls(key)
        except ValueError:
            raise MiningError(f"unknown distance {name!r}: use euclidean or manhattan") from None

    def reduce(self, differences: np.ndarray) -> np.ndarray:
        """Distance along the last axis; Euclidean is left squared (same order, no sqrt)."""
        if self is Distance.EUCLIDEAN:
            return np.einsum("...j,...j->...", differences, differences)
        return np.abs(differences).sum(axis=-1)
