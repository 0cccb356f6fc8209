"""A provider built to cheat at blind k-means, over real nodes on loopback.

Its worker (``dms.sim.hostile_mining``) computes honestly, then rewrites its answer:
crafted values for one record, a replayed earlier answer, a ciphertext at the top level
(wrong size and level), or at another scale. The owner catches each
(``WorkerMisbehaved``: before decrypting for the malformed ones, by its spot check for
the lies), the session excludes that provider for the job and places the shard again,
and the job completes with plaintext k-means's labels. The stalling and bomb-throwing workers are in
``tests/test_mining_hostile.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from dms.jobs.executors import EXECUTORS
from dms.mining.data import read_table
from dms.mining.plain import ClusteringParams, kmeans
from dms.sim.cluster import LocalCluster
from dms.sim.hostile_mining import HostileExecutor
from tests.conftest import wait_for
from tests.test_mining_active import blanked
from tests.test_mining_placed import IRIS, Network


# Heartbeats every second (a 3 s deadline), as in test_mining_hostile.py: a provider
# whose heartbeats stop for its deadline loses its running work to another, and at
# 0.5 s (1.5 s) a loaded machine's pause, or the CKKS work of this very process,
# was enough to lose a healthy one (and the exact placements asserted here).
@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with LocalCluster(tmp_path_factory.mktemp("cheats"), heartbeat_s=1.0) as cluster:
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

    executor = HostileExecutor([cheat])
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
    plain = kmeans(read_table(IRIS).features, ClusteringParams(3, max_iterations=4))
    assert answer["labels"] == plain.labels.tolist()
    [caught] = result["excluded"]
    assert re.search(reason, caught["reason"]), caught
    assert caught["peer_id"] not in {p["peer_id"] for p in result["placement"]}
    assert result["detection_per_round"] == 1.0 and result["rounds"] == 4
    assert executor.made == [cheat, "honest"]
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
    for how in ("honest", "shift_one_record"):
        executor = HostileExecutor([how])
        monkeypatch.setitem(EXECUTORS, "mining", executor)
        session = net.mine(request)
        labels.append(net.result(session)["labels"])
        net.settle(session)
        assert executor.made == [how]
        seen.append(executor.sessions[0].received)
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
    liar is excluded and its replica placed again on the third provider. The third's
    heartbeat may have gone out while it held the leases it offered in the first round
    (both lost): what the owner gave back counts as free on it until its heartbeats
    show it (``dms/orchestrator/givenback.py``), else it was not asked, and the replica
    went beside the other one (twice in full suites)."""
    from dms.mining.answers import Spot

    monkeypatch.setattr(Spot, "sample", lambda self, n: np.array([0]))
    executor = HostileExecutor(["shift_one_record"])
    monkeypatch.setitem(EXECUTORS, "mining", executor)
    # A provider the owner still sees busy (its heartbeat lags the previous test's
    # release) is not asked: start from idle, as test_mining_placed does.
    wait_for(net.seen_idle, 30, "the owner to see every provider idle")
    settings = {"algorithm": "skmeans", "k": 3, "max_iterations": 4, "verify": "replicate"}
    session = net.mine({"settings": settings, "data": str(IRIS.resolve()), "timeout_s": 90})
    answer = net.result(session)
    result = answer["result"]
    plain = kmeans(read_table(IRIS).features, ClusteringParams(3, max_iterations=4))
    assert answer["labels"] == plain.labels.tolist()
    assert result["verify"] == "replicate" and result["detection_per_round"] == 1.0
    [caught] = result["excluded"]
    assert "distances of record 17 off by" in caught["reason"], caught
    placed = [p["peer_id"] for p in result["placement"]]
    bids = net.ask("/dms/node/deployment/manifest", {"id": session})["bids"]
    assert len(placed) == len(set(placed)) == 2 and caught["peer_id"] not in placed, bids
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
