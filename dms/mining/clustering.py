"""SKMeans and DBSKMeans, split into the data owner's side and the worker's side.

Message flow (``specs/mining.md``)::

    owner  --ClusterStart-->  worker    encrypted data, the UDM U, public context
    worker --ClusterRound-->  owner     labels + encrypted centroid material
    owner  --ClusterUpdate--> worker    SKMeans: the decrypted shift S;
                                        DBSKMeans: U re-encrypted under a fresh FDH-OPE key
    ... until the owner says done: SKMeans when it converged; DBSKMeans after exactly
    max_iterations rounds, the ones after convergence dummy (U of the final centroids
    under fresh keys, answers checked and ignored), so the end is fixed in advance.

U[x][y] = D[x] - C[y]; each round the worker assigns by U, the owner turns the
worker's ciphertexts into the new centroids, and U += S keeps U = D - C_new.
DBSKMeans departs from the reference, which adds FDH-OPE(S) to FDH-OPE(U):
OPE is not additive, the error builds up round after round, and on Iris the
agreement with k-means fell to a median ARI of 0.6. Re-encrypting U = D - C
under a fresh key each round costs the owner O(n k a) per round and gives a
median ARI of 0.94-0.97 (see specs/mining.md); the worker sees one OPE image of
U per round under unrelated keys instead of images it could correlate.

With CKKS the worker multiplies each packed column by per-record weights
1/|C_label| and the owner folds the slots after decryption: no rotations, and
the owner learns nothing it did not already know (its own data and the labels).
"""

from __future__ import annotations

import itertools
import time
from typing import Literal

import numpy as np
import tenseal as ts
from pydantic import BaseModel

from dms.mining.arrays import NDArray
from dms.mining.distance import Distance
from dms.mining.errors import MiningError
from dms.mining.plain import (
    ClusteringOutcome,
    ClusteringParams,
    assign,
    centroid_change,
    initial_centroids,
    update_centroids,
)
from dms.mining.schemes import new_keys
from dms.mining.schemes.ckks import CkksKeys, chunk_slices, load_public_context
from dms.mining.schemes.fdhope import OpeKey
from dms.mining.schemes.liu import LiuKey

Algorithm = Literal["skmeans", "dbskmeans"]
Scheme = Literal["liu", "ckks"]


class ClusterStart(BaseModel):
    algorithm: Algorithm
    scheme: Scheme
    distance: Distance
    k: int
    iteration: int = 0  # rounds already done (a worker placed again resumes there)
    udm: NDArray  # n x k x a: plaintext (skmeans) or FDH-OPE ciphertexts (dbskmeans)
    context: bytes | None = None  # CKKS public context
    data: NDArray | None = None  # Liu: n x a x m
    columns: list[list[bytes]] | None = None  # CKKS: a x chunks
    centroids: NDArray | None = None  # Liu: k x a x m


class ClusterRound(BaseModel):
    iteration: int
    labels: NDArray
    shift: NDArray | None = None  # Liu: encrypted S = C_old - C_new, k x a x m
    weighted: list[list[bytes]] | None = None  # CKKS: a x chunks, D[x]/|C_label(x)|


class ClusterUpdate(BaseModel):
    done: bool
    shift: NDArray | None = None  # SKMeans: plaintext S = C_old - C_new, k x a
    udm: NDArray | None = None  # DBSKMeans: FDH-OPE(D - C_new) under a fresh key, n x k x a


def shard_rows(n: int, shards: int) -> list[slice]:
    """``n`` records in ``shards`` contiguous runs of near-equal size, in order."""
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


class ClusterOwner:
    """Holds the data and every key; encrypts, decrypts, decides convergence."""

    def __init__(
        self,
        data: np.ndarray,
        params: ClusteringParams,
        *,
        algorithm: Algorithm = "skmeans",
        scheme: Scheme = "ckks",
        keys: CkksKeys | LiuKey | None = None,
    ) -> None:
        k, max_iterations, shards = params.k, params.max_iterations, params.shards
        if scheme not in ("liu", "ckks"):
            raise MiningError(f"unknown scheme {scheme!r}: use ckks or liu")
        if not 1 <= shards <= data.shape[0]:
            raise MiningError(
                f"{shards} shards for {data.shape[0]} records: use 1 to {data.shape[0]}"
            )
        if max_iterations < 1:
            raise MiningError(f"max iterations must be at least 1, not {max_iterations}")
        data = np.asarray(data, dtype=np.float64)
        self.algorithm, self.scheme, self.distance = algorithm, scheme, params.distance
        self.k, self.min_error, self.max_iterations, self.level = (
            k,
            params.min_error,
            max_iterations,
            params.level,
        )
        # CKKS wants magnitudes near 1; scaling changes neither labels nor relative change.
        peak = float(np.abs(data).max(initial=0.0))
        self.scale = peak if scheme == "ckks" and peak > 0 else 1.0
        self.data = data / self.scale
        self.centroids = initial_centroids(self.data, k, params.init, params.seed)
        self.keys = keys
        self.labels = np.zeros(data.shape[0], dtype=np.int64)
        self.changes: list[float] = []
        self.converged = False
        self.answered = 0  # rounds the workers answered (DBSKMeans: dummy ones included)
        self.timings = {"keygen": 0.0, "encrypt": 0.0, "decrypt": 0.0}
        self.shards = shard_rows(data.shape[0], shards)
        # Liu, several shards: each worker's encrypted centroids follow its own shard's
        # means; the owner mirrors them in the clear to recover those means.
        self._local_centroids = [self.centroids.copy() for _ in self.shards]

    @property
    def iteration(self) -> int:
        """Rounds answered: k-means iterations, and for DBSKMeans the dummy rounds after
        convergence too."""
        return self.answered

    @property
    def fixed_schedule(self) -> bool:
        """DBSKMeans runs max_iterations rounds whatever the workers return (DESIGN
        decision 13): after convergence the owner sends U of the final centroids under
        fresh keys and ignores the answers, so the end says nothing about the data.
        SKMeans udm shows the worker U and every shift in the clear: it has no secret
        stopping point to keep."""
        return self.algorithm == "dbskmeans"

    def start(self, shard: int = 0) -> ClusterStart:
        """The opening message for one shard's worker, at the current round (so a worker
        placed again mid-job resumes where the others are)."""
        began = time.perf_counter()
        if self.keys is None:
            self.keys = new_keys(self.scheme, self.level)
        self.timings["keygen"] += time.perf_counter() - began
        began = time.perf_counter()
        rows = self.data[self.shards[shard]]
        message = ClusterStart(
            algorithm=self.algorithm,
            scheme=self.scheme,
            distance=self.distance,
            k=self.k,
            iteration=self.iteration,
            udm=self._udm(rows),
        )
        if isinstance(self.keys, CkksKeys):
            message.context = self.keys.public_context_bytes()
            message.columns = self.keys.encrypt_columns(rows)
        else:
            self._local_centroids[shard] = self.centroids.copy()
            message.data = NDArray.of(self.keys.encrypt(rows))
            message.centroids = NDArray.of(self.keys.encrypt(self.centroids))
        self.timings["encrypt"] += time.perf_counter() - began
        return message

    def receive(self, message: ClusterRound) -> ClusterUpdate:
        """One worker holds all the records: its round gives the next update."""
        return self.receive_shards([message])[0]

    def receive_shards(self, messages: list[ClusterRound]) -> list[ClusterUpdate]:
        """Every shard's round, in shard order: the new centroids from their partial
        results, and the update for each shard's worker."""
        if len(messages) != len(self.shards):
            raise MiningError(f"{len(messages)} rounds for {len(self.shards)} shards")
        began = time.perf_counter()
        parts = [self._labels_of(m, rows) for m, rows in zip(messages, self.shards, strict=True)]
        self.answered += 1
        if self.fixed_schedule and self.converged:  # a dummy round: checked, not used
            return self._next_updates(None)
        labels = np.concatenate(parts)
        if isinstance(self.keys, CkksKeys):
            new = self._ckks_centroids(messages, parts, labels)
        else:
            new = self._liu_centroids(messages, parts)
        self.timings["decrypt"] += time.perf_counter() - began
        shift = self.centroids - new
        change = centroid_change(self.centroids, new)
        self.changes.append(change)
        self.centroids, self.labels = new, labels
        self.converged = change <= self.min_error
        return self._next_updates(shift)

    def _next_updates(self, shift: np.ndarray | None) -> list[ClusterUpdate]:
        ended = self.answered >= self.max_iterations
        if ended or (self.converged and not self.fixed_schedule):
            return [ClusterUpdate(done=True) for _ in self.shards]
        if self.algorithm == "dbskmeans":
            began = time.perf_counter()
            updates = [ClusterUpdate(done=False, udm=self._udm(self.data[s])) for s in self.shards]
            self.timings["encrypt"] += time.perf_counter() - began
            return updates
        assert shift is not None
        return [ClusterUpdate(done=False, shift=NDArray.of(shift)) for _ in self.shards]

    def _labels_of(self, message: ClusterRound, rows: slice) -> np.ndarray:
        labels = message.labels.array().astype(np.int64)
        if (
            labels.shape != (rows.stop - rows.start,)
            or labels.min(initial=0) < 0
            or labels.max(initial=0) >= self.k
        ):
            raise MiningError("worker returned labels of the wrong shape or range")
        return labels

    def _ckks_centroids(
        self, messages: list[ClusterRound], parts: list[np.ndarray], labels: np.ndarray
    ) -> np.ndarray:
        """Slot x holds D[x][j] / |C_label(x)| counted within its shard: the owner folds
        the slots per label, rescaling each shard's local counts to the global ones."""
        assert isinstance(self.keys, CkksKeys)
        new = self.centroids.copy()
        counts = np.bincount(labels, minlength=self.k)
        sums = np.zeros((self.k, self.data.shape[1]))
        for message, part in zip(messages, parts, strict=True):
            if message.weighted is None or len(message.weighted) != self.data.shape[1]:
                raise MiningError("worker sent no weighted columns, or the wrong number")
            local = np.bincount(part, minlength=self.k)
            for j, chunks in enumerate(message.weighted):
                column = np.concatenate([self.keys.decrypt(c) for c in chunks])
                if column.shape[0] < len(part):
                    raise MiningError("worker sent weighted columns shorter than its shard")
                column = column[: len(part)]
                if len(self.shards) > 1:
                    column = column * local[part]
                sums[:, j] += np.bincount(part, weights=column, minlength=self.k)
        if len(self.shards) > 1:
            sums[counts > 0] /= counts[counts > 0, None]
        new[counts > 0] = sums[counts > 0]
        return new

    def _liu_centroids(self, messages: list[ClusterRound], parts: list[np.ndarray]) -> np.ndarray:
        assert isinstance(self.keys, LiuKey)
        for message in messages:
            if message.shift is None or message.shift.shape[:2] != [self.k, self.data.shape[1]]:
                raise MiningError("worker sent no encrypted shift, or one of the wrong shape")
        if len(self.shards) == 1:
            return self.centroids - self.keys.decrypt(messages[0].shift.array())  # type: ignore[union-attr]
        # Each worker moved its encrypted centroids to its own shard's means: recover
        # those, then weigh them by the shard's cluster sizes.
        weighted = np.zeros_like(self.centroids)
        counts = np.zeros(self.k)
        for i, (message, part) in enumerate(zip(messages, parts, strict=True)):
            assert message.shift is not None
            local_new = self._local_centroids[i] - self.keys.decrypt(message.shift.array())
            self._local_centroids[i] = local_new
            local = np.bincount(part, minlength=self.k)
            weighted += local[:, None] * local_new
            counts += local
        new = self.centroids.copy()
        new[counts > 0] = weighted[counts > 0] / counts[counts > 0, None]
        return new

    def _udm(self, rows: np.ndarray) -> NDArray:
        """U = D - C, in the clear for SKMeans, under a fresh FDH-OPE key for DBSKMeans."""
        udm = rows[:, None, :] - self.centroids[None, :, :]
        if self.algorithm == "dbskmeans":
            udm = OpeKey.generate(udm).encrypt(udm)
        return NDArray.of(udm)

    def outcome(self) -> ClusteringOutcome:
        return ClusteringOutcome(
            labels=self.labels,
            centroids=self.centroids * self.scale,
            iterations=len(self.changes),
            converged=self.converged,
            changes=list(self.changes),
        )


class ClusterWorker:
    """Computes on what it was sent; holds no secret key and never could decrypt."""

    def __init__(self, start: ClusterStart) -> None:
        self.start = start
        self.distance = start.distance
        self.k = start.k
        self.udm = start.udm.array()
        self.iteration = start.iteration
        self.context: ts.Context | None = None
        self.columns: list[list[ts.CKKSVector]] = []
        if start.scheme == "ckks":
            if start.context is None or start.columns is None:
                raise MiningError("a CKKS job needs a public context and packed columns")
            self.context = load_public_context(start.context)
            self.columns = [
                [ts.ckks_vector_from(self.context, c) for c in column] for column in start.columns
            ]
            sizes = [vector.size() for vector in self.columns[0]]
            self.pieces = chunk_slices(sum(sizes), sizes[0])
        else:
            if start.data is None or start.centroids is None:
                raise MiningError("a Liu job needs encrypted data and centroids")
            self.encrypted = start.data.array()
            self.encrypted_centroids = start.centroids.array()
        self.compute_s = 0.0

    def round(self) -> ClusterRound:
        began = time.perf_counter()
        self.iteration += 1
        labels = assign(self.udm, self.distance)
        message = ClusterRound(iteration=self.iteration, labels=NDArray.of(labels.astype(np.int64)))
        if self.context is not None:
            counts = np.bincount(labels, minlength=self.k)
            weights = 1.0 / counts[labels]
            message.weighted = [
                [
                    (vector * weights[piece].tolist()).serialize()
                    for vector, piece in zip(column, self.pieces, strict=True)
                ]
                for column in self.columns
            ]
        else:
            n, a, m = self.encrypted.shape
            previous = self.encrypted_centroids.reshape(self.k, a * m)
            new = update_centroids(self.encrypted.reshape(n, a * m), labels, previous)
            message.shift = NDArray.of((previous - new).reshape(self.k, a, m))
            self.encrypted_centroids = new.reshape(self.k, a, m)
        self.compute_s += time.perf_counter() - began
        return message

    def update(self, message: ClusterUpdate) -> None:
        if message.done:
            return
        began = time.perf_counter()
        if message.udm is not None:
            self.udm = message.udm.array()
        elif message.shift is not None:
            self.udm += message.shift.array()[None, :, :]
        else:
            raise MiningError("an update needs a shift or a new distance matrix")
        self.compute_s += time.perf_counter() - began
