"""SKNN: k-nearest-neighbour classification over encrypted training and query rows.

Message flow (``specs/mining.md``)::

    owner  --KnnStart-->      worker   encrypted training rows, their labels, public context
    owner  --KnnQuery-->      worker   a block of encrypted queries
    worker --KnnDistances-->  owner    encrypted distance material per query
    owner  --KnnNeighbours--> worker   indices of the k nearest, nearest first
    worker --KnnVotes-->      owner    majority label per query

Liu: the worker sends the signed per-attribute differences (linear, so they
decrypt); the owner computes the distance. CKKS: training columns are packed
(one ciphertext per attribute per chunk of N/2 rows) and each query value is
encrypted replicated across a chunk, so a query costs O(a) ciphertext
operations per chunk; Euclidean distances are computed homomorphically
(sum of squared differences), Manhattan ones from decrypted differences.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import tenseal as ts
from pydantic import BaseModel

from dms.mining.arrays import NDArray
from dms.mining.distance import Distance
from dms.mining.errors import MiningError
from dms.mining.plain import check_k, nearest, vote
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
    columns: list[list[bytes]] | None = None  # CKKS: a x chunks (zero-padded to full chunks)


class KnnQuery(BaseModel):
    queries: NDArray | None = None  # Liu: q x a x m
    replicated: list[list[bytes]] | None = None  # CKKS: per query, a replicated ciphertexts


class KnnDistances(BaseModel):
    differences: NDArray | None = None  # Liu: q x n x a x m
    squared: list[list[bytes]] | None = None  # CKKS Euclidean: per query, per chunk
    per_attribute: list[list[list[bytes]]] | None = None  # CKKS Manhattan: query, attribute, chunk


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
        self.chunk = 0
        self.timings = {"keygen": 0.0, "encrypt": 0.0, "decrypt": 0.0}

    def start(self) -> KnnStart:
        began = time.perf_counter()
        if self.keys is None:
            self.keys = (
                CkksKeys.generate(self.level)
                if self.scheme == "ckks"
                else LiuKey.generate(self.level)
            )
        self.timings["keygen"] += time.perf_counter() - began
        began = time.perf_counter()
        message = KnnStart(scheme=self.scheme, distance=self.distance, k=self.k, labels=self.labels)
        if isinstance(self.keys, CkksKeys):
            n = self.train.shape[0]
            self.chunk = min(self.keys.slots, n)
            padded_rows = -(-n // self.chunk) * self.chunk
            padded = np.zeros((padded_rows, self.train.shape[1]))
            padded[:n] = self.train
            message.context = self.keys.public_context_bytes()
            message.columns = (
                self.keys.encrypt_columns(padded)
                if self.chunk == self.keys.slots
                else [[self.keys.encrypt(padded[:, j]).serialize()] for j in range(padded.shape[1])]
            )
        else:
            message.train = NDArray.of(self.keys.encrypt(self.train))
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
        step = 1 if self.scheme == "ckks" else max(1, self.block_budget // max(per_query, 1))
        return [prepared[i : i + step] for i in range(0, prepared.shape[0], step)]

    def query(self, block: np.ndarray) -> KnnQuery:
        began = time.perf_counter()
        if isinstance(self.keys, CkksKeys):
            message = KnnQuery(
                replicated=[
                    [self.keys.encrypt(np.full(self.chunk, value)).serialize() for value in row]
                    for row in block
                ]
            )
        else:
            assert self.keys is not None
            message = KnnQuery(queries=NDArray.of(self.keys.encrypt(block)))
        self.timings["encrypt"] += time.perf_counter() - began
        return message

    def neighbours(self, message: KnnDistances) -> tuple[KnnNeighbours, np.ndarray]:
        """Decrypt, rank, and return the neighbours with the decrypted distances."""
        began = time.perf_counter()
        n = self.train.shape[0]
        if isinstance(self.keys, CkksKeys):
            if message.squared is not None:
                dist = np.array(
                    [
                        np.concatenate([self.keys.decrypt(c) for c in chunks])[:n]
                        for chunks in message.squared
                    ]
                )
            elif message.per_attribute is not None:
                dist = np.array(
                    [
                        sum(
                            np.abs(np.concatenate([self.keys.decrypt(c) for c in chunks])[:n])
                            for chunks in attributes
                        )
                        for attributes in message.per_attribute
                    ]
                )
            else:
                raise MiningError("worker sent no distances")
        else:
            if message.differences is None or self.keys is None:
                raise MiningError("worker sent no differences")
            dist = self.distance.reduce(self.keys.decrypt(message.differences.array()))
        self.timings["decrypt"] += time.perf_counter() - began
        return KnnNeighbours(indices=NDArray.of(nearest(dist, self.k).astype(np.int64))), dist


class KnnWorker:
    """Computes distance material on ciphertexts and votes with the plaintext labels."""

    def __init__(self, start: KnnStart) -> None:
        self.start = start
        self.labels: list[Any] = list(start.labels)
        self.compute_s = 0.0
        self.context: ts.Context | None = None
        if start.scheme == "ckks":
            if start.context is None or start.columns is None:
                raise MiningError("a CKKS job needs a public context and packed columns")
            self.context = load_public_context(start.context)
            self.columns = [
                [ts.ckks_vector_from(self.context, c) for c in column] for column in start.columns
            ]
        else:
            if start.train is None:
                raise MiningError("a Liu job needs encrypted training rows")
            self.train = start.train.array()

    def distances(self, message: KnnQuery) -> KnnDistances:
        began = time.perf_counter()
        if self.context is not None:
            if message.replicated is None:
                raise MiningError("a CKKS query needs replicated ciphertexts")
            queries = [
                [ts.ckks_vector_from(self.context, c) for c in row] for row in message.replicated
            ]
            chunks = len(self.columns[0])
            if self.start.distance is Distance.EUCLIDEAN:
                out = KnnDistances(
                    squared=[
                        [self._squared(query, c).serialize() for c in range(chunks)]
                        for query in queries
                    ]
                )
            else:
                out = KnnDistances(
                    per_attribute=[
                        [
                            [(column[c] - q).serialize() for c in range(chunks)]
                            for column, q in zip(self.columns, query, strict=True)
                        ]
                        for query in queries
                    ]
                )
        else:
            if message.queries is None:
                raise MiningError("a Liu query needs encrypted query rows")
            q = message.queries.array()
            out = KnnDistances(differences=NDArray.of(q[:, None, :, :] - self.train[None, :, :, :]))
        self.compute_s += time.perf_counter() - began
        return out

    def _squared(self, query: list[ts.CKKSVector], chunk: int) -> ts.CKKSVector:
        total: ts.CKKSVector | None = None
        for column, value in zip(self.columns, query, strict=True):
            diff = column[chunk] - value
            term = diff * diff
            total = term if total is None else total + term
        assert total is not None
        return total

    def vote(self, message: KnnNeighbours) -> KnnVotes:
        indices = message.indices.array()
        if indices.size and (indices.min() < 0 or indices.max() >= len(self.labels)):
            raise MiningError("neighbour index out of range")
        return KnnVotes(predictions=[vote([self.labels[i] for i in row]) for row in indices])
