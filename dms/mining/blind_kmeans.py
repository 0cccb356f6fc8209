"""Blind k-means (CKKS): the worker sees CKKS ciphertexts and public parameters, nothing else.

Client-aided, one request/response per round, on a schedule fixed before the job starts
(DESIGN decision 13: the owner's messages never depend on what a worker returned)::

    owner  --BlindClusterStart-->  worker  public context, Enc(D) packed by column
                                           (a x chunks), Enc(C) replicated (k x a),
                                           rounds R (announced)
    worker --BlindClusterRound-->  owner   Enc(dist(D, C_y)) (k x chunks)
    owner  --BlindClusterUpdate--> worker  Enc(C_new) (k x a) after rounds 1 .. R - 1,
                                           done after round R, whatever was returned

R is ``max_iterations``. The owner runs plaintext k-means itself on its own data: it
decrypts the distances, assigns every record, and computes the new centroids in the
clear from its data and labels (O(n a), no sums travel). Once k-means has converged it
keeps sending fresh Enc(C) of the final centroids until round R (dummy rounds, spot
checked only), so the worker cannot tell when, or whether, it converged. The bytes a
worker receives are the same in number, size and kind in every job of the same padded
shape, and a ciphertext's content is hidden by CKKS (IND-CPA); nothing decrypted ever
goes back to a worker.

Every ciphertext is zero-padded to the full N/2 slots, so the worker learns n only up
to a chunk (N/2 records); its operations are the same in every round.

- Distances (Euclidean): per chunk and cluster, sum_j (X_j - C_yj)^2: a subtractions,
  a squarings, a - 1 additions; one ciphertext per (cluster, chunk). Manhattan: |.| is
  not a polynomial, so the worker sends the differences X_j - C_yj themselves (a times
  the bytes) and the owner takes absolute values after decrypting.
- The owner opens every ciphertext of an answer and checks its size, slots, level and
  scale before decrypting anything (``dms.mining.answers``); a replayed or malformed
  answer is ``WorkerMisbehaved``. It recomputes a random sample of records' distances in
  the clear each round (``verify_fraction``); a value off by more than the noise is
  ``WorkerMisbehaved`` too.
- Labels: argmin of the decrypted distances. Records whose nearest two are within the
  tie tolerance (noise could order them either way) are decided in the clear on the
  data as given, exactly as ``kmeans`` does; so labels, iterations and centroids are
  plaintext ``kmeans``'s with the same init. Centroids never pass through CKKS at the
  owner: they are the exact means, published as they are.

Depth: one ciphertext-ciphertext multiplication per value (a square).
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

from dms.mining.answers import (
    DEFAULT_VERIFY_FRACTION,
    AnswerShape,
    Spot,
    answer_shape,
    check_values,
    open_grid,
)
from dms.mining.distance import Distance
from dms.mining.errors import MiningError, WorkerMisbehaved
from dms.mining.levels import BLIND_CHAIN, BLIND_LOG_SCALE, LEVELS
from dms.mining.plain import (
    ClusteringOutcome,
    ClusteringParams,
    assign,
    centroid_change,
    initial_centroids,
    update_centroids,
)
from dms.mining.schemes.ckks import CkksKeys, load_public_context

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


class BlindClusterStart(BaseModel):
    """A shard's opening message at the owner's current round (a worker placed again
    mid-job resumes there). ``rounds`` is announced here, before any answer: the job
    has exactly that many rounds whatever the workers return."""

    protocol: Literal["blind"] = "blind"
    distance: Distance
    k: int
    attributes: int
    chunks: int  # of this shard
    slots: int
    rounds: int  # announced: the owner sends centroids rounds times, then done
    exchange: int = 0  # rounds answered so far
    context: bytes  # public CKKS context: no secret key, no Galois keys
    columns: list[list[bytes]]  # a x chunks: Enc(D[:, j]) packed, zero-padded
    centroids: list[list[bytes]]  # k x a: Enc(C[y][j]) in every slot


class BlindClusterRound(BaseModel):
    exchange: int  # 1, 2, ...: the round this answer completes
    # Euclidean: k x chunks, Enc(sum_j (X_j - C_yj)^2);
    # Manhattan: (k * a) x chunks, Enc(X_j - C_yj), row y * a + j.
    ciphertexts: list[list[bytes]]


class BlindClusterUpdate(BaseModel):
    """The owner's message after round ``exchange``: new Enc(C) while ``exchange`` <
    ``rounds``, then done. Nothing in it but fresh ciphertexts depends on any answer."""

    exchange: int
    done: bool
    centroids: list[list[bytes]] = []  # k x a: Enc(C_new[y][j]) in every slot


class BlindClusterOwner:
    """Holds the data, the keys and every plaintext; the workers only compute on ciphertexts.

    With ``shards`` > 1 each worker holds a contiguous run of records; the owner joins
    their distances in record order, so the labels are those of one worker holding
    everything. ``rounds`` (default: ``max_iterations``) is the announced schedule.
    """

    def __init__(
        self,
        data: np.ndarray,
        params: ClusteringParams,
        *,
        keys: CkksKeys | None = None,
        tie_tolerance: float | None = None,
        verify_fraction: float = DEFAULT_VERIFY_FRACTION,
        replicas: int = 1,
    ) -> None:
        k, max_iterations, shards = params.k, params.max_iterations, params.shards
        if max_iterations < 1:
            raise MiningError(f"max iterations must be at least 1, not {max_iterations}")
        data = np.asarray(data, dtype=np.float64)
        if data.ndim != 2 or data.shape[0] == 0:
            raise MiningError("blind k-means needs a non-empty n x a table")
        if not 1 <= shards <= data.shape[0]:
            raise MiningError(f"{shards} shards for {data.shape[0]} records")
        self.distance, self.k, self.level = params.distance, k, params.level
        self.min_error, self.max_iterations = params.min_error, max_iterations
        self.rounds = max_iterations
        self.keys = check_keys(keys)
        self.spot = Spot(verify_fraction)
        # The plaintext k-means runs here, on the data as given: labels, centroids and the
        # convergence test are those of ``kmeans``. What the workers see is centred and
        # scaled into [-r, r] (CKKS noise is absolute; a distance is at most 4 a r^2,
        # within the magnitude budget).
        self.raw = data
        n, a = data.shape
        self.reach = min(1.0, float(np.sqrt(MAGNITUDE_BUDGET / (4 * a))))
        self.offset = data.mean(axis=0)
        peak = float(np.abs(data - self.offset).max(initial=0.0))
        self.scale = (peak if peak > 0 else 1.0) / self.reach
        self.data = (data - self.offset) / self.scale
        self.n, self.a = n, a
        self.shards = shard_rows(self.n, shards)
        if replicas not in (1, 2):
            raise MiningError(f"a shard runs once or twice (--verify replicate), not {replicas}")
        # Workers w = 0 .. shards * replicas - 1; worker w holds shard w % shards, so
        # with replicas = 2 workers i and shards + i compute the same shard.
        self.replicas = replicas
        self.workers = shards * replicas
        self.centroids = initial_centroids(data, k, params.init, params.seed)  # the data's units
        self.tol = tie_tolerance  # None: calibrated on the keys at start()
        self.shape: AnswerShape | None = None
        self.labels = np.zeros(self.n, dtype=np.int64)
        self.changes: list[float] = []
        self.near_ties: list[int] = []  # per iteration: records recomputed in the clear
        self.converged = False
        self.exchange = 0  # rounds answered
        self._centroid_cts: list[list[bytes]] | None = None  # current Enc(C), for every shard
        self.timings = {"keygen": 0.0, "encrypt": 0.0, "decrypt": 0.0, "owner_cpu": 0.0}

    # ---- the schedule ----------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.exchange >= self.rounds

    @property
    def iterating(self) -> bool:
        """Whether the round being answered is a k-means iteration (not a dummy round
        sent after convergence to keep the announced schedule)."""
        return not self.converged and len(self.changes) < self.max_iterations

    def chunks(self, worker: int = 0) -> int:
        assert self.keys is not None
        rows = self.rows(worker)
        return -(-(rows.stop - rows.start) // self.keys.slots)

    def rows(self, worker: int) -> slice:
        """The records worker ``worker`` holds."""
        return self.shards[worker % len(self.shards)]

    def _ready(self) -> CkksKeys:
        began = time.perf_counter()
        if self.keys is None:
            self.keys = blind_keys(self.level)
        if self.tol is None:
            self.tol = calibrate(self.keys, self.a, self.reach)
        if self.shape is None:
            self.shape = answer_shape(self.keys, self.distance)
        self.timings["keygen"] += time.perf_counter() - began
        return self.keys

    def start(self, shard: int = 0) -> BlindClusterStart:
        """Shard ``shard``'s opening message at the current round."""
        if self.done:
            raise MiningError("the job is finished: there is nothing left to start")
        keys = self._ready()
        began = time.perf_counter()
        message = BlindClusterStart(
            distance=self.distance,
            k=self.k,
            attributes=self.a,
            chunks=self.chunks(shard),
            slots=keys.slots,
            rounds=self.rounds,
            exchange=self.exchange,
            context=keys.public_context_bytes(),
            columns=pack_columns(keys, self.data[self.rows(shard)]),
            centroids=self._encrypted_centroids(),
        )
        self.timings["encrypt"] += time.perf_counter() - began
        return message

    def _encrypted_centroids(self) -> list[list[bytes]]:
        """Enc(C) for the current centroids, made once a round and sent to every shard."""
        assert self.keys is not None
        if self._centroid_cts is None:
            scaled = (self.centroids - self.offset) / self.scale
            self._centroid_cts = [replicate(self.keys, row) for row in scaled]
        return self._centroid_cts

    # ---- answers ---------------------------------------------------------------------

    def check(self, shard: int, message: BlindClusterRound) -> list[list[ts.CKKSVector]]:
        """Shard ``shard``'s answer to the current round, opened and checked, not
        decrypted: the round number, the grid and every ciphertext's shape."""
        keys = self._ready()
        assert self.shape is not None
        if message.exchange != self.exchange + 1:
            raise WorkerMisbehaved(
                f"shard {shard}: an answer for round {message.exchange} when round "
                f"{self.exchange + 1} was asked (replayed or out of step)",
                shard,
            )
        rows = self.k if self.distance is Distance.EUCLIDEAN else self.k * self.a
        return open_grid(
            keys, message.ciphertexts, rows, self.chunks(shard), self.shape, shard, "distances"
        )

    def receive(self, message: BlindClusterRound) -> BlindClusterUpdate:
        """One worker holds every record: its answer gives the next update."""
        return self.receive_shards([message])[0]

    def receive_shards(self, messages: list[BlindClusterRound]) -> list[BlindClusterUpdate]:
        """Every shard's answer to the current round, in shard order -> each shard's update.
        Raises ``WorkerMisbehaved`` (naming the shard) before the owner's state changes."""
        if self.done:
            raise MiningError("the job is finished: no answer is expected")
        if len(messages) != self.workers:
            raise MiningError(f"{len(messages)} answers for {self.workers} workers")
        cpu = time.thread_time()
        opened = [self.check(i, m) for i, m in enumerate(messages)]
        if self.iterating:
            self._iterate(opened)
        else:
            for shard, grid in enumerate(opened):  # a dummy round: spot checks only
                self._verify(shard, grid, full=None)
        self.exchange += 1
        self._centroid_cts = None
        if self.done:
            updates = [
                BlindClusterUpdate(exchange=self.exchange, done=True) for _ in range(self.workers)
            ]
        else:
            began = time.perf_counter()
            centroids = self._encrypted_centroids()
            self.timings["encrypt"] += time.perf_counter() - began
            updates = [
                BlindClusterUpdate(exchange=self.exchange, done=False, centroids=centroids)
                for _ in range(self.workers)
            ]
        self.timings["owner_cpu"] += time.thread_time() - cpu
        return updates

    def _exact(self, rows: np.ndarray) -> np.ndarray:
        """Distances of the given records to the current centroids, in the units the
        worker computes in (scaled), in the clear."""
        scaled = (self.centroids - self.offset) / self.scale
        return self.distance.reduce(self.data[rows, None, :] - scaled[None, :, :])

    def _decrypt_shard(self, shard: int, grid: list[list[ts.CKKSVector]]) -> np.ndarray:
        """n_shard x k decrypted distances."""
        assert self.keys is not None
        rows = self.rows(shard)
        n, k, a = rows.stop - rows.start, self.k, self.a
        began = time.perf_counter()
        values = np.stack(
            [np.concatenate([self.keys.decrypt(v) for v in row])[:n] for row in grid], axis=1
        )
        self.timings["decrypt"] += time.perf_counter() - began
        if self.distance is Distance.EUCLIDEAN:
            return values
        return np.abs(values.reshape(n, k, a)).sum(axis=2)

    def _verify(self, shard: int, grid: list[list[ts.CKKSVector]], full: np.ndarray | None) -> None:
        """Recompute a random sample of the shard's records in the clear and compare.
        ``full``: the shard's decrypted distances; None decrypts only the chunks the
        sample falls in (a dummy round)."""
        assert self.keys is not None and self.tol is not None
        rows = self.rows(shard)
        picked = self.spot.sample(rows.stop - rows.start)
        if full is None:
            slots = self.keys.slots
            chunks = np.unique(picked // slots)
            began = time.perf_counter()
            plain = {
                int(c): np.stack([self.keys.decrypt(row[c]) for row in grid], axis=1)
                for c in chunks
            }
            self.timings["decrypt"] += time.perf_counter() - began
            got = np.array([plain[int(i // slots)][i % slots] for i in picked])
            if self.distance is not Distance.EUCLIDEAN:
                got = np.abs(got.reshape(len(picked), self.k, self.a)).sum(axis=2)
        else:
            got = full[picked]
        check_values(
            got, self._exact(picked + rows.start), self.tol, shard, "distances", picked + rows.start
        )

    def _iterate(self, opened: list[list[list[ts.CKKSVector]]]) -> None:
        """One k-means iteration: decrypt, check, assign (near-ties in the clear), and the
        new centroids from the owner's own data and labels."""
        assert self.tol is not None
        decrypted = []
        for worker, grid in enumerate(opened):
            dist = self._decrypt_shard(worker, grid)
            self._verify(worker, grid, dist)
            decrypted.append(dist)
        parts = decrypted[: len(self.shards)]
        for worker in range(len(self.shards), self.workers):  # replicas: compare in full
            shard = worker % len(self.shards)
            ours, theirs = decrypted[shard], decrypted[worker]
            differ = np.flatnonzero((np.abs(ours - theirs) > self.tol).any(axis=1))
            if len(differ):  # one of the two lied: the records in the clear say which
                rows = self.rows(shard)
                exact = self._exact(differ + rows.start)
                for liar, values in ((shard, ours), (worker, theirs)):
                    check_values(
                        values[differ], exact, self.tol, liar, "distances", differ + rows.start
                    )
        labels, tied = assign_with_ties(np.concatenate(parts), self.tol)
        ties = np.flatnonzero(tied)
        if len(ties):  # the noise cannot order these: decide them as plaintext k-means does
            labels[ties] = assign(
                self.raw[ties, None, :] - self.centroids[None, :, :], self.distance
            )
        self.near_ties.append(len(ties))
        self.labels = labels
        new = update_centroids(self.raw, labels, self.centroids)
        change = centroid_change(self.centroids, new)
        self.changes.append(change)
        self.centroids = new
        self.converged = change <= self.min_error

    def outcome(self) -> ClusteringOutcome:
        return ClusteringOutcome(
            labels=self.labels,
            centroids=self.centroids.copy(),
            iterations=len(self.changes),
            converged=self.converged,
            changes=list(self.changes),
        )

    def verification(self) -> dict[str, float | int | str]:
        """For result.json: the share of records checked each round and the chance that
        one altered record in one round is caught."""
        sizes = [s.stop - s.start for s in self.shards]
        # Replicated, one altered record shows as a disagreement unless both workers
        # altered it alike (they are placed on distinct peers).
        odds = 1.0 if self.replicas > 1 else self.spot.detection_per_round(sizes)
        return {
            "verify": "replicate" if self.replicas > 1 else "sample",
            "verify_fraction": self.spot.fraction,
            "detection_per_round": round(odds, 6),
            "records_checked": self.spot.checked,
            "rounds": self.rounds,
        }


class BlindClusterWorker:
    """Subtracts and squares ciphertexts in a fixed sequence; holds no secret key."""

    def __init__(self, start: BlindClusterStart) -> None:
        self.distance, self.k, self.a, self.chunks = (
            start.distance,
            start.k,
            start.attributes,
            start.chunks,
        )
        if self.k < 1 or self.a < 1 or self.chunks < 1:
            raise MiningError("a blind job needs k, attributes and chunks of at least 1")
        if not 0 <= start.exchange < start.rounds:
            raise MiningError(f"round {start.exchange} of {start.rounds}: nothing to compute")
        check_shape(start.columns, self.a, self.chunks, "columns")
        self.context = load_public_context(start.context)
        self.slots = start.slots
        self.columns = [load_vectors(self.context, column, self.slots) for column in start.columns]
        self.centroids: list[list[ts.CKKSVector]] | None = self._centroids(start.centroids)
        self.rounds = start.rounds
        self.exchange = start.exchange
        self.done = False
        self.compute_s = 0.0

    def _centroids(self, raw: list[list[bytes]]) -> list[list[ts.CKKSVector]]:
        check_shape(raw, self.k, self.a, "centroids")
        return [load_vectors(self.context, row, self.slots) for row in raw]

    def round(self) -> BlindClusterRound:
        if self.centroids is None:
            raise MiningError("nothing to compute: the owner's update has not arrived")
        began = time.perf_counter()
        ciphertexts = self._distances()
        self.centroids = None
        self.exchange += 1
        self.compute_s += time.perf_counter() - began
        return BlindClusterRound(exchange=self.exchange, ciphertexts=ciphertexts)

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

    def update(self, message: BlindClusterUpdate) -> None:
        """The owner's message after the round just answered; the schedule announced at
        the start says what it must be (centroids until ``rounds``, then done)."""
        if message.exchange != self.exchange:
            raise MiningError(
                f"an update for round {message.exchange}; round {self.exchange} was answered"
            )
        if message.done != (self.exchange >= self.rounds):
            raise MiningError(
                f"round {self.exchange} of {self.rounds} announced: done is {message.done}"
            )
        if message.done:
            self.done = True
            return
        began = time.perf_counter()
        self.centroids = self._centroids(message.centroids)
        self.compute_s += time.perf_counter() - began
