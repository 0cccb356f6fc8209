"""SKMeans and DBSKMeans, split into the data owner's side and the worker's side.

Message flow (``specs/mining.md``)::

    owner  --ClusterStart-->  worker    encrypted data, the UDM U, public context
    worker --ClusterRound-->  owner     labels + encrypted centroid material
    owner  --ClusterUpdate--> worker    SKMeans: the decrypted shift S;
                                        DBSKMeans: U re-encrypted under a fresh FDH-OPE key
    ... until the owner says done.

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

import time
from typing import Literal

import numpy as np
import tenseal as ts
from pydantic import BaseModel

from dms.mining.arrays import NDArray
from dms.mining.distance import Distance
from dms.mining.errors import MiningError
from dms.mining.plain import (
    DEFAULT_MAX_ITERATIONS,
    DEFAULT_MIN_ERROR,
    ClusteringOutcome,
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


class ClusterOwner:
    """Holds the data and every key; encrypts, decrypts, decides convergence."""

    def __init__(
        self,
        data: np.ndarray,
        k: int,
        *,
        algorithm: Algorithm = "skmeans",
        scheme: Scheme = "ckks",
        distance: Distance = Distance.EUCLIDEAN,
        min_error: float = DEFAULT_MIN_ERROR,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        init: str = "first",
        seed: int | None = None,
        level: int = 128,
        keys: CkksKeys | LiuKey | None = None,
    ) -> None:
        if scheme not in ("liu", "ckks"):
            raise MiningError(f"unknown scheme {scheme!r}: use ckks or liu")
        if max_iterations < 1:
            raise MiningError(f"max iterations must be at least 1, not {max_iterations}")
        data = np.asarray(data, dtype=np.float64)
        self.algorithm, self.scheme, self.distance = algorithm, scheme, distance
        self.k, self.min_error, self.max_iterations, self.level = (
            k,
            min_error,
            max_iterations,
            level,
        )
        # CKKS wants magnitudes near 1; scaling changes neither labels nor relative change.
        peak = float(np.abs(data).max(initial=0.0))
        self.scale = peak if scheme == "ckks" and peak > 0 else 1.0
        self.data = data / self.scale
        self.centroids = initial_centroids(self.data, k, init, seed)
        self.keys = keys
        self.labels = np.zeros(data.shape[0], dtype=np.int64)
        self.changes: list[float] = []
        self.converged = False
        self.timings = {"keygen": 0.0, "encrypt": 0.0, "decrypt": 0.0}

    def start(self) -> ClusterStart:
        began = time.perf_counter()
        if self.keys is None:
            self.keys = new_keys(self.scheme, self.level)
        self.timings["keygen"] += time.perf_counter() - began
        began = time.perf_counter()
        message = ClusterStart(
            algorithm=self.algorithm,
            scheme=self.scheme,
            distance=self.distance,
            k=self.k,
            udm=self._udm(),
        )
        if isinstance(self.keys, CkksKeys):
            message.context = self.keys.public_context_bytes()
            message.columns = self.keys.encrypt_columns(self.data)
        else:
            message.data = NDArray.of(self.keys.encrypt(self.data))
            message.centroids = NDArray.of(self.keys.encrypt(self.centroids))
        self.timings["encrypt"] += time.perf_counter() - began
        return message

    def receive(self, message: ClusterRound) -> ClusterUpdate:
        began = time.perf_counter()
        labels = message.labels.array().astype(np.int64)
        if (
            labels.shape != (self.data.shape[0],)
            or labels.min(initial=0) < 0
            or labels.max(initial=0) >= self.k
        ):
            raise MiningError("worker returned labels of the wrong shape or range")
        if isinstance(self.keys, CkksKeys):
            if message.weighted is None:
                raise MiningError("worker sent no weighted columns")
            new = self.centroids.copy()
            counts = np.bincount(labels, minlength=self.k)
            for j, chunks in enumerate(message.weighted):
                column = np.concatenate([self.keys.decrypt(c) for c in chunks])[: len(labels)]
                sums = np.bincount(labels, weights=column, minlength=self.k)
                new[counts > 0, j] = sums[counts > 0]
        else:
            if message.shift is None or self.keys is None:
                raise MiningError("worker sent no encrypted shift")
            new = self.centroids - self.keys.decrypt(message.shift.array())
        self.timings["decrypt"] += time.perf_counter() - began
        shift = self.centroids - new
        change = centroid_change(self.centroids, new)
        self.changes.append(change)
        self.centroids, self.labels = new, labels
        self.converged = change <= self.min_error
        done = self.converged or message.iteration >= self.max_iterations
        if done:
            return ClusterUpdate(done=True)
        if self.algorithm == "dbskmeans":
            began = time.perf_counter()
            update = ClusterUpdate(done=False, udm=self._udm())
            self.timings["encrypt"] += time.perf_counter() - began
            return update
        return ClusterUpdate(done=False, shift=NDArray.of(shift))

    def _udm(self) -> NDArray:
        """U = D - C, in the clear for SKMeans, under a fresh FDH-OPE key for DBSKMeans."""
        udm = self.data[:, None, :] - self.centroids[None, :, :]
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
        self.iteration = 0
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
