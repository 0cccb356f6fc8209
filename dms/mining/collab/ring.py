"""Fixed-point numbers in the ring of integers mod 2^64, where masks cancel exactly.

A float ``x`` is carried as ``round(x * 2^scale_bits)`` in two's complement on
64 bits; ``numpy.uint64`` addition and subtraction wrap mod 2^64, so a sum of
masked vectors minus the masks is the sum of the encodings, bit for bit. The
total of all owners must stay inside the signed range, so each owner refuses
values of magnitude ``limit(scale_bits, owners)`` or more before it encodes.
"""

from __future__ import annotations

import numpy as np

from dms.mining.errors import MiningError


def limit(scale_bits: int, owners: int) -> float:
    """Largest magnitude one owner may encode so that the total of ``owners`` cannot wrap."""
    return 2.0 ** (63 - scale_bits) / owners


def encode(values: np.ndarray, scale_bits: int, owners: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise MiningError("a statistic to aggregate is not a finite number")
    bound = limit(scale_bits, owners)
    largest = float(np.max(np.abs(values))) if values.size else 0.0
    if largest >= bound:
        raise MiningError(
            f"a statistic of magnitude {largest:.3g} does not fit the ring for {owners} owners "
            f"at scale_bits {scale_bits} (limit {bound:.3g}): propose a smaller scale_bits"
        )
    return np.rint(values * 2.0**scale_bits).astype(np.int64).view(np.uint64)


def decode(ring: np.ndarray, scale_bits: int) -> np.ndarray:
    return np.asarray(ring, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**scale_bits


def to_bytes(ring: np.ndarray) -> bytes:
    return np.asarray(ring, dtype="<u8").tobytes()


def from_bytes(raw: bytes, length: int) -> np.ndarray:
    """Exactly ``length`` little-endian 64-bit words, else a :class:`MiningError`."""
    if len(raw) != 8 * length:
        raise MiningError(f"{len(raw)} bytes where {length} ring elements ({8 * length} bytes) go")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)
