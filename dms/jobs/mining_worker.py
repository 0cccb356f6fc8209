"""The worker's computation in a ``mining`` allocation: one session's state, one
operation at a time (``start``, ``step``, ``query``, ``run``; see ``dms.jobs.mining``).

Everything it receives is checked against the announced params before any work. It
runs the mining library's worker sides, so importing it loads NumPy and TenSEAL: the
executor imports it when a session starts.
"""

from __future__ import annotations

import numpy as np

from dms.jobs.base import ExecutorError
from dms.jobs.mining_params import (
    KNN_BLOCK,
    LIU_COMPONENTS,
    MAX_ROUNDS,
    MiningParams,
    decode_message,
    inspect_context,
)
from dms.mining import Distance, MiningError
from dms.mining.blind_kmeans import (
    BlindClusterStart,
    BlindClusterUpdate,
    BlindClusterWorker,
)
from dms.mining.blind_knn import BlindKnnQuery, BlindKnnStart, BlindKnnWorker
from dms.mining.classification import KnnDistances, KnnQuery, KnnStart, KnnWorker
from dms.mining.clustering import ClusterStart, ClusterUpdate, ClusterWorker
from dms.mining.levels import BLIND_LOG_SCALE, LEVELS
from dms.mining.placed import PlainJob, PlainResult
from dms.mining.plain import kmeans, knn
from dms.mining.schemes.ckks import load_public_context
from dms.mining.wire import encode


class Ops:
    """The worker's state for one session; one operation at a time (the allocation's
    session thread), never on the allocation's mailbox."""

    def __init__(self, params: MiningParams) -> None:
        self.params = params
        self.cluster: ClusterWorker | BlindClusterWorker | None = None
        self.classify: KnnWorker | BlindKnnWorker | None = None
        self.rounds = 0
        self.queries = 0

    def start(self, body: bytes) -> bytes:
        p = self.params
        blind = p.protocol == "blind"
        if p.algorithm in ("skmeans", "dbskmeans") and blind:
            blind_start = decode_message(BlindClusterStart, body)
            self._check_blind_start(blind_start, p.k)
            self.cluster = BlindClusterWorker(blind_start)
        elif p.algorithm in ("skmeans", "dbskmeans"):
            start = decode_message(ClusterStart, body)
            self._check_cluster_start(start)
            self.cluster = ClusterWorker(start)
        elif p.algorithm == "sknn" and blind:
            knn_start = decode_message(BlindKnnStart, body)
            self._check_blind_start(knn_start, None)
            self.classify = BlindKnnWorker(knn_start)
        elif p.algorithm == "sknn":
            udm_start = decode_message(KnnStart, body)
            self._check_knn_start(udm_start)
            self.classify = KnnWorker(udm_start)
        else:
            raise ExecutorError(f"{p.algorithm} takes 'run', not 'start'")
        return b""

    def step(self, body: bytes) -> bytes:
        if self.cluster is None:
            raise ExecutorError("no clustering session started here")
        if body:
            if isinstance(self.cluster, BlindClusterWorker):
                self.cluster.update(decode_message(BlindClusterUpdate, body))
            else:
                update = decode_message(ClusterUpdate, body)
                self._check_update(update)
                self.cluster.update(update)
        self.rounds += 1
        return encode(self.cluster.round())

    def query(self, body: bytes) -> bytes:
        if self.classify is None:
            raise ExecutorError("no k-NN session started here")
        if isinstance(self.classify, BlindKnnWorker):
            blind = decode_message(BlindKnnQuery, body)
            self.queries += len(blind.queries)
            return encode(self.classify.distances(blind))
        message = decode_message(KnnQuery, body)
        count = len(message.replicated or []) or (
            message.queries.shape[0] if message.queries else 0
        )
        if count == 0 or count > max(KNN_BLOCK, 4_000_000 // max(self.params.n * self.params.a, 1)):
            raise ExecutorError(f"a query block of {count} queries is out of range")
        if message.queries is not None and message.queries.shape[1:2] != [self.params.a]:
            raise ExecutorError("query rows do not have the announced attributes")
        self.queries += count
        answer: KnnDistances = self.classify.distances(message)
        return encode(answer)

    def run(self, body: bytes) -> bytes:
        """Plaintext baselines placed as they are: the worker sees the data."""
        p = self.params
        job = decode_message(PlainJob, body)
        data = job.data.array()
        if data.shape != (p.n, p.a):
            raise ExecutorError(f"data of shape {data.shape}, announced ({p.n}, {p.a})")
        distance = Distance.parse(p.distance)
        if p.algorithm == "kmeans":
            outcome = kmeans(data, job.clustering(p.k, distance))
            self.rounds = outcome.iterations
            return encode(
                PlainResult(
                    labels=outcome.labels.tolist(),
                    iterations=outcome.iterations,
                    converged=outcome.converged,
                    centroids=outcome.centroids.tolist(),
                    changes=list(outcome.changes),
                )
            )
        if job.test is None or job.labels is None:
            raise ExecutorError("knn needs training labels and test rows")
        test = job.test.array()
        if test.ndim != 2 or test.shape[1] != p.a or len(job.labels) != p.n:
            raise ExecutorError("test rows or labels do not match the announced sizes")
        predictions = knn(data, job.labels, test, p.k, distance=distance)
        self.queries = len(predictions)
        return encode(PlainResult(labels=list(predictions)))

    # ---- checks on what arrives ----------------------------------------------------

    def _check_context(self, raw: bytes | None) -> None:
        """A public CKKS context at the announced level: its ring degree, and a scale the
        level's chain allows (the udm chain's, or the blind protocol's one-level chain).
        Its parts are read first (``inspect_context``), before SEAL loads any key."""
        if raw is None:
            raise ExecutorError("a CKKS job needs a public context")
        inspect_context(raw, self.params.level)
        try:
            context = load_public_context(raw)
        except MiningError as exc:
            raise ExecutorError(str(exc)) from None
        except Exception as exc:
            raise ExecutorError(f"not a CKKS context: {type(exc).__name__}") from None
        degree, log_scale, _ = LEVELS[self.params.level]
        scales = {2.0**log_scale, 2.0**BLIND_LOG_SCALE}
        got = context.data.seal_context().key_context_data().parms().poly_modulus_degree()
        if got != degree or context.global_scale not in scales:
            raise ExecutorError(
                f"the context has N = {got} and scale 2^{np.log2(context.global_scale):g}; "
                f"level {self.params.level} announced N = {degree}, scale 2^{log_scale}"
            )

    def _check_blind_start(self, start: BlindClusterStart | BlindKnnStart, k: int | None) -> None:
        p = self.params
        self._check_context(start.context)
        slots = LEVELS[p.level][0] // 2
        chunks = -(-p.n // slots)
        if str(start.distance) != p.distance or (k is not None and start.k != k):  # type: ignore[union-attr]
            raise ExecutorError("the start message does not match the announced job")
        if start.attributes != p.a or start.slots != slots or start.chunks != chunks:
            raise ExecutorError(
                f"the start announces {start.attributes} attributes in {start.chunks} chunks "
                f"of {start.slots} slots; the job announced {p.a}, {chunks}, {slots}"
            )
        if len(start.columns) != p.a or any(len(c) != chunks for c in start.columns):
            raise ExecutorError("packed columns do not hold the announced records")
        if isinstance(start, BlindClusterStart) and not 1 <= start.rounds <= MAX_ROUNDS:
            raise ExecutorError(f"{start.rounds} rounds announced: 1 to {MAX_ROUNDS} allowed")

    def _check_cluster_start(self, start: ClusterStart) -> None:
        p = self.params
        if (start.algorithm, start.scheme, str(start.distance), start.k) != (
            p.algorithm,
            p.scheme,
            p.distance,
            p.k,
        ):
            raise ExecutorError("the start message does not match the announced job")
        if start.udm.shape != [p.n, p.k, p.a]:
            raise ExecutorError(f"U has shape {start.udm.shape}, announced {[p.n, p.k, p.a]}")
        if p.scheme == "ckks":
            self._check_context(start.context)
            slots = LEVELS[p.level][0] // 2
            if start.columns is None or len(start.columns) != p.a:
                raise ExecutorError("a CKKS start needs one packed column per attribute")
            if any(len(column) != -(-p.n // slots) for column in start.columns):
                raise ExecutorError("packed columns do not hold the announced records")
        else:
            m = LIU_COMPONENTS[p.level]
            if start.data is None or start.data.shape != [p.n, p.a, m]:
                raise ExecutorError("Liu data does not have the announced shape")
            if start.centroids is None or start.centroids.shape != [p.k, p.a, m]:
                raise ExecutorError("Liu centroids do not have the announced shape")

    def _check_knn_start(self, start: KnnStart) -> None:
        p = self.params
        if (start.scheme, str(start.distance), start.k) != (p.scheme, p.distance, p.k):
            raise ExecutorError("the start message does not match the announced job")
        if start.labels and len(start.labels) != p.n:
            raise ExecutorError("labels do not match the announced training rows")
        if p.scheme == "ckks":
            self._check_context(start.context)
            rows = max(1, min((LEVELS[p.level][0] // 2) // p.a, p.n))
            if start.blocks is None or len(start.blocks) != -(-p.n // rows):
                raise ExecutorError("packed training rows do not hold the announced records")
        else:
            m = LIU_COMPONENTS[p.level]
            if start.train is None or start.train.shape != [p.n, p.a, m]:
                raise ExecutorError("Liu training rows do not have the announced shape")

    def _check_update(self, update: ClusterUpdate) -> None:
        p = self.params
        if update.shift is not None and update.shift.shape != [p.k, p.a]:
            raise ExecutorError("the shift does not have the announced shape")
        if update.udm is not None and update.udm.shape != [p.n, p.k, p.a]:
            raise ExecutorError("the new U does not have the announced shape")
