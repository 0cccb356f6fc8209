"""A provider built to cheat at blind k-means, over real nodes on loopback.

Its worker computes honestly, then rewrites its answer: crafted values for one record,
a replayed earlier answer, a ciphertext at the top level (wrong size and level), or at
another scale. The owner catches each (``WorkerMisbehaved``: before decrypting for the
malformed ones, by its spot check for the lies), the session excludes that provider
for the job and places the shard again, and the job completes with plaintext
k-means's labels. The stalling and bomb-throwing workers are in
``tests/test_mining_hostile.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import tenseal as ts

from dms.jobs.base import Log
from dms.jobs.executors import EXECUTORS
from dms.jobs.mining import MiningExecutor, MiningParams, MiningSession
from dms.mining.blind_kmeans import BlindClusterRound, BlindClusterWorker
from dms.mining.data import read_table
from dms.mining.plain import kmeans
from dms.mining.wire import decode, encode
from dms.sim.cluster import LocalCluster
from tests.test_mining_active import blanked
from tests.test_mining_placed import IRIS, Network

Cheat = Callable[[BlindClusterWorker, BlindClusterRound, list[BlindClusterRound]], None]


def shift_one_record(worker: BlindClusterWorker, answer: BlindClusterRound, _: Any) -> None:
    """Record 17's distance to cluster 1 pulled down: it would change cluster."""
    cipher = ts.ckks_vector_from(worker.context, answer.ciphertexts[1][0])
    bump = np.zeros(worker.slots)
    bump[17] = -0.5
    answer.ciphertexts[1][0] = (cipher + bump.tolist()).serialize()


def replay(worker: BlindClusterWorker, answer: BlindClusterRound, kept: list[Any]) -> None:
    """From round 2 on, the first round's distances under the current round number."""
    if kept:
        answer.ciphertexts = kept[0].ciphertexts


def top_level(worker: BlindClusterWorker, answer: BlindClusterRound, _: Any) -> None:
    answer.ciphertexts[0][0] = worker.columns[0][0].serialize()  # two primes, 251 KB


def other_scale(worker: BlindClusterWorker, answer: BlindClusterRound, _: Any) -> None:
    """A product left unrescaled: two primes, scale 2^100."""
    worker.context.auto_rescale = False
    try:
        answer.ciphertexts[0][0] = (worker.columns[0][0] * worker.columns[1][0]).serialize()
    finally:
        worker.context.auto_rescale = True


CHEATS: dict[str, Cheat] = {
    "shift_one_record": shift_one_record,
    "replay": replay,
    "top_level": top_level,
    "other_scale": other_scale,
}


class CheatingSession(MiningSession):
    """Computes every step honestly, then rewrites the answer with ``cheat`` (None:
    honest); keeps what the owner sent in ``received``."""

    def __init__(self, params: MiningParams, log: Log, cheat: Cheat | None) -> None:
        super().__init__(params, log)
        self.cheat = cheat
        self.kept: list[BlindClusterRound] = []
        self.received: list[tuple[str, bytes]] = []

    def call(self, op: str, body: bytes) -> bytes:
        self.received.append((op, body))
        out = super().call(op, body)
        if op != "step" or self.cheat is None:
            return out
        answer = decode(BlindClusterRound, out)
        worker = self._ops.cluster
        assert isinstance(worker, BlindClusterWorker)
        honest = answer.model_copy(deep=True)
        self.cheat(worker, answer, self.kept)
        self.kept.append(honest)
        return encode(answer)


class CheatingExecutor(MiningExecutor):
    """Every node's mining executor in this process: the first session made cheats
    (on whichever provider won shard 0), the ones after are honest."""

    def __init__(self, cheat: Cheat | None) -> None:
        self.cheat = cheat
        self.made = 0
        self.first: CheatingSession | None = None
        self._lock = threading.Lock()

    def session(self, params: dict[str, Any], log: Log) -> MiningSession:
        honest = super().session(params, log)
        with self._lock:
            self.made += 1
            if self.made > 1:
                return honest
        self.first = CheatingSession(honest.params, log, self.cheat)
        return self.first


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with LocalCluster(tmp_path_factory.mktemp("cheats"), heartbeat_s=0.5) as cluster:
        yield Network(cluster)


@pytest.mark.parametrize(
    ("cheat", "reason"),
    [
        ("shift_one_record", "distances of record 17 off by"),
        ("replay", "not what its data gives"),
        ("top_level", "bytes"),
        ("other_scale", "bytes|primes|scale"),
    ],
)
def test_a_cheating_worker_is_caught_excluded_and_the_labels_hold(
    net: Network, monkeypatch: pytest.MonkeyPatch, cheat: str, reason: str
) -> None:
    import re

    executor = CheatingExecutor(CHEATS[cheat])
    monkeypatch.setitem(EXECUTORS, "mining", executor)
    settings = {
        "algorithm": "skmeans",
        "protocol": "blind",
        "k": 3,
        "max_iterations": 4,
        "verify_fraction": 1.0,  # every record checked: the one lie is found for sure
    }
    session = net.mine({"settings": settings, "data": str(IRIS.resolve()), "timeout_s": 90})
    answer = net.result(session)
    result = answer["result"]
    plain = kmeans(read_table(IRIS).features, 3, max_iterations=4)
    assert answer["labels"] == plain.labels.tolist()
    [caught] = result["excluded"]
    assert re.search(reason, caught["reason"]), caught
    assert caught["peer_id"] not in {p["peer_id"] for p in result["placement"]}
    assert result["detection_per_round"] == 1.0 and result["rounds"] == 4
    assert executor.made == 2
    net.settle(session)


def test_what_a_provider_receives_does_not_depend_on_what_it_returned(
    net: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs on the same data: an honest worker, and one whose lie moves record 17
    to another cluster every round and goes unseen (the spot check is pointed at
    record 0). The labels differ; every operation and message the provider receives
    is the same, byte for byte once each ciphertext is blanked, of sizes equal up to
    compression."""
    from dms.mining.answers import Spot

    monkeypatch.setattr(Spot, "sample", lambda self, n: np.array([0]))
    settings = {"algorithm": "skmeans", "protocol": "blind", "k": 3, "max_iterations": 6}
    request = {"settings": settings, "data": str(IRIS.resolve()), "timeout_s": 90}
    seen, labels = [], []
    for cheat in (None, shift_one_record):
        executor = CheatingExecutor(cheat)
        monkeypatch.setitem(EXECUTORS, "mining", executor)
        session = net.mine(request)
        labels.append(net.result(session)["labels"])
        net.settle(session)
        assert executor.made == 1 and executor.first is not None
        seen.append(executor.first.received)
    assert labels[0] != labels[1]
    honest, liar = seen
    assert [op for op, _ in honest] == [op for op, _ in liar]
    assert [op for op, _ in honest] == ["start"] + ["step"] * 6 + ["finish"]
    for (_, a), (_, b) in zip(honest, liar, strict=True):
        if a:
            unpacked = [msgpack.unpackb(raw, raw=False) for raw in (a, b)]
            assert blanked(unpacked[0]) == blanked(unpacked[1])
        assert abs(len(a) - len(b)) <= 0.01 * max(len(a), 1)


def test_verify_replicate_runs_each_shard_twice_and_catches_an_unsampled_lie(
    net: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spot check looks only at record 0; the shard's second worker, on another
    provider, disagrees about record 17, and the owner recomputes it in the clear: the
    liar is excluded and placed again on the third provider."""
    from dms.mining.answers import Spot

    monkeypatch.setattr(Spot, "sample", lambda self, n: np.array([0]))
    executor = CheatingExecutor(shift_one_record)
    monkeypatch.setitem(EXECUTORS, "mining", executor)
    settings = {"algorithm": "skmeans", "k": 3, "max_iterations": 4, "verify": "replicate"}
    session = net.mine({"settings": settings, "data": str(IRIS.resolve()), "timeout_s": 90})
    answer = net.result(session)
    result = answer["result"]
    plain = kmeans(read_table(IRIS).features, 3, max_iterations=4)
    assert answer["labels"] == plain.labels.tolist()
    assert result["verify"] == "replicate" and result["detection_per_round"] == 1.0
    [caught] = result["excluded"]
    assert "distances of record 17 off by" in caught["reason"], caught
    placed = [p["peer_id"] for p in result["placement"]]
    assert len(placed) == len(set(placed)) == 2 and caught["peer_id"] not in placed
    net.settle(session)


def test_verify_flags_are_said_in_their_own_words(tmp_path: Path) -> None:
    from tests.test_mine_cli import run_cli

    out = str(tmp_path / "o")
    data = str(IRIS.resolve())
    for args, message in (
        (("--local", "--verify", "replicate"), "--verify replicate runs each shard on two"),
        (("--local", "--verify", "twice"), "--verify is sample or replicate, not 'twice'"),
    ):
        result = run_cli("mine", "skmeans", "--data", data, "--k", "3", "--out", out, *args)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert message in result.stderr
