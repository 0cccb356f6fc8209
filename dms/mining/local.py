"""Both roles in one process: the owner and the worker exchange real, encoded messages.

This is what ``dms mine ... --local`` runs; placement over the network later
carries the same messages between nodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from dms.mining.blind_kmeans import BlindClusterOwner, BlindClusterWorker
from dms.mining.blind_knn import BlindKnnOwner, BlindKnnWorker
from dms.mining.classification import KnnOwner, KnnWorker, Label
from dms.mining.clustering import ClusterOwner, ClusterWorker
from dms.mining.distance import Distance
from dms.mining.errors import MiningError
from dms.mining.plain import (
    ClusteringParams,
    RoundCallback,
    boundary_ties,
    check_k,
    kmeans,
    knn,
)
from dms.mining.schemes.ckks import CkksKeys
from dms.mining.schemes.liu import LiuKey
from dms.mining.settings import CLUSTERING, resolve_protocol
from dms.mining.wire import Wire

CLASSIFICATION = ("knn", "sknn")
SCHEMES = ("ckks", "liu")


class Timings(BaseModel):
    keygen: float = 0.0
    encrypt: float = 0.0
    compute: float = 0.0
    decrypt: float = 0.0
    total: float = 0.0


class MiningResult(BaseModel):
    algorithm: str
    scheme: str  # "plain" for the baselines
    protocol: str = "plain"  # blind | udm | plain (see resolve_protocol)
    distance: str
    k: int
    records: int
    attributes: int
    iterations: int | None = None
    converged: bool | None = None
    centroids: list[list[float]] | None = None
    timings: Timings = Field(default_factory=Timings)
    bytes_to_worker: int = 0
    bytes_to_owner: int = 0
    # blind protocol: decrypted distances within the tie tolerance, which CKKS noise
    # could order either way (k-means: records, summed over iterations; k-NN: queries)
    near_ties: int | None = None
    comparison: dict[str, Any] | None = None
    labels: list[Label] = Field(default_factory=list, exclude=True)

    def summary(self) -> dict[str, Any]:
        """result.json: everything but the per-row labels (those go to labels.csv)."""
        return self.model_dump(mode="json")


def check_scheme(scheme: str) -> Literal["ckks", "liu"]:
    if scheme not in SCHEMES:
        raise MiningError(f"unknown scheme {scheme!r}: use ckks or liu")
    return scheme  # type: ignore[return-value]


def run_clustering(
    algorithm: str,
    data: np.ndarray,
    params: ClusteringParams,
    *,
    scheme: str = "ckks",
    keys: CkksKeys | LiuKey | None = None,
    on_round: RoundCallback | None = None,
    wire: Wire | None = None,
    protocol: str | None = None,
) -> MiningResult:
    if algorithm not in CLUSTERING:
        raise MiningError(f"unknown clustering algorithm {algorithm!r}")
    k = params.k
    check_k(k, data.shape[0])
    if params.shards != 1:
        raise MiningError(f"a run in one process holds the records whole, not in {params.shards}")
    protocol = resolve_protocol(algorithm, scheme, protocol)
    began = time.perf_counter()
    base = {
        "algorithm": algorithm,
        "distance": str(params.distance),
        "k": k,
        "records": data.shape[0],
        "attributes": data.shape[1],
    }
    if algorithm == "kmeans":
        outcome = kmeans(data, params, on_round=on_round)
        timings = Timings(compute=time.perf_counter() - began)
        result = MiningResult(scheme="plain", **base)
        wire = wire or Wire()
    elif protocol == "blind":
        wire = wire or Wire()
        blind = BlindClusterOwner(
            data,
            params,
            keys=keys,  # type: ignore[arg-type]  # a Liu key is refused with a reason
        )
        blind_worker = BlindClusterWorker(wire.to_worker(blind.start()))
        reported = 0
        while True:  # one round trip a round, max_iterations rounds (the last ones dummy)
            step = wire.to_worker(blind.receive(wire.to_owner(blind_worker.round())))
            blind_worker.update(step)
            if on_round and len(blind.changes) > reported:
                reported = len(blind.changes)
                on_round(reported, blind.changes[-1])
            if step.done:
                break
        outcome = blind.outcome()
        timings = Timings(**blind.timings, compute=blind_worker.compute_s)
        result = MiningResult(
            scheme=scheme, protocol=protocol, near_ties=sum(blind.near_ties), **base
        )
    else:
        wire = wire or Wire()
        owner = ClusterOwner(
            data,
            params,
            algorithm=algorithm,
            scheme=check_scheme(scheme),  # type: ignore[arg-type]
            keys=keys,
        )
        worker = ClusterWorker(wire.to_worker(owner.start()))
        while True:
            update = wire.to_worker(owner.receive(wire.to_owner(worker.round())))
            worker.update(update)
            if on_round:
                on_round(len(owner.changes), owner.changes[-1])
            if update.done:
                break
        outcome = owner.outcome()
        timings = Timings(**owner.timings, compute=worker.compute_s)
        result = MiningResult(scheme=scheme, protocol=protocol, **base)
    timings.total = time.perf_counter() - began
    result.iterations, result.converged = outcome.iterations, outcome.converged
    result.centroids = outcome.centroids.tolist()
    result.timings = timings
    result.labels = outcome.labels.tolist()
    result.bytes_to_worker, result.bytes_to_owner = wire.bytes_to_worker, wire.bytes_to_owner
    return result


def run_classification(
    algorithm: str,
    train: np.ndarray,
    labels: Sequence[Label],
    test: np.ndarray,
    k: int,
    *,
    scheme: str = "ckks",
    distance: Distance = Distance.EUCLIDEAN,
    level: int = 128,
    keys: CkksKeys | LiuKey | None = None,
    on_block: Callable[[int, int], None] | None = None,
    wire: Wire | None = None,
    protocol: str | None = None,
) -> MiningResult:
    if algorithm not in CLASSIFICATION:
        raise MiningError(f"unknown classification algorithm {algorithm!r}")
    protocol = resolve_protocol(algorithm, scheme, protocol)
    check_k(k, train.shape[0], "training records")
    if test.shape[1] != train.shape[1]:
        raise MiningError(
            f"test rows have {test.shape[1]} attributes, training rows {train.shape[1]}"
        )
    began = time.perf_counter()
    base = {
        "algorithm": algorithm,
        "distance": str(distance),
        "k": k,
        "records": test.shape[0],
        "attributes": train.shape[1],
    }
    wire = wire or Wire()
    if algorithm == "knn":
        predictions = knn(train, labels, test, k, distance=distance)
        result = MiningResult(
            scheme="plain", **base, timings=Timings(compute=time.perf_counter() - began)
        )
    elif protocol == "blind":
        blind = BlindKnnOwner(
            train,
            labels,
            k,
            distance=distance,
            level=level,
            keys=keys,  # type: ignore[arg-type]  # a Liu key is refused with a reason
            test=test,
        )
        blind_worker = BlindKnnWorker(wire.to_worker(blind.start()))
        predictions = []
        blocks = blind.row_blocks(test)
        for done, block in enumerate(blocks, start=1):
            query = wire.to_worker(blind.query_rows(block))
            predictions.extend(blind.classify(wire.to_owner(blind_worker.distances(query))))
            if on_block:
                on_block(done, len(blocks))
        result = MiningResult(
            scheme=scheme,
            protocol=protocol,
            near_ties=blind.near_ties,
            **base,
            timings=Timings(**blind.timings, compute=blind_worker.compute_s),
        )
    else:
        owner = KnnOwner(
            train, labels, k, scheme=check_scheme(scheme), distance=distance, level=level, keys=keys
        )
        worker = KnnWorker(wire.to_worker(owner.start()))
        predictions = []
        blocks = owner.query_blocks(test)
        for done, block in enumerate(blocks, start=1):
            distances = wire.to_owner(worker.distances(wire.to_worker(owner.query(block))))
            neighbours, _ = owner.neighbours(distances)
            predictions.extend(wire.to_owner(worker.vote(wire.to_worker(neighbours))).predictions)
            if on_block:
                on_block(done, len(blocks))
        result = MiningResult(
            scheme=scheme,
            protocol=protocol,
            **base,
            timings=Timings(**owner.timings, compute=worker.compute_s),
        )
    result.timings.total = time.perf_counter() - began
    result.labels = list(predictions)
    result.bytes_to_worker, result.bytes_to_owner = wire.bytes_to_worker, wire.bytes_to_owner
    return result


def knn_ties(train: np.ndarray, test: np.ndarray, k: int, distance: Distance) -> np.ndarray:
    """Queries whose plaintext neighbour set has an exact distance tie (CKKS may reorder it)."""
    return boundary_ties(distance.reduce(test[:, None, :] - train[None, :, :]), k)
