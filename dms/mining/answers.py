"""The owner's checks on a worker's answer, before and after it decrypts (DESIGN decision 13).

A worker is an active adversary: it may return ciphertexts of another size, level or
scale, replay an old answer, or compute something other than what was asked. The owner

- opens every ciphertext without decrypting it and compares its byte size (at most), slot count,
  ring degree, level (primes left), polynomial count and scale with those of an answer
  it computed itself the worker's way (``AnswerShape``); any difference is
  ``WorkerMisbehaved`` and nothing of that answer is decrypted;
- recomputes in the clear, from its own data, the distances of a random sample of
  records each round (``Spot``): a value off by more than the noise is caught.

The sample is drawn from the operating system's randomness, after the answer arrived,
so the worker cannot know which records are checked. A worker that alters the answer
for ``d`` of a shard's ``n`` records escapes one round's check with probability
C(n - d, m) / C(n, m) <= (1 - m / n)^d for a sample of ``m``: ``detection_per_round``
reports m / n, the chance for one altered record.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from dms.mining.defaults import DEFAULT_VERIFY_FRACTION
from dms.mining.distance import Distance
from dms.mining.errors import MiningError, WorkerMisbehaved
from dms.mining.schemes.ckks import CkksKeys

# A serialized ciphertext is compressed: an honest one may be a little smaller than the
# one the owner measured, never larger than this. Its content is checked after parsing.
SIZE_SLACK = 1.01


@dataclass(frozen=True)
class AnswerShape:
    """What every ciphertext of an honest answer looks like, measured on the owner's keys."""

    nbytes: int
    slots: int
    degree: int
    level: int  # primes left in the ciphertext's modulus
    polys: int  # 2 once relinearised
    scale: float


def answer_shape(keys: CkksKeys, distance: Distance) -> AnswerShape:
    """The worker's operation, run once by the owner on random values: Euclidean, a
    squared difference (one multiplication, relinearised and rescaled); Manhattan, a
    difference brought down a level (x 1.0)."""
    rng = np.random.default_rng()
    x, c = keys.encrypt(rng.uniform(-1, 1, keys.slots)), keys.encrypt(np.full(keys.slots, 0.5))
    out = (x - c).square() if distance is Distance.EUCLIDEAN else (x - c) * 1.0
    raw = out.serialize()
    inner = out.data.ciphertext()[0]
    return AnswerShape(
        nbytes=len(raw),
        slots=keys.slots,
        degree=inner.poly_modulus_degree(),
        level=inner.coeff_modulus_size(),
        polys=inner.size(),
        scale=float(inner.scale),
    )


def open_answer(
    keys: CkksKeys, raw: object, shape: AnswerShape, shard: int, what: str
) -> ts.CKKSVector:
    """One ciphertext of a worker's answer, checked against ``shape``; never decrypted here."""

    def bad(reason: str) -> WorkerMisbehaved:
        return WorkerMisbehaved(f"shard {shard}: {what}: {reason}", shard)

    if not isinstance(raw, bytes):
        raise bad("not bytes")
    if len(raw) > shape.nbytes * SIZE_SLACK:
        raise bad(f"a ciphertext of {len(raw)} bytes, at most {shape.nbytes} expected")
    try:
        vector = ts.ckks_vector_from(keys.context, raw)
        parts = vector.data.ciphertext()
    except Exception as exc:
        raise bad(f"not a CKKS ciphertext of this context ({type(exc).__name__})") from None
    if len(parts) != 1 or vector.size() != shape.slots:
        raise bad(f"{len(parts)} ciphertexts of {vector.size()} slots, expected 1 of {shape.slots}")
    inner = parts[0]
    got = (inner.poly_modulus_degree(), inner.coeff_modulus_size(), inner.size())
    if got != (shape.degree, shape.level, shape.polys):
        raise bad(
            f"degree {got[0]}, {got[1]} primes, {got[2]} polynomials; expected "
            f"{shape.degree}, {shape.level}, {shape.polys}"
        )
    if float(inner.scale) != shape.scale or not inner.is_ntt_form():
        got_scale = math.log2(max(float(inner.scale), 1e-300))
        raise bad(f"scale 2^{got_scale:.2f}, expected 2^{math.log2(shape.scale):.2f}")
    return vector


def open_grid(
    keys: CkksKeys,
    rows: object,
    outer: int,
    inner: int,
    shape: AnswerShape,
    shard: int,
    what: str,
) -> list[list[ts.CKKSVector]]:
    """An ``outer`` x ``inner`` grid of answer ciphertexts, every one checked."""
    if (
        not isinstance(rows, list)
        or len(rows) != outer
        or any(not isinstance(r, list) or len(r) != inner for r in rows)
    ):
        raise WorkerMisbehaved(
            f"shard {shard}: {what} must be {outer} x {inner} ciphertexts", shard
        )
    return [[open_answer(keys, raw, shape, shard, what) for raw in row] for row in rows]


class Spot:
    """The owner's random spot checks: which records to recompute, and the odds."""

    def __init__(self, fraction: float = DEFAULT_VERIFY_FRACTION) -> None:
        if not 0 < fraction <= 1:
            raise MiningError(f"the verified fraction must be in (0, 1], not {fraction}")
        self.fraction = fraction
        self._rng = np.random.default_rng(secrets.randbits(128))
        self.checked = 0  # records recomputed so far

    def size(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.fraction * n)))

    def sample(self, n: int) -> np.ndarray:
        picked = np.sort(self._rng.choice(n, size=self.size(n), replace=False))
        self.checked += len(picked)
        return picked

    def detection_per_round(self, sizes: Sequence[int]) -> float:
        """The chance that one altered record in one round is among those checked (the
        smallest over the shards)."""
        return min(self.size(n) / n for n in sizes) if sizes else 1.0


def check_values(
    got: np.ndarray, want: np.ndarray, tol: float, shard: int, what: str, rows: np.ndarray
) -> None:
    """Decrypted values against the owner's own in the clear: off by more than ``tol``
    is a worker that computed something else."""
    off = np.abs(got - want)
    if off.size and float(off.max()) > tol:
        where = np.unravel_index(int(off.argmax()), off.shape)
        raise WorkerMisbehaved(
            f"shard {shard}: {what} of record {int(rows[where[0]])} off by "
            f"{float(off[where]):.3g} (noise allows {tol:.1g}): not what its data gives",
            shard,
        )
