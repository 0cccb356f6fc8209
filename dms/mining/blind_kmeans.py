"""Blind k-means (CKKS): the worker sees CKKS ciphertexts and public parameters, nothing else.

Client-aided; each k-means iteration is two request/response steps::

    owner  --BlindClusterStart-->  worker  public context, Enc(D) packed by column
                                           (a x chunks), Enc(C) replicated (k x a)
    worker --BlindClusterRound-->  owner   step "distances": Enc(dist(D, C_y)) (k x chunks)
    owner  --BlindClusterUpdate--> worker  step "masks": Enc(one-hot mask) ((k-1) x chunks)
    worker --BlindClusterRound-->  owner   step "sums": Enc(sum_c M_y,c * D_j,c) (k x a)
    owner  --BlindClusterUpdate--> worker  step "centroids": Enc(C_new) (k x a), or done
    ... the worker alternates distances and sums until the owner says done.

Every ciphertext is zero-padded to the full N/2 slots, so the worker learns n only up
to a chunk (N/2 records). Its operations and message sizes are the same in every round
and for every data set of the same shape (k, a, chunks): it never branches on data.

- Distances (Euclidean): per chunk and cluster, sum_j (X_j - C_yj)^2: a subtractions,
  a squarings, a - 1 additions; one ciphertext per (cluster, chunk). Manhattan: |.| is
  not a polynomial, so the worker sends the differences X_j - C_yj themselves (a times
  the bytes) and the owner takes absolute values after decrypting.
- The owner decrypts, assigns every record (argmin; distances within the tie tolerance
  of the minimum count as equal and go to the lowest cluster index, as ``np.argmin``
  does with exact ties), and counts the near-ties, which CKKS noise could order either
  way. It sends k - 1 one-hot masks per chunk; the worker derives the last one as
  1 - sum of the others (no multiplication).
- Sums: per cluster and attribute, sum over chunks of M_y,c * X_j,c, un-folded. The
  owner decrypts the k x a ciphertexts and sums their slots; it takes the counts from
  its own assignment, so no count ever travels. Folding slots at the worker would need
  Galois keys (the public context grows from ~1 MB to ~35 MB) and 12 rotations per
  ciphertext; measured in ``bench/mining.py`` (case ``blind_fold``), see specs/mining.md.

Depth: one ciphertext-ciphertext multiplication per value (square, or mask x column).
Keys made here use the chain [60, 40, 60] (one level): fresh ciphertexts hold two
primes, results one, so results are ~131 KB, fresh ones ~235 KB at N = 8192.
Any CKKS context with at least one level works (the ``--keys`` folder's, for example).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import tenseal as ts
from pydantic import BaseModel

from dms.mining.distance import Distance
from dms.mining.errors import MiningError
from dms.mining.plain import (
    DEFAULT_MAX_ITERATIONS,
    DEFAULT_MIN_ERROR,
    ClusteringOutcome,
    centroid_change,
    initial_centroids,
)
from dms.mining.schemes.ckks import LEVELS, CkksKeys, load_public_context

BLIND_CHAIN = [60, 40, 60]  # one multiplicative level: all the blind protocols need
BLIND_LOG_SCALE = 40
# Decrypted distances (data scaled into [-1, 1]) err by up to ~1e-6 * sqrt(a) (measured:
# 7.7e-7 at a = 2, 1.8e-6 at a = 8, 9.3e-6 at a = 64, max over 4096 slots). Gaps below
# this tolerance are near-ties: the owner treats them as ties and counts them.
TIE_TOLERANCE = 1e-5


def blind_keys(level: int = 128) -> CkksKeys:
    """A CKKS context with exactly the depth the blind protocols use (one level)."""
    if level not in LEVELS:
        raise MiningError(f"CKKS security level must be one of {sorted(LEVELS)}, not {level}")
    context = ts.context(ts.SCHEME_TYPE.CKKS, LEVELS[level][0], coeff_mod_bit_sizes=BLIND_CHAIN)
    context.global_scale = 2**BLIND_LOG_SCALE
    context.generate_relin_keys()
    return CkksKeys(context=context, level=level)


def check_keys(keys: object) -> CkksKeys | None:
    if keys is not None and not isinstance(keys, CkksKeys):
        raise MiningError(
            "the blind protocol runs on CKKS only: Liu ciphertexts cannot be multiplied "
            "by each other, so distances and masked sums are out of reach (use --protocol udm)"
        )
    return keys


def tolerance(attributes: int) -> float:
    return TIE_TOLERANCE * float(np.sqrt(max(attributes, 1)))


def encrypt_padded(keys: CkksKeys, values: np.ndarray) -> bytes:
    """One ciphertext over all N/2 slots (zero-padded): its size says nothing about n."""
    padded = np.zeros(keys.slots)
    padded[: len(values)] = values
    return keys.encrypt(padded).serialize()


def pack_columns(keys: CkksKeys, matrix: np.ndarray) -> list[list[bytes]]:
    """n x a -> a x chunks ciphertexts, chunk c holding rows c*N/2 .. (c+1)*N/2 - 1."""
    n, slots = matrix.shape[0], keys.slots
    return [
        [encrypt_padded(keys, matrix[i : i + slots, j]) for i in range(0, n, slots)]
        for j in range(matrix.shape[1])
    ]


def replicate(keys: CkksKeys, values: np.ndarray) -> list[bytes]:
    """One ciphertext per value, the value in every slot."""
    return [keys.encrypt(np.full(keys.slots, float(v))).serialize() for v in values]


def decrypt_rows(keys: CkksKeys, ciphertexts: Sequence[bytes], n: int) -> np.ndarray:
    """Chunks of one packed column -> the first n slots, concatenated."""
    return np.concatenate([keys.decrypt(c) for c in ciphertexts])[:n]


def assign_with_ties(distances: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """argmin per row, distances within ``tol`` of the minimum counting as equal (lowest
    index wins, as np.argmin with exact ties); also which rows had such a near-tie."""
    low = distances.min(axis=1, keepdims=True)
    close = distances <= low + tol
    return close.argmax(axis=1), close.sum(axis=1) > 1


def load_vectors(context: ts.Context, raw: Sequence[bytes], slots: int) -> list[ts.CKKSVector]:
    vectors = [ts.ckks_vector_from(context, r) for r in raw]
    if any(v.size() != slots for v in vectors):
        raise MiningError(f"every ciphertext must fill the {slots} slots")
    return vectors


def _shape(rows: Sequence[Sequence[bytes]], outer: int, inner: int, what: str) -> None:
    if len(rows) != outer or any(len(row) != inner for row in rows):
        raise MiningError(f"{what} must be {outer} x {inner} ciphertexts")


class BlindClusterStart(BaseModel):
    protocol: Literal["blind"] = "blind"
    distance: Distance
    k: int
    attributes: int
    chunks: int
    slots: int
    context: bytes  # public CKKS context: no secret key, no Galois keys
    columns: list[list[bytes]]  # a x chunks: Enc(D[:, j]) packed, zero-padded
    centroids: list[list[bytes]]  # k x a: Enc(C[y][j]) in every slot


class BlindClusterRound(BaseModel):
    iteration: int
    step: Literal["distances", "sums"]
    # distances, Euclidean: k x chunks, Enc(sum_j (X_j - C_yj)^2);
    # distances, Manhattan: (k * a) x chunks, Enc(X_j - C_yj), row y * a + j;
    # sums: k x a, Enc(sum_c M_y,c * X_j,c), slots not yet summed.
    ciphertexts: list[list[bytes]]


class BlindClusterUpdate(BaseModel):
    done: bool
    step: Literal["masks", "centroids", "done"]
    masks: list[list[bytes]] = []  # (k - 1) x chunks: Enc(1 where the record is in y)
    centroids: list[list[bytes]] = []  # k x a: Enc(C_new[y][j]) in every slot


class BlindClusterOwner:
    """Holds the data, the keys and every plaintext; the worker only multiplies ciphertexts."""

    def __init__(
        self,
        data: np.ndarray,
        k: int,
        *,
        distance: Distance = Distance.EUCLIDEAN,
        min_error: float = DEFAULT_MIN_ERROR,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        init: str = "first",
        seed: int | None = None,
        level: int = 128,
        keys: CkksKeys | None = None,
        tie_tolerance: float | None = None,
    ) -> None:
        if max_iterations < 1:
            raise MiningError(f"max iterations must be at least 1, not {max_iterations}")
        data = np.asarray(data, dtype=np.float64)
        if data.ndim != 2 or data.shape[0] == 0:
            raise MiningError("blind k-means needs a non-empty n x a table")
        self.distance, self.k, self.level = Distance.parse(distance), k, level
        self.min_error, self.max_iterations = min_error, max_iterations
        self.keys = check_keys(keys)
        # CKKS noise is absolute: centre and scale into [-1, 1] for the most precision.
        # Labels do not change; the convergence test is run in the data's own units.
        self.offset = data.mean(axis=0)
        peak = float(np.abs(data - self.offset).max(initial=0.0))
        self.scale = peak if peak > 0 else 1.0
        self.data = (data - self.offset) / self.scale
        self.n, self.a = self.data.shape
        self.centroids = initial_centroids(self.data, k, init, seed)
        self.tol = tolerance(self.a) if tie_tolerance is None else tie_tolerance
        self.labels = np.zeros(self.n, dtype=np.int64)
        self.changes: list[float] = []
        self.near_ties: list[int] = []  # per iteration: records whose nearest two were within tol
        self.converged = False
        self.iteration = 0
        self.expect: Literal["distances", "sums", "nothing"] = "distances"
        self.timings = {"keygen": 0.0, "encrypt": 0.0, "decrypt": 0.0}

    @property
    def chunks(self) -> int:
        assert self.keys is not None
        return -(-self.n // self.keys.slots)

    def start(self) -> BlindClusterStart:
        began = time.perf_counter()
        if self.keys is None:
            self.keys = blind_keys(self.level)
        self.timings["keygen"] += time.perf_counter() - began
        began = time.perf_counter()
        message = BlindClusterStart(
            distance=self.distance,
            k=self.k,
            attributes=self.a,
            chunks=self.chunks,
            slots=self.keys.slots,
            context=self.keys.public_context_bytes(),
            columns=pack_columns(self.keys, self.data),
            centroids=self._encrypted_centroids(),
        )
        self.timings["encrypt"] += time.perf_counter() - began
        return message

    def _encrypted_centroids(self) -> list[list[bytes]]:
        assert self.keys is not None
        return [replicate(self.keys, row) for row in self.centroids]

    def receive(self, message: BlindClusterRound) -> BlindClusterUpdate:
        if message.step != self.expect:
            raise MiningError(f"expected the worker's {self.expect}, got {message.step}")
        if message.step == "distances":
            return self._assign(message)
        return self._update(message)

    def _assign(self, message: BlindClusterRound) -> BlindClusterUpdate:
        assert self.keys is not None
        keys, n, k, a = self.keys, self.n, self.k, self.a
        euclidean = self.distance is Distance.EUCLIDEAN
        _shape(message.ciphertexts, k if euclidean else k * a, self.chunks, "distances")
        began = time.perf_counter()
        rows = [decrypt_rows(keys, chunks, n) for chunks in message.ciphertexts]
        if euclidean:
            dist = np.stack(rows, axis=1)
        else:
            dist = np.abs(np.stack(rows, axis=1).reshape(n, k, a)).sum(axis=2)
        self.timings["decrypt"] += time.perf_counter() - began
        self.iteration += 1
        self.labels, tied = assign_with_ties(dist, self.tol)
        self.near_ties.append(int(tied.sum()))
        began = time.perf_counter()
        slots = keys.slots
        masks = [
            [
                encrypt_padded(keys, (self.labels[i : i + slots] == y).astype(np.float64))
                for i in range(0, n, slots)
            ]
            for y in range(k - 1)
        ]
        self.timings["encrypt"] += time.perf_counter() - began
        self.expect = "sums"
        return BlindClusterUpdate(done=False, step="masks", masks=masks)

    def _update(self, message: BlindClusterRound) -> BlindClusterUpdate:
        assert self.keys is not None
        _shape(message.ciphertexts, self.k, self.a, "sums")
        began = time.perf_counter()
        sums = np.array([[self.keys.decrypt(c).sum() for c in row] for row in message.ciphertexts])
        self.timings["decrypt"] += time.perf_counter() - began
        counts = np.bincount(self.labels, minlength=self.k)  # the owner's own assignment
        new = self.centroids.copy()
        filled = counts > 0
        new[filled] = sums[filled] / counts[filled, None]
        change = centroid_change(self._units(self.centroids), self._units(new))
        self.changes.append(change)
        self.centroids = new
        self.converged = change <= self.min_error
        if self.converged or self.iteration >= self.max_iterations:
            self.expect = "nothing"
            return BlindClusterUpdate(done=True, step="done")
        began = time.perf_counter()
        centroids = self._encrypted_centroids()
        self.timings["encrypt"] += time.perf_counter() - began
        self.expect = "distances"
        return BlindClusterUpdate(done=False, step="centroids", centroids=centroids)

    def _units(self, centroids: np.ndarray) -> np.ndarray:
        return centroids * self.scale + self.offset

    def outcome(self) -> ClusteringOutcome:
        return ClusteringOutcome(
            labels=self.labels,
            centroids=self._units(self.centroids),
            iterations=len(self.changes),
            converged=self.converged,
            changes=list(self.changes),
        )


class BlindClusterWorker:
    """Multiplies and adds ciphertexts in a fixed sequence; holds no secret key."""

    def __init__(self, start: BlindClusterStart) -> None:
        self.distance, self.k, self.a, self.chunks = (
            start.distance,
            start.k,
            start.attributes,
            start.chunks,
        )
        if self.k < 1 or self.a < 1 or self.chunks < 1:
            raise MiningError("a blind job needs k, attributes and chunks of at least 1")
        _shape(start.columns, self.a, self.chunks, "columns")
        self.context = load_public_context(start.context)
        self.slots = start.slots
        self.columns = [load_vectors(self.context, column, self.slots) for column in start.columns]
        self.centroids: list[list[ts.CKKSVector]] | None = self._centroids(start.centroids)
        self.masks: list[list[ts.CKKSVector]] | None = None
        self.iteration = 0
        self.done = False
        self.compute_s = 0.0

    def _centroids(self, raw: list[list[bytes]]) -> list[list[ts.CKKSVector]]:
        _shape(raw, self.k, self.a, "centroids")
        return [load_vectors(self.context, row, self.slots) for row in raw]

    def round(self) -> BlindClusterRound:
        began = time.perf_counter()
        if self.centroids is not None:
            self.iteration += 1
            message = BlindClusterRound(
                iteration=self.iteration, step="distances", ciphertexts=self._distances()
            )
            self.centroids = None
        elif self.masks is not None:
            message = BlindClusterRound(
                iteration=self.iteration, step="sums", ciphertexts=self._sums()
            )
            self.masks = None
        else:
            raise MiningError("nothing to compute: the owner's update has not arrived")
        self.compute_s += time.perf_counter() - began
        return message

    def _distances(self) -> list[list[bytes]]:
        assert self.centroids is not None
        if self.distance is Distance.EUCLIDEAN:
            out = []
            for centroid in self.centroids:
                row = []
                for c in range(self.chunks):
                    total = (self.columns[0][c] - centroid[0]).square()
                    for j in range(1, self.a):
                        total += (self.columns[j][c] - centroid[j]).square()
                    row.append(total.serialize())
                out.append(row)
            return out
        # Manhattan: the differences, brought down a level (x 1.0) to halve their bytes.
        return [
            [((self.columns[j][c] - centroid[j]) * 1.0).serialize() for c in range(self.chunks)]
            for centroid in self.centroids
            for j in range(self.a)
        ]

    def _sums(self) -> list[list[bytes]]:
        assert self.masks is not None
        masks = self.masks
        if self.k > 1:
            rest = masks[0][:]
            for y in range(1, self.k - 1):
                rest = [r + m for r, m in zip(rest, masks[y], strict=True)]
            last = [-r + 1.0 for r in rest]
        else:
            last = [None] * self.chunks
        out = []
        for y in range(self.k):
            row = []
            for j in range(self.a):
                total = None
                for c in range(self.chunks):
                    mask = masks[y][c] if y < self.k - 1 else last[c]
                    term = self.columns[j][c] if mask is None else mask * self.columns[j][c]
                    total = term if total is None else total + term
                assert total is not None
                row.append(total.serialize())
            out.append(row)
        return out

    def update(self, message: BlindClusterUpdate) -> None:
        if message.done:
            self.done = True
            return
        began = time.perf_counter()
        if message.step == "masks":
            _shape(message.masks, self.k - 1, self.chunks, "masks")
            self.masks = [load_vectors(self.context, row, self.slots) for row in message.masks]
        elif message.step == "centroids":
            self.centroids = self._centroids(message.centroids)
        else:
            raise MiningError(
                f"an update that is not done needs masks or centroids, not {message.step}"
            )
        self.compute_s += time.perf_counter() - began
