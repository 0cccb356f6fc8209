"""Blind k-NN (CKKS): the worker holds no labels and learns no neighbours.

One request/response per block of queries::

    owner  --BlindKnnStart-->     worker  public context, Enc(training rows) packed by
                                          column (a x chunks); no labels
    owner  --BlindKnnQuery-->     worker  a block of ``block`` queries, each a ciphertexts
                                          (value q_j in every slot); the last block is
                                          padded with dummy queries
    worker --BlindKnnDistances--> owner   per query, Enc(sum_j (T_j - q_j)^2) per chunk
                                          (Euclidean), or Enc(T_j - q_j) per attribute
                                          and chunk (Manhattan)
    ... one query/distances exchange per block; the owner ranks and votes itself.

The owner decrypts, ranks (distances within the tie tolerance count as equal and are
ordered by index, as plaintext ``knn`` orders exact ties), counts the queries whose
k + 1 nearest hold such a near-tie, and votes with its own labels. The worker's
operations depend only on (a, chunks, block): per query a * chunks subtractions and
squarings, no rotations, no Galois keys.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
from dms.mining.blind_kmeans import (
    MAGNITUDE_BUDGET,
    blind_keys,
    calibrate,
    check_keys,
    check_shape,
    load_vectors,
    pack_columns,
    replicate,
    shard_rows,
)
from dms.mining.distance import Distance
from dms.mining.errors import MiningError
from dms.mining.plain import check_k, nearest, vote
from dms.mining.schemes.ckks import CkksKeys, load_public_context

Label = str | int | float
DEFAULT_BLOCK = 8


class BlindKnnStart(BaseModel):
    protocol: Literal["blind"] = "blind"
    distance: Distance
    attributes: int
    chunks: int
    slots: int
    block: int  # queries per BlindKnnQuery, always
    context: bytes  # public CKKS context: no secret key, no Galois keys
    columns: list[list[bytes]]  # a x chunks: Enc(T[:, j]) packed, zero-padded


class BlindKnnQuery(BaseModel):
    queries: list[list[bytes]]  # block x a: Enc(q_j) in every slot


class BlindKnnDistances(BaseModel):
    # per query: Euclidean, chunks ciphertexts Enc(sum_j (T_j - q_j)^2);
    # Manhattan, a * chunks ciphertexts Enc(T_j - q_j), index j * chunks + c.
    distances: list[list[bytes]]


def nearest_with_ties(distances: np.ndarray, k: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """k nearest per row, nearest first; distances within ``tol`` of each other (chained)
    count as equal and go by index, as plaintext ``nearest`` orders exact ties. Also which
    rows had a near-tie among their k + 1 nearest."""
    order = np.argsort(distances, axis=1, kind="stable")
    ranked = np.take_along_axis(distances, order, axis=1)
    gaps = np.diff(ranked, axis=1)
    group = np.concatenate(
        [np.zeros((ranked.shape[0], 1), dtype=np.int64), np.cumsum(gaps > tol, axis=1)], axis=1
    )
    out = np.empty((ranked.shape[0], k), dtype=np.int64)
    for r in range(ranked.shape[0]):
        within = np.lexsort((order[r], group[r]))
        out[r] = order[r][within][:k]
    tied = (gaps[:, :k] <= tol).any(axis=1)
    return out, tied


class BlindKnnOwner:
    """Holds training rows, labels, queries and keys; ranks and votes after decryption."""

    def __init__(
        self,
        train: np.ndarray,
        labels: Sequence[Label],
        k: int,
        *,
        distance: Distance = Distance.EUCLIDEAN,
        level: int = 128,
        keys: CkksKeys | None = None,
        block: int = DEFAULT_BLOCK,
        shards: int = 1,
        tie_tolerance: float | None = None,
        test: np.ndarray | None = None,
        verify_fraction: float = DEFAULT_VERIFY_FRACTION,
    ) -> None:
        train = np.asarray(train, dtype=np.float64)
        if train.ndim != 2:
            raise MiningError("training rows must be an n x a table")
        check_k(k, train.shape[0], "training records")
        if len(labels) != train.shape[0]:
            raise MiningError("one label per training record is needed")
        if block < 1:
            raise MiningError(f"queries per block must be at least 1, not {block}")
        self.distance, self.k, self.level, self.block = Distance.parse(distance), k, level, block
        self.labels = list(labels)
        self.keys = check_keys(keys)
        # Translation and uniform scaling keep every distance order; CKKS wants values near 1.
        # Every distance must stay within the CKKS magnitude budget: rows (and the test
        # rows, if given now) are centred on the training mean and scaled into [-r, r]
        # with a (2r)^2 <= budget; a query beyond that reach is refused at query time.
        self.offset = train.mean(axis=0)
        self.reach = min(1.0, float(np.sqrt(MAGNITUDE_BUDGET / (4 * train.shape[1]))))
        rows = train if test is None else np.vstack([train, np.asarray(test, dtype=np.float64)])
        peak = float(np.abs(rows - self.offset).max(initial=0.0))
        self.scale = (peak if peak > 0 else 1.0) / self.reach
        self.raw = train
        self.train = (train - self.offset) / self.scale
        self.n, self.a = self.train.shape
        if not 1 <= shards <= self.n:
            raise MiningError(f"{shards} shards for {self.n} training records")
        self.shards = shard_rows(self.n, shards)
        self.tol = tie_tolerance  # None: calibrated on the keys at start()
        self.shape: AnswerShape | None = None
        self.spot = Spot(verify_fraction)
        self.block_rows = 0  # real queries in the block being answered
        self._block: np.ndarray | None = None  # that block, as given (not scaled)
        self.near_ties = 0
        self.tied: list[bool] = []  # per query answered: a near-tie among its k + 1 nearest
        self.timings = {"keygen": 0.0, "encrypt": 0.0, "decrypt": 0.0}

    def chunks(self, shard: int = 0) -> int:
        assert self.keys is not None
        rows = self.shards[shard]
        return -(-(rows.stop - rows.start) // self.keys.slots)

    def start(self, shard: int = 0) -> BlindKnnStart:
        """Shard ``shard``'s opening message: its training rows, encrypted, and no labels."""
        began = time.perf_counter()
        if self.keys is None:
            self.keys = blind_keys(self.level)
        if self.tol is None:
            self.tol = calibrate(self.keys, self.a, self.reach)
        if self.shape is None:
            self.shape = answer_shape(self.keys, self.distance)
        self.timings["keygen"] += time.perf_counter() - began
        began = time.perf_counter()
        message = BlindKnnStart(
            distance=self.distance,
            attributes=self.a,
            chunks=self.chunks(shard),
            slots=self.keys.slots,
            block=self.block,
            context=self.keys.public_context_bytes(),
            columns=pack_columns(self.keys, self.train[self.shards[shard]]),
        )
        self.timings["encrypt"] += time.perf_counter() - began
        return message

    def prepare(self, test: np.ndarray) -> np.ndarray:
        test = np.asarray(test, dtype=np.float64)
        if test.ndim != 2 or test.shape[1] != self.a:
            raise MiningError(f"test rows have {test.shape[-1]} attributes, training rows {self.a}")
        prepared = (test - self.offset) / self.scale
        farthest = float(np.abs(prepared).max(initial=0.0))
        if self.a * (farthest + self.reach) ** 2 > MAGNITUDE_BUDGET:
            raise MiningError(
                f"a test row lies {farthest / self.reach:.0f} times farther from the training "
                "rows' mean than any training row: its encrypted distances would overflow "
                "CKKS; give the test rows when the owner is made (test=...)"
            )
        return prepared

    def query_blocks(self, test: np.ndarray) -> list[np.ndarray]:
        prepared = self.prepare(test)
        return [prepared[i : i + self.block] for i in range(0, prepared.shape[0], self.block)]

    def row_blocks(self, test: np.ndarray) -> list[np.ndarray]:
        """The test rows in blocks, as given (for ``query_rows``); refused here if beyond
        the CKKS reach. Their number is fixed before any answer: the schedule."""
        self.prepare(test)
        test = np.asarray(test, dtype=np.float64)
        return [test[i : i + self.block] for i in range(0, test.shape[0], self.block)]

    def query(self, block: np.ndarray, shard: int = 0) -> BlindKnnQuery:
        """Encrypt one block (from ``query_blocks``), padded to ``block`` queries. The
        same message serves every shard; one block is answered at a time."""
        assert self.keys is not None
        if not 1 <= block.shape[0] <= self.block:
            raise MiningError(f"a query block holds 1 to {self.block} rows")
        began = time.perf_counter()
        padded = np.zeros((self.block, self.a))
        padded[: block.shape[0]] = block
        message = BlindKnnQuery(queries=[replicate(self.keys, row) for row in padded])
        self.timings["encrypt"] += time.perf_counter() - began
        self.block_rows = block.shape[0]
        self._block = block * self.scale + self.offset
        return message

    def query_rows(self, rows: np.ndarray) -> BlindKnnQuery:
        """``query`` for rows in the data's units: near-ties are then ranked in the
        clear on exactly these values, as plaintext ``knn`` ranks them."""
        rows = np.asarray(rows, dtype=np.float64)
        message = self.query(self.prepare(rows))
        self._block = rows
        return message

    def check(self, shard: int, message: BlindKnnDistances) -> list[list[ts.CKKSVector]]:
        """Shard ``shard``'s distances for the current block, opened and checked against
        the expected grid and ciphertext shape; nothing is decrypted."""
        assert self.keys is not None and self.shape is not None
        if not self.block_rows:
            raise MiningError("distances arrived for no query")
        width = self.chunks(shard) * (1 if self.distance is Distance.EUCLIDEAN else self.a)
        return open_grid(
            self.keys, message.distances, self.block, width, self.shape, shard, "distances"
        )

    def neighbours(self, message: BlindKnnDistances) -> tuple[np.ndarray, np.ndarray]:
        """One worker holds every training row: -> (indices q x k, distances q x n)."""
        return self.neighbours_shards([message])

    def neighbours_shards(self, messages: list[BlindKnnDistances]) -> tuple[np.ndarray, np.ndarray]:
        """Every shard's distances for the current block, in shard order: decrypted and
        joined in training-row order, then ranked (near-ties by index, counted)."""
        if len(messages) != len(self.shards):
            raise MiningError(f"{len(messages)} answers for {len(self.shards)} shards")
        if not self.block_rows:
            raise MiningError("distances arrived for no query")
        opened = [self.check(shard, m) for shard, m in enumerate(messages)]
        began = time.perf_counter()
        parts = [self._distances(grid, shard) for shard, grid in enumerate(opened)]
        self.timings["decrypt"] += time.perf_counter() - began
        assert self.tol is not None and self._block is not None
        scaled = (self._block - self.offset) / self.scale
        for shard, part in enumerate(parts):  # spot checks, before anything is kept
            rows = self.shards[shard]
            picked = self.spot.sample(rows.stop - rows.start)
            want = self.distance.reduce(
                scaled[:, None, :] - self.train[None, picked + rows.start, :]
            )
            check_values(
                part[:, picked].T, want.T, self.tol, shard, "distances", picked + rows.start
            )
        dist = np.concatenate(parts, axis=1)
        indices, tied = nearest_with_ties(dist, self.k, self.tol)
        for q in np.flatnonzero(tied):  # the noise cannot rank these: rank them in the clear
            exact = self.distance.reduce(self._block[q][None, None, :] - self.raw[None, :, :])
            indices[q] = nearest(exact, self.k)[0]
        self.block_rows = 0
        self._block = None
        self.near_ties += int(tied.sum())
        self.tied.extend(bool(t) for t in tied)
        return indices, dist

    def _distances(self, grid: list[list[ts.CKKSVector]], shard: int) -> np.ndarray:
        """The real queries' decrypted distances to the shard's rows (queries x rows)."""
        assert self.keys is not None
        keys, chunks, rows = self.keys, self.chunks(shard), self.shards[shard]
        n = rows.stop - rows.start

        def joined(vectors: list[ts.CKKSVector]) -> np.ndarray:
            return np.concatenate([keys.decrypt(v) for v in vectors])[:n]

        real = grid[: self.block_rows]
        if self.distance is Distance.EUCLIDEAN:
            return np.array([joined(q) for q in real])
        return np.array(
            [
                sum(np.abs(joined(q[j * chunks : (j + 1) * chunks])) for j in range(self.a))
                for q in real
            ]
        )

    def verification(self) -> dict[str, float | int]:
        sizes = [s.stop - s.start for s in self.shards]
        return {
            "verify_fraction": self.spot.fraction,
            "detection_per_round": round(self.spot.detection_per_round(sizes), 6),
            "records_checked": self.spot.checked,
        }

    def vote(self, indices: np.ndarray) -> list[Label]:
        return [vote([self.labels[i] for i in row]) for row in indices]

    def classify(self, message: BlindKnnDistances) -> list[Label]:
        """Predictions for the oldest pending block, voted with the owner's own labels."""
        return self.vote(self.neighbours(message)[0])


class BlindKnnWorker:
    """Computes encrypted distances in a fixed sequence; never sees a label or an index."""

    def __init__(self, start: BlindKnnStart) -> None:
        self.distance, self.a, self.chunks, self.block = (
            start.distance,
            start.attributes,
            start.chunks,
            start.block,
        )
        if self.a < 1 or self.chunks < 1 or self.block < 1:
            raise MiningError("a blind job needs attributes, chunks and block of at least 1")
        check_shape(start.columns, self.a, self.chunks, "columns")
        self.context = load_public_context(start.context)
        self.slots = start.slots
        self.columns = [load_vectors(self.context, column, self.slots) for column in start.columns]
        self.compute_s = 0.0

    def distances(self, message: BlindKnnQuery) -> BlindKnnDistances:
        began = time.perf_counter()
        check_shape(message.queries, self.block, self.a, "queries")
        out = [
            self._query(load_vectors(self.context, query, self.slots)) for query in message.queries
        ]
        self.compute_s += time.perf_counter() - began
        return BlindKnnDistances(distances=out)

    def _query(self, query: list[ts.CKKSVector]) -> list[bytes]:
        if self.distance is Distance.EUCLIDEAN:
            out = []
            for c in range(self.chunks):
                total = (self.columns[0][c] - query[0]).square()
                for j in range(1, self.a):
                    total += (self.columns[j][c] - query[j]).square()
                out.append(total.serialize())
            return out
        # Manhattan: the differences, brought down a level (x 1.0) to halve their bytes.
        return [
            ((self.columns[j][c] - query[j]) * 1.0).serialize()
            for j in range(self.a)
            for c in range(self.chunks)
        ]
