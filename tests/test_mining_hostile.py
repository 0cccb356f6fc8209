"""The data owner's session against a hostile provider, over real nodes on loopback.

A provider's worker may stall a step, answer with a bomb (a parcel far larger than the
job's shape allows, or MessagePack built to blow up on decoding) or with garbage. Each
time the owner drops that worker, excludes its peer for the job, places the shard again
and the job completes on another provider with the labels of ``--local``; a job whose
every provider misbehaves fails with the reason after a bounded number of placements.
And a job described without a protocol runs blind (issue 25 item 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dms.jobs.base import ExecutorError
from dms.jobs.executors import EXECUTORS
from dms.jobs.mining_params import (
    MiningParams,
    inspect_context,
    max_context_bytes,
    split_context,
)
from dms.mining import run_clustering
from dms.mining.blind_kmeans import blind_keys
from dms.mining.data import read_table
from dms.mining.placed import ClusterDriver
from dms.mining.plain import ClusteringParams
from dms.mining.schemes.ckks import CkksKeys
from dms.orchestrator.mining import SessionLimits
from dms.sim.cluster import LocalCluster
from dms.sim.hostile_mining import HostileExecutor
from dms.sim.scenario import parse_scenario
from tests.test_mining_placed import IRIS, Network


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    # Short step deadlines (10 s: an honest step here takes well under 1 s, and a loaded
    # machine must not turn it into a stall), so a stalled worker costs seconds. Heartbeats
    # every second (a 3 s deadline): the bombs load the machine, and at 0.5 s (1.5 s) a
    # loaded run saw honest providers' heartbeats arrive expired and the job fail.
    root = tmp_path_factory.mktemp("hostile")
    with LocalCluster(root, heartbeat_s=1.0, mining_step_floor_s=10.0) as cluster:
        yield Network(cluster)


def blind_iris(**extra: Any) -> dict[str, Any]:
    """Blind k-means on Iris, said without a protocol (blind is the default)."""
    settings = {"algorithm": "skmeans", "k": 3, "max_iterations": 4, **extra}
    return {"settings": settings, "data": str(IRIS.resolve()), "timeout_s": 60}


def local_labels() -> list[int]:
    features = read_table(IRIS).features
    return list(run_clustering("skmeans", features, ClusteringParams(3, max_iterations=4)).labels)


@pytest.fixture
def hostile(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Every node's mining executor: its first ``hostile`` sessions (the first
    placements, on whichever providers won them) misbehave as ``how``."""
    made: list[HostileExecutor] = []

    def install(how: str, hostile: int = 1) -> HostileExecutor:
        executor = HostileExecutor([how] * hostile)
        monkeypatch.setitem(EXECUTORS, "mining", executor)
        made.append(executor)
        return executor

    yield install
    for executor in made:
        executor.release()


def excluded_then_completed(net: Network, session: str, reason: str) -> dict[str, Any]:
    """The job completed on another provider; the caught one is excluded, with why."""
    answer = net.result(session)
    result = answer["result"]
    assert answer["labels"] == local_labels()
    [caught] = result["excluded"]
    assert reason in caught["reason"], caught
    final = {p["peer_id"] for p in result["placement"]}
    assert caught["peer_id"] not in final
    assert result["replacements"] == 1
    events = [e["what"] for e in net.status(session)["progress"]["events"]]
    line = f"worker {caught['peer_id'][-8:]} excluded for this job"
    assert sum(line in e for e in events) == 1, events
    # Said once: not again as a lost worker placed again.
    assert sum(caught["reason"] in e for e in events) == 1, events
    net.settle(session)
    return result


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("stall", "no answer to 'step' within its deadline"),
        ("size_bomb", "this shard's shape allows at most"),
        ("decode_bomb", "MessagePack objects"),
    ],
)
def test_a_hostile_worker_is_excluded_and_the_job_completes_on_another(
    net: Network, hostile: Any, how: str, reason: str
) -> None:
    executor = hostile(how)
    session = net.mine(blind_iris())
    excluded_then_completed(net, session, reason)
    assert executor.made[:2] == [how, "honest"]


def test_an_answer_bomb_is_refused_before_it_is_fetched(net: Network, hostile: Any) -> None:
    """64 MiB of one repeated chunk: the owner fetches none of it (its courier pulled
    no chunk bytes for the caught worker's answer)."""
    hostile("size_bomb")
    session = net.mine(blind_iris())
    excluded_then_completed(net, session, "64")
    assert net.owner.node is not None
    courier = net.owner.node.pykka_ref.proxy().courier.get()
    assert courier.store.used_bytes < 8 * 1024 * 1024


def test_every_provider_hostile_fails_with_the_reason_not_endless_placements(
    net: Network, hostile: Any
) -> None:
    executor = hostile("size_bomb", hostile=99)
    # Every provider excluded, the shard waits for one this long, then the job fails (it
    # waited 20 s; a placement here takes well under 1 s).
    session = net.mine(blind_iris() | {"timeout_s": 8})
    status = net.wait(session, timeout=90)
    assert status["phase"] == "failed"
    reason = status["progress"]["reason"]
    assert "excluded for this job" in reason or "shape allows" in reason, reason
    # One placement per provider, then none: every provider is excluded for this job.
    assert len(executor.made) == len(net.providers)
    assert len(status["progress"]["excluded"]) == len(net.providers)
    net.settle(session)


def test_a_step_deadline_follows_the_shape_and_the_workers_benchmark() -> None:
    limits = SessionLimits(step_floor_s=30.0, step_slack=20.0)
    small = MiningParams(algorithm="skmeans", k=3, n=150, a=4).step_work()
    big = MiningParams(algorithm="skmeans", k=5, n=100_000, a=2).step_work()
    assert big > 10 * small
    assert limits.deadline_s(small, 300.0, 0) == 30.0  # the floor
    assert limits.deadline_s(big, 300.0, 0) == 30.0
    assert limits.deadline_s(big, 10.0, 0) == 20.0 * big / 10.0 > 30.0  # a slow worker
    # A worker that claims to be slow buys no more than the slowest counted rate
    assert limits.deadline_s(big, 0.001, 0) == limits.deadline_s(big, 10.0, 0)
    assert limits.deadline_s(0.0, None, 8 * 1024 * 1024) == 38.0  # 1 s per MiB sent


def test_a_job_loses_at_most_mining_max_replacements_workers_then_fails_with_why(
    net: Network, hostile: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert net.owner.node is not None
    owner = net.owner.node.pykka_ref.proxy().mining.get()  # the node's mining owner role
    monkeypatch.setattr(owner, "limits", SessionLimits(step_floor_s=10.0, max_replacements=1))
    executor = hostile("size_bomb", hostile=3)
    session = net.mine(blind_iris())
    status = net.wait(session, timeout=90)
    assert status["phase"] == "failed"
    reason = status["progress"]["reason"]
    assert "2 workers lost or excluded, more than this job allows" in reason, reason
    assert "(mining_max_replacements = 1); last: shard0: the worker failed: an answer of" in reason
    assert executor.made == ["size_bomb", "size_bomb"]  # no third placement
    net.settle(session)


# ---- blind by default (issue 25 item 2) ---------------------------------------------------


def test_a_mining_request_without_a_protocol_runs_blind(net: Network) -> None:
    session = net.mine(blind_iris())
    result = net.result(session)["result"]
    assert result["protocol"] == "blind"
    events = [e["what"] for e in net.status(session)["progress"]["events"]]
    assert any(e.startswith("the worker learns: CKKS ciphertexts only") for e in events)
    net.settle(session)


def test_mining_params_without_a_protocol_are_blind() -> None:
    params = MiningParams(algorithm="skmeans", k=3, n=150, a=4)
    assert params.protocol == "blind"
    assert MiningParams(algorithm="sknn", k=3, n=150, a=4, queries=8).protocol == "blind"
    # A leaky protocol only where the job names it, or names what only it runs
    assert MiningParams(algorithm="skmeans", k=3, n=150, a=4, protocol="udm").protocol == "udm"
    assert MiningParams(algorithm="skmeans", scheme="liu", k=3, n=150, a=4).protocol == "udm"
    assert MiningParams(algorithm="dbskmeans", k=3, n=150, a=4).protocol == "udm"


def test_a_scenario_mine_step_without_a_protocol_runs_blind() -> None:
    step = f"{{name: m, algorithm: skmeans, k: 3, data: {IRIS.resolve()}}}"
    text = f"nodes: [{{name: a}}]\ntimeline:\n  - mine: {step}\n"
    mine = next(s.mine for s in parse_scenario(text).timeline if s.mine is not None)
    assert mine.settings().protocol == "blind"
    assert mine.request()["settings"]["protocol"] == "blind"
    text = text.replace("k: 3,", "k: 3, protocol: udm,")
    mine = next(s.mine for s in parse_scenario(text).timeline if s.mine is not None)
    assert mine.request()["settings"]["protocol"] == "udm"


def test_a_worker_caught_cheating_is_excluded_and_said_in_one_line(
    net: Network, hostile: Any
) -> None:
    """Ciphertexts that are not: the driver's WorkerMisbehaved drops the worker, the
    session excludes its peer for the job (one event line, which ``dms mine`` prints)
    and the job completes on another provider."""
    hostile("garbage")
    session = net.mine(blind_iris())
    result = excluded_then_completed(net, session, "shard 0")
    assert result["protocol"] == "blind"


def test_a_worker_caught_by_a_spot_check_loses_its_shard_only(net: Network, hostile: Any) -> None:
    """Two shards; one worker's distances are all doubled (well-formed ciphertexts): the
    owner's spot check after decryption catches it, the other shard's answer is kept,
    the caught peer is excluded from both shards and the labels are those of --local."""
    hostile("doubled")
    session = net.mine(blind_iris(shards=2))
    answer = net.result(session)
    result = answer["result"]
    assert answer["labels"] == local_labels()
    [caught] = result["excluded"]
    assert "noise allows" in caught["reason"], caught
    assert caught["peer_id"] not in {p["peer_id"] for p in result["placement"]}
    assert result["replacements"] == 1
    net.settle(session)


# ---- a hostile owner: the provider checks a context before it fetches or loads it ------


@pytest.fixture(scope="module")
def galois_context() -> bytes:
    """A public context with Galois keys (32 MiB): no mining job needs one."""
    return CkksKeys.generate(128, galois=True).public_context_bytes()


def test_a_context_larger_than_the_level_allows_is_refused_before_it_is_fetched(
    net: Network, monkeypatch: pytest.MonkeyPatch, galois_context: bytes
) -> None:
    def bomb(start: bytes) -> tuple[bytes, bytes | None]:
        body, _ = split_context(start)
        return body, galois_context

    monkeypatch.setattr("dms.orchestrator.mining.split_context", bomb)
    fetched = [n.node.pykka_ref.proxy().courier.get() for n in net.providers if n.node]
    before = [c.store.used_bytes for c in fetched]
    session = net.mine(blind_iris() | {"timeout_s": 8})
    status = net.wait(session, timeout=90)
    assert status["phase"] == "failed"
    reason = status["progress"]["reason"]
    assert "the public context declares" in reason
    assert "a level-128 job's is at most 2.3 MiB" in reason
    assert "refused before fetching it" in reason
    assert [c.store.used_bytes for c in fetched] == before
    net.settle(session)


def test_an_owners_decode_bomb_is_refused_before_the_worker_decodes_it(
    net: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's first step is 3 MB of MessagePack that decode to 3 million dicts: the
    worker counts its objects against the job's shape and refuses it, with the reason;
    the shard is placed again and (the owner honest again) the job completes."""
    honest = ClusterDriver.request
    bombs: list[int] = []

    def request(self: ClusterDriver, shard: int, worker_at: int) -> tuple[str, bytes]:
        if not bombs:
            bombs.append(shard)
            return "step", b"\xdd" + (3_000_000).to_bytes(4, "big") + b"\x80" * 3_000_000
        return honest(self, shard, worker_at)

    monkeypatch.setattr(ClusterDriver, "request", request)
    session = net.mine(blind_iris())
    answer = net.result(session)
    assert answer["labels"] == local_labels()
    [lost] = [p["lost"] for p in answer["result"]["placement"] if p["lost"]]
    assert "the owner's message: more than" in lost[0]["reason"]
    assert "MessagePack objects" in lost[0]["reason"]
    assert answer["result"]["excluded"] == []  # the worker did nothing wrong
    net.settle(session)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: CkksKeys.generate(128, galois=True).public_context_bytes(), "Galois keys"),
        (lambda: CkksKeys.generate(128).secret_context_bytes(), "holds a secret key"),
        (lambda: CkksKeys.generate(192).public_context_bytes(), "N = 16384"),
        (lambda: b"\x0a\x05hello", "lacks its parameters"),
        (lambda: b"garbage\xff\xff", "not a TenSEAL context"),
    ],
    ids=["galois", "secret", "level-192", "no-public-part", "not-protobuf"],
)
def test_a_worker_reads_a_contexts_parts_before_seal_loads_it(make: Any, reason: str) -> None:
    with pytest.raises(ExecutorError, match=reason):
        inspect_context(make(), 128)
    for level in (128, 192, 256):  # what the owners make passes
        inspect_context(blind_keys(level).public_context_bytes(), level)
        assert len(CkksKeys.generate(level).public_context_bytes()) < max_context_bytes(level)
