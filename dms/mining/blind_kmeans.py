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
  Galois keys (the public context grows from 1.1 MB to 18.6 MB) and 12 rotations per
  ciphertext, and the k x a results would still be k x a ciphertexts (TenSEAL offers no
  rotation to pack them); ``bench/mining.py --case blind_fold``, see specs/mining.md.

Depth: one ciphertext-ciphertext multiplication per value (square, or mask x column).
Keys made here (``blind_keys``) use the chain [60, 50, 60] at scale 2^50 with symmetric
encryption: fresh ciphertexts hold two primes (~251 KB at N = 8192), results one
(~131 KB), and a decrypted distance errs by ~1e-10. Any CKKS context with at least one
level works (a ``--keys`` folder's, for example), with its own precision: the tie
tolerance is measured on the keys in use (``calibrate``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import pairwise
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

BLIND_CHAIN = [60, 50, 60]  # one multiplicative level: all the blind protocols need
BLIND_LOG_SCALE = 50
# With the 60-bit prime left after the multiplication and a 2^50 scale, results must stay
# below 2^9 in magnitude. The owners scale their data so that none exceeds this budget.
MAGNITUDE_BUDGET = 256.0
# A near-tie: two decrypted distances closer than this many times the largest error the
# owner measured on its own keys (``calibrate``), and never closer than TIE_FLOOR.
TIE_MARGIN = 8.0
TIE_FLOOR = 1e-12


def blind_keys(level: int = 128) -> CkksKeys:
    """A CKKS context made for the blind protocols: one level ([60, 50, 60], scale 2^50)
    and symmetric encryption (only the owner encrypts). Measured at N = 8192, a squared
    distance over 8 attributes errs by 2e-10 instead of 1.8e-6 with the reference
    parameters ([60, 40, 40, 60], 2^40, public-key encryption), and encryption takes
    2 ms instead of 4. The modulus (170 bits) is within the 218 that N = 8192 allows for
    128-bit security."""
    if level not in LEVELS:
        raise MiningError(f"CKKS security level must be one of {sorted(LEVELS)}, not {level}")
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        LEVELS[level][0],
        coeff_mod_bit_sizes=BLIND_CHAIN,
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
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


def slots_of(keys: CkksKeys | None, level: int) -> int:
    if level not in LEVELS:
        raise MiningError(f"CKKS security level must be one of {sorted(LEVELS)}, not {level}")
    return keys.slots if keys is not None else LEVELS[level][0] // 2


def calibrate(keys: CkksKeys, attributes: int, reach: float, seed: int = 0) -> float:
    """The tie tolerance for these keys: the worker's distance computation, run by the
    owner on random values of the data's reach, and the largest error times TIE_MARGIN."""
    rng = np.random.default_rng(seed)
    slots = keys.slots
    values = rng.uniform(-reach, reach, (attributes, slots))
    centre = rng.uniform(-reach, reach, attributes)
    total = None
    for j in range(attributes):
        term = (keys.encrypt(values[j]) - keys.encrypt(np.full(slots, centre[j]))).square()
        total = term if total is None else total + term
    assert total is not None
    error = np.abs(keys.decrypt(total) - ((values - centre[:, None]) ** 2).sum(axis=0)).max()
    return max(TIE_MARGIN * float(error), TIE_FLOOR)


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


def check_shape(rows: Sequence[Sequence[bytes]], outer: int, inner: int, what: str) -> None:
    if len(rows) != outer or any(len(row) != inner for row in rows):
        raise MiningError(f"{what} must be {outer} x {inner} ciphertexts")


def shard_rows(n: int, shards: int) -> list[slice]:
    """``n`` records in ``shards`` contiguous runs of near-equal size, in order."""
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in pairwise(bounds)]


Next = Literal["distances", "sums"]


class BlindClusterStart(BaseModel):
    """A shard's opening message, at the owner's current step (a worker placed again
    mid-job resumes there): ``next`` says what its first ``round()`` computes."""

    protocol: Literal["blind"] = "blind"
    distance: Distance
    k: int
    attributes: int
    chunks: int  # of this shard
    slots: int
    exchange: int = 0  # request/response steps done so far (two per iteration)
    iteration: int = 0  # k-means iterations whose distances were computed
    next: Next = "distances"
    context: bytes  # public CKKS context: no secret key, no Galois keys
    columns: list[list[bytes]]  # a x chunks: Enc(D[:, j]) packed, zero-padded
    centroids: list[list[bytes]] = []  # next == distances: k x a, Enc(C[y][j]) in every slot
    masks: list[list[bytes]] = []  # next == sums: (k - 1) x chunks one-hot masks


class BlindClusterRound(BaseModel):
    exchange: int  # 1, 2, ...: this answer completes that step
    iteration: int
    step: Next
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
    """Holds the data, the keys and every plaintext; the workers only compute on ciphertexts.

    With ``shards`` > 1 each worker holds a contiguous run of records; the owner joins
    their distances in record order and adds their partial sums, so the labels are those
    of one worker holding everything.
    """

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
        shards: int = 1,
        tie_tolerance: float | None = None,
    ) -> None:
        if max_iterations < 1:
            raise MiningError(f"max iterations must be at least 1, not {max_iterations}")
        data = np.asarray(data, dtype=np.float64)
        if data.ndim != 2 or data.shape[0] == 0:
            raise MiningError("blind k-means needs a non-empty n x a table")
        if not 1 <= shards <= data.shape[0]:
            raise MiningError(f"{shards} shards for {data.shape[0]} records")
        self.distance, self.k, self.level = Distance.parse(distance), k, level
        self.min_error, self.max_iterations = min_error, max_iterations
        self.keys = check_keys(keys)
        n, a = data.shape
        # CKKS noise is absolute: centre and scale into [-r, r], r = 1 unless a distance
        # (at most 4 a r^2) or a slot of the sums (at most r n / slots) would pass the
        # magnitude budget. Labels do not change; convergence is tested in the data's units.
        chunks = -(-n // slots_of(self.keys, level))
        self.reach = min(1.0, float(np.sqrt(MAGNITUDE_BUDGET / (4 * a))), MAGNITUDE_BUDGET / chunks)
        self.offset = data.mean(axis=0)
        peak = float(np.abs(data - self.offset).max(initial=0.0))
        self.scale = (peak if peak > 0 else 1.0) / self.reach
        self.data = (data - self.offset) / self.scale
        self.n, self.a = self.data.shape
        self.shards = shard_rows(self.n, shards)
        self.centroids = initial_centroids(self.data, k, init, seed)
        self.tol = tie_tolerance  # None: calibrated on the keys at start()
        self.labels = np.zeros(self.n, dtype=np.int64)
        self.changes: list[float] = []
        self.near_ties: list[int] = []  # per iteration: records whose nearest two were within tol
        self.converged = False
        self.iteration = 0
        self.exchange = 0
        self.expect: Literal["distances", "sums", "nothing"] = "distances"
        self._centroid_cts: list[list[bytes]] | None = None  # current Enc(C), for every shard
        self._masks: list[list[list[bytes]]] = []  # current masks, per shard
        self.timings = {"keygen": 0.0, "encrypt": 0.0, "decrypt": 0.0}

    def chunks(self, shard: int = 0) -> int:
        assert self.keys is not None
        rows = self.shards[shard]
        return -(-(rows.stop - rows.start) // self.keys.slots)

    def start(self, shard: int = 0) -> BlindClusterStart:
        """Shard ``shard``'s opening message at the current step."""
        if self.expect == "nothing":
            raise MiningError("the job is finished: there is nothing left to start")
        began = time.perf_counter()
        if self.keys is None:
            self.keys = blind_keys(self.level)
        if self.tol is None:
            self.tol = calibrate(self.keys, self.a, self.reach)
        self.timings["keygen"] += time.perf_counter() - began
        began = time.perf_counter()
        message = BlindClusterStart(
            distance=self.distance,
            k=self.k,
            attributes=self.a,
            chunks=self.chunks(shard),
            slots=self.keys.slots,
            exchange=self.exchange,
            iteration=self.iteration,
            next=self.expect,
            context=self.keys.public_context_bytes(),
            columns=pack_columns(self.keys, self.data[self.shards[shard]]),
        )
        if self.expect == "distances":
            message.centroids = self._encrypted_centroids()
        else:
            message.masks = self._masks[shard]
        self.timings["encrypt"] += time.perf_counter() - began
        return message

    def _encrypted_centroids(self) -> list[list[bytes]]:
        """Enc(C) for the current centroids, made once and sent to every shard."""
        assert self.keys is not None
        if self._centroid_cts is None:
            self._centroid_cts = [replicate(self.keys, row) for row in self.centroids]
        return self._centroid_cts

    def receive(self, message: BlindClusterRound) -> BlindClusterUpdate:
        """One worker holds every record: its answer gives the next update."""
        return self.receive_shards([message])[0]

    def receive_shards(self, messages: list[BlindClusterRound]) -> list[BlindClusterUpdate]:
        """Every shard's answer to the current step, in shard order -> each shard's update."""
        if len(messages) != len(self.shards):
            raise MiningError(f"{len(messages)} answers for {len(self.shards)} shards")
        for message in messages:
            if message.step != self.expect or message.exchange != self.exchange + 1:
                raise MiningError(
                    f"expected the workers' {self.expect} for step {self.exchange + 1}, "
                    f"got {message.step} for step {message.exchange}"
                )
        self.exchange += 1
        if self.expect == "distances":
            return self._assign(messages)
        return self._update(messages)

    def _assign(self, messages: list[BlindClusterRound]) -> list[BlindClusterUpdate]:
        assert self.keys is not None
        keys, k, a = self.keys, self.k, self.a
        euclidean = self.distance is Distance.EUCLIDEAN
        began = time.perf_counter()
        parts = []
        for shard, (message, rows) in enumerate(zip(messages, self.shards, strict=True)):
            chunks, n = self.chunks(shard), rows.stop - rows.start
            check_shape(message.ciphertexts, k if euclidean else k * a, chunks, "distances")
            decrypted = np.stack([decrypt_rows(keys, c, n) for c in message.ciphertexts], axis=1)
            if not euclidean:
                decrypted = np.abs(decrypted.reshape(n, k, a)).sum(axis=2)
            parts.append(decrypted)
        dist = np.concatenate(parts)
        self.timings["decrypt"] += time.perf_counter() - began
        self.iteration += 1
        assert self.tol is not None
        self.labels, tied = assign_with_ties(dist, self.tol)
        self.near_ties.append(int(tied.sum()))
        began = time.perf_counter()
        self._masks = [self._shard_masks(self.labels[rows]) for rows in self.shards]
        self.timings["encrypt"] += time.perf_counter() - began
        self.expect = "sums"
        return [BlindClusterUpdate(done=False, step="masks", masks=m) for m in self._masks]

    def _shard_masks(self, labels: np.ndarray) -> list[list[bytes]]:
        assert self.keys is not None
        slots = self.keys.slots
        return [
            [
                encrypt_padded(self.keys, (labels[i : i + slots] == y).astype(np.float64))
                for i in range(0, len(labels), slots)
            ]
            for y in range(self.k - 1)
        ]

    def _update(self, messages: list[BlindClusterRound]) -> list[BlindClusterUpdate]:
        assert self.keys is not None
        began = time.perf_counter()
        sums = np.zeros((self.k, self.a))
        for message in messages:  # each shard's partial sums
            check_shape(message.ciphertexts, self.k, self.a, "sums")
            sums += [[self.keys.decrypt(c).sum() for c in row] for row in message.ciphertexts]
        self.timings["decrypt"] += time.perf_counter() - began
        self._masks = []
        counts = np.bincount(self.labels, minlength=self.k)  # the owner's own assignment
        new = self.centroids.copy()
        filled = counts > 0
        new[filled] = sums[filled] / counts[filled, None]
        change = centroid_change(self._units(self.centroids), self._units(new))
        self.changes.append(change)
        self.centroids = new
        self._centroid_cts = None
        self.converged = change <= self.min_error
        if self.converged or self.iteration >= self.max_iterations:
            self.expect = "nothing"
            return [BlindClusterUpdate(done=True, step="done") for _ in self.shards]
        began = time.perf_counter()
        centroids = self._encrypted_centroids()
        self.timings["encrypt"] += time.perf_counter() - began
        self.expect = "distances"
        return [
            BlindClusterUpdate(done=False, step="centroids", centroids=centroids)
            for _ in self.shards
        ]

    def _units(self, centroids: np.ndarray) -> np.ndarray:
        return centroids * self.scale + self.offset

    @property
    def done(self) -> bool:
        return self.expect == "nothing"

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
        check_shape(start.columns, self.a, self.chunks, "columns")
        self.context = load_public_context(start.context)
        self.slots = start.slots
        self.columns = [load_vectors(self.context, column, self.slots) for column in start.columns]
        self.centroids: list[list[ts.CKKSVector]] | None = None
        self.masks: list[list[ts.CKKSVector]] | None = None
        if start.next == "distances":
            self.centroids = self._centroids(start.centroids)
        else:
            self.masks = self._masks(start.masks)
        self.exchange = start.exchange
        self.iteration = start.iteration
        self.done = False
        self.compute_s = 0.0

    def _centroids(self, raw: list[list[bytes]]) -> list[list[ts.CKKSVector]]:
        check_shape(raw, self.k, self.a, "centroids")
        return [load_vectors(self.context, row, self.slots) for row in raw]

    def _masks(self, raw: list[list[bytes]]) -> list[list[ts.CKKSVector]]:
        check_shape(raw, self.k - 1, self.chunks, "masks")
        return [load_vectors(self.context, row, self.slots) for row in raw]

    def round(self) -> BlindClusterRound:
        began = time.perf_counter()
        if self.centroids is not None:
            self.iteration += 1
            step: Next = "distances"
            ciphertexts = self._distances()
            self.centroids = None
        elif self.masks is not None:
            step = "sums"
            ciphertexts = self._sums()
            self.masks = None
        else:
            raise MiningError("nothing to compute: the owner's update has not arrived")
        self.exchange += 1
        self.compute_s += time.perf_counter() - began
        return BlindClusterRound(
            exchange=self.exchange, iteration=self.iteration, step=step, ciphertexts=ciphertexts
        )

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
            self.masks = self._masks(message.masks)
        elif message.step == "centroids":
            self.centroids = self._centroids(message.centroids)
        else:
            raise MiningError(
                f"an update that is not done needs masks or centroids, not {message.step}"
            )
        self.compute_s += time.perf_counter() - began
