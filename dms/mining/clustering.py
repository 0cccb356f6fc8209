"""SKMeans and DBSKMeans, split into the data owner's side and the worker's side.

Message flow (``specs/mining.md``)::

    owner  --ClusterStart-->  worker    encrypted data, the UDM U, public context
    worker --ClusterRound-->  owner     labels + encrypted centroid material
    owner  --ClusterUpdate--> worker    SKMeans: the decrypted shift S;
                                        DBSKMeans: U re-encrypted under a fresh FDH-OPE key
    ... until the owner says done: SKMeans when it converged; DBSKMeans after exactly
    max_iterations rounds, the ones after convergence dummy (the last OPE image of U
    sent again, answers checked and ignored), so the end is fixed in advance.

U[x][y] = D[x] - C[y]; each round the worker assigns by U, the owner checks its
labels against the U it holds and its ciphertexts against the owner's own data, takes
the new centroids as its own data's means under those labels (nothing the worker
chose reaches them: a DBSKMeans worker that did had the next OPE image compare the
data with centroids of its choosing), and U += S keeps U = D - C_new.
DBSKMeans departs from the reference, which adds FDH-OPE(S) to FDH-OPE(U):
OPE is not additive, the error builds up round after round, and on Iris the
agreement with k-means fell to a median ARI of 0.6. Re-encrypting U = D - C
under a fresh key each round costs the owner O(n k a) per round and gives a
median ARI of 0.94-0.97 (see specs/mining.md); the worker sees one OPE image of
each U under unrelated keys instead of images it could correlate: a U that did not
change (every dummy round) gets the image it had, byte for byte, never a new one.

With CKKS the worker multiplies each packed column by per-record weights
1/|C_label| and the owner decrypts and checks every slot: no rotations, and
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
from dms.mining.errors import MiningError, WorkerMisbehaved
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

# A decrypted weighted value may differ from the owner's by CKKS noise (~1e-7 at the
# 128 parameters, values within [-1, 1]); a lie must move it by more than this.
WEIGHTED_TOLERANCE = 1e-4
# Liu decrypts to float64 rounding (~1e-12 relative); the same margin.
SHIFT_TOLERANCE = 1e-6
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
    udm: NDArray | None = None  # DBSKMeans: FDH-OPE(D - C_new), n x k x a (``_image``)


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
        # Liu: each worker's encrypted centroids follow its own shard's means; the owner
        # mirrors them in the clear to check the shift it decrypts.
        self._local_centroids = [self.centroids.copy() for _ in self.shards]
        # What each shard's worker holds as U this round, bit for bit: its labels must be
        # the argmin of it, or a worker would choose the centroids (``_labels_of``).
        # SKMeans: the U it was sent plus every shift since.
        self._sent: list[np.ndarray | None] = [None] * len(self.shards)
        # DBSKMeans: the OPE image of this round's U each shard was given, and the
        # centroids it was taken of. A worker placed again mid-round, and every round
        # whose centroids did not change (the dummy rounds), gets the same (``_image``).
        self._images: list[NDArray | None] = [None] * len(self.shards)
        self._imaged: list[np.ndarray | None] = [None] * len(self.shards)

    @property
    def iteration(self) -> int:
        """Rounds answered: k-means iterations, and for DBSKMeans the dummy rounds after
        convergence too."""
        return self.answered

    @property
    def fixed_schedule(self) -> bool:
        """DBSKMeans runs max_iterations rounds whatever the workers return (DESIGN
        decision 13): after convergence the owner sends the last OPE image of U again,
        byte for byte, and ignores the answers, so the end says nothing about the data
        (the repeat shows the worker when k-means converged: ``specs/mining.md``).
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
        if self.algorithm == "dbskmeans":
            udm = self._image(shard)  # a worker placed again: its predecessor's image
        else:
            udm = self._udm(rows)
            self._sent[shard] = udm.array()
        message = ClusterStart(
            algorithm=self.algorithm,
            scheme=self.scheme,
            distance=self.distance,
            k=self.k,
            iteration=self.iteration,
            udm=udm,
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
        """Every shard's round, in shard order: the new centroids, and the update for each
        shard's worker.

        A worker is an active adversary (DESIGN decision 13), and what it returns decides
        the centroids that the next U (OPE(D - C_new) for DBSKMeans, the shift S for
        SKMeans) is taken from. So before anything is used: each shard's labels must be
        the argmin of the U its worker holds (the owner kept it), and what the
        owner decrypts (weighted columns, or the Liu shift) must be what its own data and
        those labels give. The centroids are then the means of the owner's own data under
        those labels, in the clear: nothing the worker chose reaches them. Any failure is
        ``WorkerMisbehaved`` naming the shard, with the owner's state unchanged."""
        if len(messages) != len(self.shards):
            raise MiningError(f"{len(messages)} rounds for {len(self.shards)} shards")
        began = time.perf_counter()
        parts = [self._labels_of(m, i) for i, m in enumerate(messages)]
        if self.fixed_schedule and self.converged:  # a dummy round: labels checked, not used
            self.answered += 1
            return self._next_updates(None)
        labels = np.concatenate(parts)
        new = update_centroids(self.data, labels, self.centroids)
        if isinstance(self.keys, CkksKeys):
            self._check_weighted(messages, parts)
            local = self._local_centroids
        else:
            local = self._check_shifts(messages, parts)
        self.timings["decrypt"] += time.perf_counter() - began
        self.answered += 1
        self._local_centroids = local
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
            updates = [
                ClusterUpdate(done=False, udm=self._image(i)) for i in range(len(self.shards))
            ]
            self.timings["encrypt"] += time.perf_counter() - began
            return updates
        assert shift is not None
        for i, sent in enumerate(self._sent):
            if sent is not None:  # the worker adds S to its U: the same float64 sums
                self._sent[i] = sent + shift[None, :, :]
        return [ClusterUpdate(done=False, shift=NDArray.of(shift)) for _ in self.shards]

    def _labels_of(self, message: ClusterRound, shard: int) -> np.ndarray:
        """Shard ``shard``'s labels: the right shape and range, and each the nearest
        centroid of the U its worker holds (an equal distance, within float64's summation
        order, may go either way)."""
        rows = self.shards[shard]
        try:
            labels = message.labels.array()
        except ValueError as exc:
            raise WorkerMisbehaved(f"shard {shard}: labels: {exc}", shard) from None
        if (
            labels.dtype.kind != "i"
            or labels.shape != (rows.stop - rows.start,)
            or labels.min(initial=0) < 0
            or labels.max(initial=0) >= self.k
        ):
            raise WorkerMisbehaved(f"shard {shard}: labels of the wrong shape or range", shard)
        labels = labels.astype(np.int64)
        image = self._images[shard]
        sent = image.array() if image is not None else self._sent[shard]
        if sent is None:
            raise MiningError(f"shard {shard} answered before it was started")
        dist = self.distance.reduce(sent)
        low = dist.min(axis=1)
        picked = dist[np.arange(len(labels)), labels]
        slack = 1e-9 * np.maximum(np.abs(dist).max(axis=1), 1e-300)
        wrong = np.flatnonzero(picked > low + slack)
        if len(wrong):
            raise WorkerMisbehaved(
                f"shard {shard}: the label of record {int(wrong[0]) + rows.start} is not the "
                f"nearest centroid of the U it holds ({len(wrong)} such labels)",
                shard,
            )
        return labels

    def _check_weighted(self, messages: list[ClusterRound], parts: list[np.ndarray]) -> None:
        """CKKS: slot x of column j must decrypt to D[x][j] / |C_label(x)| (counted in its
        shard). Every ciphertext's count and slots are checked before any is decrypted;
        every value after (the owner decrypts them all anyway)."""
        assert isinstance(self.keys, CkksKeys)
        a = self.data.shape[1]
        for shard, (message, part) in enumerate(zip(messages, parts, strict=True)):
            rows = self.shards[shard]
            pieces = chunk_slices(rows.stop - rows.start, self.keys.slots)
            grid = message.weighted
            if (
                not isinstance(grid, list)
                or len(grid) != a
                or any(not isinstance(c, list) or len(c) != len(pieces) for c in grid)
            ):
                raise WorkerMisbehaved(
                    f"shard {shard}: weighted columns must be {a} x {len(pieces)} ciphertexts",
                    shard,
                )
            vectors = [
                [self._open(raw, piece, shard) for raw, piece in zip(column, pieces, strict=True)]
                for column in grid
            ]
            local = np.bincount(part, minlength=self.k)
            want = self.data[rows] / local[part][:, None]
            for j, column in enumerate(vectors):
                got = np.concatenate([self.keys.decrypt(v) for v in column])
                off = np.abs(got - want[:, j])
                tol = WEIGHTED_TOLERANCE * max(1.0, float(np.abs(want[:, j]).max(initial=0.0)))
                if off.size and float(off.max()) > tol:
                    x = int(off.argmax())
                    raise WorkerMisbehaved(
                        f"shard {shard}: the weighted value of record {x + rows.start}, "
                        f"attribute {j} is off by {float(off[x]):.3g}: not what its data gives",
                        shard,
                    )

    def _open(self, raw: object, piece: slice, shard: int) -> ts.CKKSVector:
        """One ciphertext of a worker's weighted column, parsed, not decrypted: a CKKS
        vector of this context holding the chunk's records, no more."""
        assert isinstance(self.keys, CkksKeys)
        if not isinstance(raw, bytes):
            raise WorkerMisbehaved(f"shard {shard}: weighted columns: not bytes", shard)
        try:
            vector = ts.ckks_vector_from(self.keys.context, raw)
            parts = vector.data.ciphertext()
        except Exception as exc:
            raise WorkerMisbehaved(
                f"shard {shard}: weighted columns: not a CKKS ciphertext of this context "
                f"({type(exc).__name__})",
                shard,
            ) from None
        if len(parts) != 1 or vector.size() != piece.stop - piece.start:
            raise WorkerMisbehaved(
                f"shard {shard}: weighted columns: a ciphertext of {vector.size()} slots, "
                f"expected {piece.stop - piece.start}",
                shard,
            )
        return vector

    def _check_shifts(
        self, messages: list[ClusterRound], parts: list[np.ndarray]
    ) -> list[np.ndarray]:
        """Liu: each worker moved its encrypted centroids to its shard's means under its
        labels; its Enc(S) must decrypt to the owner's mirror of that move. Returns the
        mirrors' new values."""
        assert isinstance(self.keys, LiuKey)
        want_shape = (self.k, self.data.shape[1], self.keys.m)
        moved = []
        for shard, (message, part) in enumerate(zip(messages, parts, strict=True)):
            try:
                shift = message.shift.array() if message.shift is not None else None
            except ValueError as exc:
                raise WorkerMisbehaved(f"shard {shard}: the shift: {exc}", shard) from None
            if shift is None or shift.shape != want_shape or shift.dtype.kind != "f":
                raise WorkerMisbehaved(
                    f"shard {shard}: the shift must be an encrypted {self.k} x "
                    f"{self.data.shape[1]} matrix",
                    shard,
                )
            old = self._local_centroids[shard]
            new = update_centroids(self.data[self.shards[shard]], part, old)
            got = self.keys.decrypt(shift)
            want = old - new
            off = np.abs(got - want)
            tol = SHIFT_TOLERANCE * max(1.0, float(np.abs(old).max(initial=0.0)))
            if not np.all(np.isfinite(got)) or float(off.max(initial=0.0)) > tol:
                raise WorkerMisbehaved(
                    f"shard {shard}: the shift decrypts to other values than its data and "
                    f"labels give (off by {float(np.nanmax(off, initial=0.0)):.3g})",
                    shard,
                )
            moved.append(new)
        return moved

    def _image(self, shard: int) -> NDArray:
        """DBSKMeans: the OPE image of shard ``shard``'s U = D - C. The one it already has
        while the centroids are those it was taken of, bit for bit: a worker placed again
        mid-round, every dummy round, and a round whose labels repeated (same means), so
        a worker never holds two images of one U. Each image is under a fresh key, and OPE
        is linear within its intervals: images of one U whose breakpoints fall in other
        places join into |U| across intervals. Otherwise a new image, under a new key."""
        image, of = self._images[shard], self._imaged[shard]
        if image is not None and of is not None and np.array_equal(of, self.centroids):
            return image
        image = self._udm(self.data[self.shards[shard]])
        self._images[shard], self._imaged[shard] = image, self.centroids.copy()
        return image

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
