"""The data owner's side of a mining job whose workers run elsewhere, one per shard.

A *driver* holds the owner's state (data, keys, centroids or neighbours) and
turns it into operations for the workers, one step at a time:

    start(i)        -> the bytes of shard i's opening message (None: no start)
    request(i, at)  -> (operation, bytes) for shard i's part of the current step
    accept(i, raw)  -> take shard i's answer
    advance()       -> every shard answered: combine, decide; True when finished
    outcome()       -> the labels (or predictions) and the result's fields

It knows nothing of networks or actors (``dms.orchestrator.mining`` places the
workers and moves the bytes), so a worker lost mid-job costs only a new
``start(i)``: the message is built from the owner's current state, and the
new worker resumes at the current step. The byte encoding is
``dms.mining.wire``, as for ``--local``, so the same settings give the same
labels.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, Field

from dms.mining.arrays import NDArray
from dms.mining.blind_kmeans import BlindClusterOwner, BlindClusterRound, BlindClusterUpdate
from dms.mining.blind_knn import BlindKnnDistances, BlindKnnOwner
from dms.mining.classification import KnnDistances, KnnOwner, Label
from dms.mining.clustering import ClusterOwner, ClusterRound, ClusterUpdate
from dms.mining.defaults import DEFAULT_MAX_ITERATIONS, DEFAULT_MIN_ERROR
from dms.mining.distance import Distance
from dms.mining.errors import MiningError, WorkerMisbehaved
from dms.mining.plain import ClusteringParams
from dms.mining.schemes.ckks import CkksKeys
from dms.mining.schemes.liu import LiuKey
from dms.mining.settings import MiningSettings
from dms.mining.wire import decode, encode


class PlainJob(BaseModel):
    """A plaintext baseline placed as it is: the worker sees the data."""

    data: NDArray  # the records (k-means) or the training rows (k-NN)
    test: NDArray | None = None
    labels: list[Label] | None = None
    min_error: float = DEFAULT_MIN_ERROR
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    init: str = "first"
    seed: int | None = None

    def clustering(self, k: int, distance: Distance) -> ClusteringParams:
        """The k-means settings this job carries, for ``k`` clusters by ``distance``
        (both announced in the allocation's params)."""
        return ClusteringParams(
            k=k,
            distance=distance,
            min_error=self.min_error,
            max_iterations=self.max_iterations,
            init=self.init,
            seed=self.seed,
        )


class PlainResult(BaseModel):
    labels: list[Label]
    iterations: int | None = None
    converged: bool | None = None
    centroids: list[list[float]] | None = None
    changes: list[float] = Field(default_factory=list)


A = TypeVar("A", bound=BaseModel)


def decode_answer(kind: type[A], raw: bytes, shard: int) -> A:
    """A worker's answer; one that does not decode is that worker's protocol error."""
    try:
        return decode(kind, raw)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200]
        raise WorkerMisbehaved(f"shard {shard}: not a {kind.__name__}: {first}", shard) from None


def shard_sizes(settings: MiningSettings, rows: int) -> list[int]:
    """Records per worker, one allocation each: every shard, then (``--verify
    replicate``) every shard again for its second worker."""
    from dms.mining.clustering import shard_rows

    if settings.shards > rows:
        raise MiningError(f"{settings.shards} shards for {rows} records")
    return [s.stop - s.start for s in shard_rows(rows, settings.shards)] * settings.replicas


class Driver:
    """What every driver offers; see the module docstring."""

    shards: int = 1
    iteration: int = 0  # steps combined so far
    changes: list[float]

    def prepare(self) -> None: ...

    def start(self, shard: int) -> bytes | None:
        return None

    def opening(self, shard: int) -> tuple[int, bytes | None]:
        """Shard ``shard``'s opening message and the step whose state it holds."""
        return self.iteration, self.start(shard)

    def request(self, shard: int, worker_at: int) -> tuple[str, bytes]:
        raise NotImplementedError

    def accept(self, shard: int, raw: bytes) -> None:
        raise NotImplementedError

    def advance(self) -> bool:
        raise NotImplementedError

    def outcome(self) -> tuple[list[Label], dict[str, Any]]:
        raise NotImplementedError

    def checkpoint(self) -> dict[str, Any]:
        return {"step": self.iteration}

    def note(self) -> str:
        return f"step {self.iteration} done"

    @property
    def timings(self) -> dict[str, float]:
        return {}


class ClusterDriver(Driver):
    """SKMeans (blind or UDM) and DBSKMeans: steps of (encrypted material) -> an update for
    each shard. Blind k-means takes one step a round; with ``--verify replicate`` its
    ``shards`` are workers, two per shard of data (``shard_sizes``)."""

    def __init__(
        self, settings: MiningSettings, data: np.ndarray, keys: CkksKeys | LiuKey | None
    ) -> None:
        self.settings, self.data, self.keys = settings, data, keys
        self.shards = settings.shards * settings.replicas
        self.owner: ClusterOwner | BlindClusterOwner | None = None
        self._answer = BlindClusterRound if settings.blind else ClusterRound
        self._answers: dict[int, Any] = {}
        self._updates: list[ClusterUpdate] | list[BlindClusterUpdate] | None = None
        self._lock = threading.Lock()  # the owner's state: start() may race advance()
        self._starts: dict[int, tuple[int, bytes]] = {}
        self.changes = []

    def prepare(self) -> None:
        s = self.settings
        params = s.clustering()
        if s.blind:
            if self.keys is not None and not isinstance(self.keys, CkksKeys):
                raise MiningError("the blind protocol needs CKKS keys")
            self.owner = BlindClusterOwner(
                self.data,
                params,
                keys=self.keys,
                verify_fraction=s.verify_fraction,
                replicas=s.replicas,
            )
        else:
            self.owner = ClusterOwner(
                self.data,
                params,
                algorithm=s.algorithm,  # type: ignore[arg-type]
                scheme=s.scheme,  # type: ignore[arg-type]
                keys=self.keys,
            )
        # Keys and encryption happen while bids are collected: each shard's opening
        # message is ready when its worker is.
        with self._lock:
            self._starts = {i: (0, encode(self.owner.start(i))) for i in range(self.shards)}

    @property
    def iteration(self) -> int:  # type: ignore[override]
        """Steps combined so far (an exchange of blind k-means, a round of UDM)."""
        if self.owner is None:
            return 0
        if isinstance(self.owner, BlindClusterOwner):
            return self.owner.exchange
        return self.owner.iteration

    @property
    def rounds(self) -> int:
        return len(self.owner.changes) if self.owner else 0

    def start(self, shard: int) -> bytes | None:
        """Shard ``shard``'s opening message at the current step."""
        with self._lock:
            return self._start(shard)

    def _start(self, shard: int) -> bytes:
        assert self.owner is not None
        at, raw = self._starts.pop(shard, (-1, b""))
        if at == self.iteration:
            return raw
        return encode(self.owner.start(shard))

    def opening(self, shard: int) -> tuple[int, bytes | None]:
        """The opening message and its step, read together: a step combined between the
        two would have the worker, holding the new step's state, sent that step's
        update again (a U shifted twice)."""
        with self._lock:
            return self.iteration, self._start(shard)

    def request(self, shard: int, worker_at: int) -> tuple[str, bytes]:
        """A worker that started at the current step needs no update; one a step
        behind gets the last one."""
        if worker_at >= self.iteration or self._updates is None:
            return "step", b""
        return "step", encode(self._updates[shard])

    def accept(self, shard: int, raw: bytes) -> None:
        """Shard ``shard``'s answer; a blind one is opened and checked here, before it is
        kept (``WorkerMisbehaved`` naming the shard: nothing of it will be decrypted)."""
        if not isinstance(self.owner, BlindClusterOwner):
            self._answers[shard] = decode(self._answer, raw)
            return
        answer = decode_answer(BlindClusterRound, raw, shard)
        with self._lock:
            self.owner.check(shard, answer)
        self._answers[shard] = answer

    def advance(self) -> bool:
        """Combine every shard's answer. ``WorkerMisbehaved`` leaves the owner's state as
        it was and forgets only that shard's answer: its worker placed again answers
        the same round."""
        assert self.owner is not None
        if sorted(self._answers) != list(range(self.shards)):
            raise MiningError("not every shard has answered this step")
        with self._lock:
            answers = [self._answers[i] for i in range(self.shards)]
            try:
                updates = self.owner.receive_shards(answers)  # type: ignore[arg-type]
            except WorkerMisbehaved as exc:
                if exc.shard is not None:
                    self._answers.pop(exc.shard, None)
                raise
        self._answers.clear()
        self._updates = updates
        self.changes = list(self.owner.changes)
        return updates[0].done

    def note(self) -> str:
        """What the last step did, for the session's events."""
        if self.owner is None:
            return ""
        if isinstance(self.owner, BlindClusterOwner) and not self.owner.changes[-1:]:
            return f"round {self.owner.exchange}"
        if isinstance(self.owner, BlindClusterOwner) and self.owner.exchange > self.rounds:
            return f"round {self.owner.exchange} of {self.owner.rounds} (announced; checks only)"
        change = f"centroid change {self.changes[-1]:.4f}" if self.changes else ""
        return f"iteration {self.rounds}: {change}"

    def outcome(self) -> tuple[list[Label], dict[str, Any]]:
        assert self.owner is not None
        outcome = self.owner.outcome()
        extra: dict[str, Any] = {
            "iterations": outcome.iterations,
            "converged": outcome.converged,
            "centroids": outcome.centroids.tolist(),
            "protocol": self.settings.protocol or "udm",
        }
        if isinstance(self.owner, BlindClusterOwner):
            extra["near_ties"] = int(sum(self.owner.near_ties))
            extra.update(self.owner.verification())
        return outcome.labels.tolist(), extra

    def checkpoint(self) -> dict[str, Any]:
        if self.owner is None:
            return {"step": 0}
        outcome = self.owner.outcome()
        return {
            "step": self.iteration,
            "iteration": outcome.iterations,
            "changes": list(outcome.changes),
            "centroids": outcome.centroids.tolist(),
            "converged": outcome.converged,
        }

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.owner.timings) if self.owner else {}


class KnnDriver(Driver):
    """SKNN (blind or UDM): blocks of queries; each shard answers with distances to its
    rows, the owner ranks over every shard and votes with its own labels."""

    def __init__(
        self,
        settings: MiningSettings,
        train: np.ndarray,
        labels: Sequence[Label],
        test: np.ndarray,
        keys: CkksKeys | LiuKey | None,
    ) -> None:
        self.settings, self.train, self.labels, self.test, self.keys = (
            settings,
            train,
            list(labels),
            test,
            keys,
        )
        self.shards = settings.shards
        self.owner: KnnOwner | BlindKnnOwner | None = None
        self._answer = BlindKnnDistances if settings.blind else KnnDistances
        self.blocks: list[np.ndarray] = []
        self.block = 0
        self.predictions: list[Label] = []
        self._answers: dict[int, Any] = {}
        self._queries: dict[int, bytes] = {}
        self._starts: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.changes = []

    def prepare(self) -> None:
        s = self.settings
        common: dict[str, Any] = {
            "distance": Distance.parse(s.distance),
            "level": s.level,
            "shards": s.shards,
        }
        if s.blind:
            if self.keys is not None and not isinstance(self.keys, CkksKeys):
                raise MiningError("the blind protocol needs CKKS keys")
            self.owner = BlindKnnOwner(
                self.train,
                self.labels,
                s.k,
                keys=self.keys,
                test=self.test,
                verify_fraction=s.verify_fraction,
                **common,
            )
            self._starts = {i: encode(self.owner.start(i)) for i in range(s.shards)}
            self.blocks = self.owner.row_blocks(self.test)
            return
        else:
            self.owner = KnnOwner(
                self.train,
                self.labels,
                s.k,
                scheme=s.scheme,  # type: ignore[arg-type]
                keys=self.keys,
                **common,
            )
            self._starts = {
                i: encode(self.owner.start(i, share_labels=False)) for i in range(s.shards)
            }
        self.blocks = self.owner.query_blocks(self.test)

    @property
    def iteration(self) -> int:  # type: ignore[override]
        return self.block

    @property
    def total_steps(self) -> int:
        return len(self.blocks)

    def start(self, shard: int) -> bytes | None:
        # Encrypted once, while bids are collected; a worker placed again gets the same.
        return self._starts[shard]

    def request(self, shard: int, worker_at: int) -> tuple[str, bytes]:
        assert self.owner is not None
        with self._lock:
            if shard not in self._queries:
                if isinstance(self.owner, BlindKnnOwner):
                    # One message serves every shard.
                    raw = self._queries.get(0) or encode(
                        self.owner.query_rows(self.blocks[self.block])
                    )
                else:
                    raw = encode(self.owner.query(self.blocks[self.block], shard))
                self._queries[shard] = raw
            return "query", self._queries[shard]

    def accept(self, shard: int, raw: bytes) -> None:
        if not isinstance(self.owner, BlindKnnOwner):
            self._answers[shard] = decode(self._answer, raw)
            return
        answer = decode_answer(BlindKnnDistances, raw, shard)
        with self._lock:
            self.owner.check(shard, answer)
        self._answers[shard] = answer

    def advance(self) -> bool:
        assert self.owner is not None
        with self._lock:
            answers = [self._answers[i] for i in range(self.shards)]
            try:
                if isinstance(self.owner, BlindKnnOwner):
                    indices, _ = self.owner.neighbours_shards(answers)
                    self.predictions.extend(self.owner.vote(indices))
                else:  # udm: spot-checked too before any index is used
                    neighbours, _ = self.owner.neighbours_shards(answers)
                    self.predictions.extend(self.owner.vote(neighbours))
            except WorkerMisbehaved as exc:
                if exc.shard is not None:
                    self._answers.pop(exc.shard, None)
                raise
            self._answers.clear()
            self._queries.clear()
            self.block += 1
        return self.block >= len(self.blocks)

    def note(self) -> str:
        return f"queries: {len(self.predictions)} of {len(self.test)} answered"

    def outcome(self) -> tuple[list[Label], dict[str, Any]]:
        extra: dict[str, Any] = {"protocol": self.settings.protocol or "udm"}
        if isinstance(self.owner, BlindKnnOwner):
            extra["near_ties"] = int(self.owner.near_ties)
            extra.update(self.owner.verification())
        return list(self.predictions), extra

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.owner.timings) if self.owner else {}


class PlainDriver(Driver):
    """kmeans / knn placed in the clear, on one worker."""

    def __init__(
        self,
        settings: MiningSettings,
        data: np.ndarray,
        labels: Sequence[Label] | None = None,
        test: np.ndarray | None = None,
    ) -> None:
        if settings.shards != 1:
            raise MiningError(f"{settings.algorithm} in the clear runs on one shard")
        self.settings = settings
        s = settings
        self.job = PlainJob(
            data=NDArray.of(data),
            test=NDArray.of(test) if test is not None else None,
            labels=list(labels) if labels is not None else None,
            min_error=s.min_error,
            max_iterations=s.max_iterations,
            init=s.init,
            seed=s.seed,
        )
        self.result: PlainResult | None = None
        self.changes = []

    def request(self, shard: int, worker_at: int) -> tuple[str, bytes]:
        return "run", encode(self.job)

    def accept(self, shard: int, raw: bytes) -> None:
        self.result = decode(PlainResult, raw)

    def advance(self) -> bool:
        assert self.result is not None
        self.changes = list(self.result.changes)
        self.iteration = self.result.iterations or 1
        return True

    def note(self) -> str:
        return "the worker answered in the clear"

    def outcome(self) -> tuple[list[Label], dict[str, Any]]:
        assert self.result is not None
        r = self.result
        extra: dict[str, Any] = {}
        if r.iterations is not None:
            extra = {"iterations": r.iterations, "converged": r.converged, "centroids": r.centroids}
        return list(r.labels), extra
