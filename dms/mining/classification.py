"""SKNN: k-nearest-neighbour classification over encrypted training and query rows.

Message flow (``specs/mining.md``)::

    owner  --KnnStart-->      worker   encrypted training rows, their labels, public context
    owner  --KnnQuery-->      worker   a block of encrypted queries
    worker --KnnDistances-->  owner    encrypted distance material per query
    owner  --KnnNeighbours--> worker   indices of the k nearest, nearest first
    worker --KnnVotes-->      owner    majority label per query

Liu: the worker sends the signed per-attribute differences (linear, so they
decrypt); the owner computes the distance. CKKS: each ciphertext packs
R = N/2 // a training rows attribute-major (slot j*R + r holds row r's
attribute j); a query is encrypted once, each value repeated R times in its
attribute's block. Per query and packed ciphertext the worker does one
subtraction and (Euclidean) one squaring: a query costs about n*a / (N/2)
ciphertext operations, and no rotations. The owner sums the a blocks after
decryption (it learns only per-attribute differences of its own rows).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import tenseal as ts
from pydantic import BaseModel

from dms.mining.answers import Spot, check_values
from dms.mining.arrays import NDArray
from dms.mining.clustering import shard_rows
from dms.mining.defaults import DEFAULT_VERIFY_FRACTION
from dms.mining.distance import Distance
from dms.mining.errors import MiningError, WorkerMisbehaved
from dms.mining.plain import check_k, nearest, vote
from dms.mining.schemes import new_keys
from dms.mining.schemes.ckks import CkksKeys, load_public_context
from dms.mining.schemes.liu import LiuKey

Scheme = Literal["liu", "ckks"]
Label = str | int | float


class KnnStart(BaseModel):
    scheme: Scheme
    distance: Distance
    k: int
    labels: list[Label]
    context: bytes | None = None
    train: NDArray | None = None  # Liu: n x a x m
    blocks: list[bytes] | None = None  # CKKS: R rows x a attributes per ciphertext, zero-padded


class KnnQuery(BaseModel):
    queries: NDArray | None = None  # Liu: q x a x m
    replicated: list[bytes] | None = None  # CKKS: one ciphertext per query, values repeated R times


class KnnDistances(BaseModel):
    differences: NDArray | None = None  # Liu: q x n x a x m
    blocks: list[list[bytes]] | None = None  # CKKS: per query, per block: (t - q)^2 or (t - q)


class KnnNeighbours(BaseModel):
    indices: NDArray  # q x k, nearest first


class KnnVotes(BaseModel):
    predictions: list[Label]


class KnnOwner:
    """Holds training and query rows and the keys; turns distances into neighbours."""

    def __init__(
        self,
        train: np.ndarray,
        labels: Sequence[Label],
        k: int,
        *,
        scheme: Scheme = "ckks",
        distance: Distance = Distance.EUCLIDEAN,
        level: int = 128,
        keys: CkksKeys | LiuKey | None = None,
        block_budget: int = 4_000_000,
        shards: int = 1,
        verify_fraction: float = DEFAULT_VERIFY_FRACTION,
    ) -> None:
        if scheme not in ("liu", "ckks"):
            raise MiningError(f"unknown scheme {scheme!r}: use ckks or liu")
        train = np.asarray(train, dtype=np.float64)
        check_k(k, train.shape[0], "training records")
        if len(labels) != train.shape[0]:
            raise MiningError("one label per training record is needed")
        self.scheme, self.distance, self.k, self.level = scheme, distance, k, level
        self.labels = list(labels)
        self.keys = keys
        # Translation and uniform scaling keep every distance order; CKKS wants values near 1.
        self.offset = train.mean(axis=0) if scheme == "ckks" else np.zeros(train.shape[1])
        centred = train - self.offset
        peak = float(np.abs(centred).max(initial=0.0))
        self.scale = peak if scheme == "ckks" and peak > 0 else 1.0
        self.train = centred / self.scale
        self.block_budget = block_budget
        if not 1 <= shards <= train.shape[0]:
            raise MiningError(f"{shards} shards for {train.shape[0]} training records")
        self.shards = shard_rows(train.shape[0], shards)
        self._rows_per_block = [0] * shards
        # Each shard's last query block (prepared rows): its answer is spot-checked in the
        # clear before any index leaves, or crafted "distances" would buy a rank oracle.
        self._asked: list[np.ndarray | None] = [None] * shards
        self.spot = Spot(verify_fraction)
        self.timings = {"keygen": 0.0, "encrypt": 0.0, "decrypt": 0.0}

    @property
    def rows_per_block(self) -> int:
        return self._rows_per_block[0]

    def start(self, shard: int = 0, *, share_labels: bool = True) -> KnnStart:
        """The opening message for one shard's worker. ``share_labels=False``: the worker
        gets no labels, and the owner votes itself (:meth:`vote`)."""
        began = time.perf_counter()
        if self.keys is None:
            self.keys = new_keys(self.scheme, self.level)
        self.timings["keygen"] += time.perf_counter() - began
        began = time.perf_counter()
        train = self.train[self.shards[shard]]
        labels = self.labels[self.shards[shard]] if share_labels else []
        message = KnnStart(scheme=self.scheme, distance=self.distance, k=self.k, labels=labels)
        if isinstance(self.keys, CkksKeys):
            n, a = train.shape
            if a > self.keys.slots:
                raise MiningError(f"{a} attributes exceed the {self.keys.slots} CKKS slots")
            rows = min(self.keys.slots // a, n)
            self._rows_per_block[shard] = rows
            padded = np.zeros((-(-n // rows) * rows, a))
            padded[:n] = train
            message.context = self.keys.public_context_bytes()
            message.blocks = [
                self.keys.encrypt(padded[i : i + rows].T.ravel()).serialize()
                for i in range(0, padded.shape[0], rows)
            ]
        else:
            message.train = NDArray.of(self.keys.encrypt(train))
        self.timings["encrypt"] += time.perf_counter() - began
        return message

    def prepare(self, test: np.ndarray) -> np.ndarray:
        test = np.asarray(test, dtype=np.float64)
        if test.ndim != 2 or test.shape[1] != self.train.shape[1]:
            raise MiningError(
                f"test rows have {test.shape[-1]} attributes, training rows {self.train.shape[1]}"
            )
        return (test - self.offset) / self.scale

    def query_blocks(self, test: np.ndarray) -> list[np.ndarray]:
        prepared = self.prepare(test)
        per_query = self.train.shape[0] * self.train.shape[1]
        step = 8 if self.scheme == "ckks" else max(1, self.block_budget // max(per_query, 1))
        return [prepared[i : i + step] for i in range(0, prepared.shape[0], step)]

    def query(self, block: np.ndarray, shard: int = 0) -> KnnQuery:
        began = time.perf_counter()
        if isinstance(self.keys, CkksKeys):
            message = KnnQuery(
                replicated=[
                    self.keys.encrypt(np.repeat(row, self._rows_per_block[shard])).serialize()
                    for row in block
                ]
            )
        else:
            assert self.keys is not None
            message = KnnQuery(queries=NDArray.of(self.keys.encrypt(block)))
        self.timings["encrypt"] += time.perf_counter() - began
        self._asked[shard] = np.asarray(block, dtype=np.float64)
        return message

    def neighbours(self, message: KnnDistances) -> tuple[KnnNeighbours, np.ndarray]:
        """Decrypt, rank, and return the neighbours with the decrypted distances."""
        return self.neighbours_shards([message])

    def neighbours_shards(self, messages: list[KnnDistances]) -> tuple[KnnNeighbours, np.ndarray]:
        """Every shard's distances for one block of queries, in shard order: decrypted
        and joined in training-row order, so ranks (and ties, by index) are those of
        one worker holding every row."""
        if len(messages) != len(self.shards):
            raise MiningError(f"{len(messages)} answers for {len(self.shards)} shards")
        began = time.perf_counter()
        parts = [self._distances(m, i) for i, m in enumerate(messages)]
        if len({p.shape[0] for p in parts}) != 1:
            raise MiningError("shards answered for different numbers of queries")
        dist = np.concatenate(parts, axis=1)
        self.timings["decrypt"] += time.perf_counter() - began
        return KnnNeighbours(indices=NDArray.of(nearest(dist, self.k).astype(np.int64))), dist

    def _distances(self, message: KnnDistances, shard: int) -> np.ndarray:
        asked = self._asked[shard]
        if asked is None:
            raise MiningError("distances arrived for no query")
        dist = self._decrypted(message, shard, asked.shape[0])
        rows = self.shards[shard]
        picked = self.spot.sample(rows.stop - rows.start)
        want = self.distance.reduce(asked[:, None, :] - self.train[None, picked + rows.start, :])
        tol = 1e-4 * max(1.0, float(np.abs(want).max(initial=0.0)))
        check_values(dist[:, picked].T, want.T, tol, shard, "distances", picked + rows.start)
        return dist

    def _decrypted(self, message: KnnDistances, shard: int, queries: int) -> np.ndarray:
        rows = self.shards[shard]
        n = rows.stop - rows.start
        if isinstance(self.keys, CkksKeys):
            if message.blocks is None:
                raise MiningError("worker sent no distances")
            a, per = self.train.shape[1], self._rows_per_block[shard]
            expected = -(-n // per) * a * per
            wanted = -(-n // per)
            if len(message.blocks) != queries or any(len(b) != wanted for b in message.blocks):
                raise WorkerMisbehaved(
                    f"shard {shard}: distances for {len(message.blocks)} queries, "
                    f"expected {queries} of {wanted} ciphertexts each",
                    shard,
                )
            # Euclidean blocks arrive squared; Manhattan ones as signed differences.
            fold = np.asarray if self.distance is Distance.EUCLIDEAN else np.abs
            out = []
            for blocks in message.blocks:
                values = [self.keys.decrypt(c) for c in blocks]
                if sum(v.shape[0] for v in values) < expected:
                    raise MiningError("worker sent fewer distances than its shard has rows")
                out.append(
                    np.concatenate(
                        [fold(v[: a * per].reshape(a, per)).sum(axis=0) for v in values]
                    )[:n]
                )
            return np.array(out)
        if message.differences is None or self.keys is None:
            raise MiningError("worker sent no differences")
        diffs = message.differences.array()
        if diffs.ndim != 4 or diffs.shape[:3] != (queries, n, self.train.shape[1]):
            raise MiningError("worker sent differences of the wrong shape")
        return self.distance.reduce(self.keys.decrypt(diffs))

    def vote(self, neighbours: KnnNeighbours) -> list[Label]:
        """The owner's own majority vote: the worker never needs the labels."""
        return [vote([self.labels[i] for i in row]) for row in neighbours.indices.array()]


class KnnWorker:
    """Computes distance material on ciphertexts and votes with the plaintext labels."""

    def __init__(self, start: KnnStart) -> None:
        self.start = start
        self.labels: list[Any] = list(start.labels)
        self.compute_s = 0.0
        self.context: ts.Context | None = None
        if start.scheme == "ckks":
            if start.context is None or start.blocks is None:
                raise MiningError("a CKKS job needs a public context and packed rows")
            self.context = load_public_context(start.context)
            self.blocks = [ts.ckks_vector_from(self.context, b) for b in start.blocks]
        else:
            if start.train is None:
                raise MiningError("a Liu job needs encrypted training rows")
            self.train = start.train.array()

    def distances(self, message: KnnQuery) -> KnnDistances:
        began = time.perf_counter()
        if self.context is not None:
            if message.replicated is None:
                raise MiningError("a CKKS query needs replicated ciphertexts")
            square = self.start.distance is Distance.EUCLIDEAN
            out = KnnDistances(
                blocks=[
                    [self._difference(block, query, square).serialize() for block in self.blocks]
                    for query in (ts.ckks_vector_from(self.context, q) for q in message.replicated)
                ]
            )
        else:
            if message.queries is None:
                raise MiningError("a Liu query needs encrypted query rows")
            q = message.queries.array()
            out = KnnDistances(differences=NDArray.of(q[:, None, :, :] - self.train[None, :, :, :]))
        self.compute_s += time.perf_counter() - began
        return out

    @staticmethod
    def _difference(block: ts.CKKSVector, query: ts.CKKSVector, square: bool) -> ts.CKKSVector:
        diff = block - query
        return diff * diff if square else diff

    def vote(self, message: KnnNeighbours) -> KnnVotes:
        indices = message.indices.array()
        if indices.size and (indices.min() < 0 or indices.max() >= len(self.labels)):
            raise MiningError("neighbour index out of range")
        return KnnVotes(predictions=[vote([self.labels[i] for i in row]) for row in indices])
