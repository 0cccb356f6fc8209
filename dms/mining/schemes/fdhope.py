"""FDH-OPE: a keyed, order-preserving encryption of |v| (the sign is kept).

The key splits the message range [0, max|U| + 2] into 3..8 random intervals
(empty ones dropped) and the cipher range [0, 5 * (max|U| + 2)] into intervals
whose lengths follow how many values fall in each message interval. Within an
interval the map is linear plus a small random delta, so order holds up to
``sens``. It is not additively homomorphic across intervals: sums of
ciphertexts only approximate ciphertexts of sums.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

DEFAULT_SENS = 1e-8


@dataclass(frozen=True)
class OpeKey:
    message_edges: np.ndarray  # interval bounds, ascending, from 0
    cipher_edges: np.ndarray
    sens: float

    @classmethod
    def generate(cls, values: np.ndarray, sens: float = DEFAULT_SENS) -> OpeKey:
        rng = np.random.default_rng(secrets.randbits(128))
        magnitudes = np.abs(np.asarray(values, dtype=np.float64)).ravel()
        top = float(magnitudes.max(initial=0.0)) + 2.0
        count = int(rng.integers(3, 9))
        inner = np.sort(rng.uniform(0.0, top, size=count - 1))
        edges = np.concatenate([[0.0], inner, [top]])
        hits = np.histogram(magnitudes, bins=edges)[0]
        # Drop empty intervals by merging each into its right neighbour (the last into
        # its left), so the edges still cover the whole message range.
        keep = [0] + [i + 1 for i in range(len(hits)) if hits[i] > 0]
        if keep[-1] != len(edges) - 1:
            keep[-1] = len(edges) - 1
        edges = edges[sorted(set(keep))]
        hits = np.histogram(magnitudes, bins=edges)[0].astype(np.float64)
        hits = np.maximum(hits, 1.0)  # every interval keeps a positive cipher length
        cipher_top = 5.0 * top
        cipher_edges = np.concatenate([[0.0], np.cumsum(hits / hits.sum() * cipher_top)])
        return cls(message_edges=edges, cipher_edges=cipher_edges, sens=sens)

    def _scales(self) -> np.ndarray:
        return np.diff(self.cipher_edges) / np.diff(self.message_edges)

    def encrypt(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        magnitude = np.abs(v)
        last = len(self.message_edges) - 2
        index = np.clip(np.searchsorted(self.message_edges, magnitude, side="right") - 1, 0, last)
        scales = self._scales()[index]
        rng = np.random.default_rng(secrets.randbits(128))
        delta = rng.uniform(0.0, 1.0, size=v.shape) * self.sens * scales
        cipher = self.cipher_edges[index] + scales * (magnitude - self.message_edges[index]) + delta
        return np.sign(v) * cipher
