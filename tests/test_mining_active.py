"""Blind mining against an active worker: it lies, replays and crafts ciphertexts.

Each attack is detected (``WorkerMisbehaved``, nothing of the answer decrypted) or
provably harmless, and the owner's messages to a worker never depend on its answers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import tenseal as ts

from dms.mining import Distance, WorkerMisbehaved
from dms.mining.blind_kmeans import (
    BlindClusterOwner,
    BlindClusterRound,
    BlindClusterWorker,
    blind_keys,
)
from dms.mining.blind_knn import BlindKnnOwner, BlindKnnWorker
from dms.mining.data import blobs, read_table
from dms.mining.plain import ClusteringParams, kmeans
from dms.mining.wire import Wire

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IRIS = read_table(EXAMPLES / "iris-features.csv").features
KEYS = blind_keys(128)

Tamper = Callable[[BlindClusterWorker, BlindClusterRound], BlindClusterRound]


class Decryptions:
    """Counts the owner's decryptions (to show a refused answer was never decrypted)."""

    def __init__(self, owner: BlindClusterOwner | BlindKnnOwner) -> None:
        self.count = 0
        keys = owner.keys
        assert keys is not None
        plain = keys.decrypt

        def counted(ciphertext: Any) -> np.ndarray:
            self.count += 1
            return plain(ciphertext)

        keys.decrypt = counted  # type: ignore[method-assign]


def run(owner: BlindClusterOwner, tamper: Tamper | None = None, wire: Wire | None = None) -> Wire:
    """The whole job through its byte encoding; ``tamper`` rewrites each answer."""
    wire = wire or Wire(keep_to_worker=True)
    worker = BlindClusterWorker(wire.to_worker(owner.start()))
    while True:
        answer = worker.round()
        if tamper is not None:
            answer = tamper(worker, answer)
        update = wire.to_worker(owner.receive(wire.to_owner(answer)))
        worker.update(update)
        if update.done:
            return wire


def blanked(value: Any) -> Any:
    """A message with every ciphertext replaced by a marker: what is left must be the
    same byte for byte, whatever the worker answered."""
    if isinstance(value, bytes):
        return b"ciphertext" if len(value) > 1000 else value
    if isinstance(value, list):
        return [blanked(v) for v in value]
    if isinstance(value, dict):
        return {k: blanked(v) for k, v in value.items()}
    return value


def transcript(wire: Wire) -> list[bytes]:
    return [
        msgpack.packb(blanked(msgpack.unpackb(raw, raw=False)), use_bin_type=True)
        for raw in wire.to_worker_log
    ]


def sizes(wire: Wire) -> list[int]:
    return [len(raw) for raw in wire.to_worker_log]


def shift_record(record: int, by: float) -> Tamper:
    """Adds ``by`` to one record's distance to cluster 0: its label may move."""

    def tamper(worker: BlindClusterWorker, answer: BlindClusterRound) -> BlindClusterRound:
        ctx = worker.context
        first = ts.ckks_vector_from(ctx, answer.ciphertexts[0][0])
        bump = np.zeros(worker.slots)
        bump[record] = by
        answer.ciphertexts[0][0] = (first + bump.tolist()).serialize()
        return answer

    return tamper


def owner_for(
    data: np.ndarray,
    k: int = 3,
    distance: Distance = Distance.EUCLIDEAN,
    shards: int = 1,
    **kw: Any,
) -> BlindClusterOwner:
    params = ClusteringParams(k, distance, min_error=0.0, max_iterations=12, shards=shards)
    return BlindClusterOwner(data, params, keys=KEYS, **kw)


# ---- no feedback channel ---------------------------------------------------------------


def test_the_owners_messages_do_not_depend_on_what_the_worker_returned() -> None:
    """An honest worker, one whose lie changes the labels and when k-means converges
    (the spot check looks elsewhere), and one whose answers are off by less than the
    noise: the owner sends the same messages, byte for byte once each ciphertext is
    blanked, in the same number and order, of sizes equal up to compression."""
    data, _ = blobs(120, 2, 3, seed=8, std=2.5)
    honest = owner_for(data)
    honest_wire = run(honest)

    liar = owner_for(data)
    liar.spot.sample = lambda n: np.array([0])  # type: ignore[method-assign]
    # Record 5 is pushed towards cluster 0 every round: its label and the run change.
    liar_wire = run(liar, shift_record(5, -50.0))
    assert liar.outcome().labels.tolist() != honest.outcome().labels.tolist()

    noisy = owner_for(data)
    noisy_wire = run(noisy, shift_record(7, noisy.tol / 4 if noisy.tol else 0.0))

    assert honest.outcome().iterations < honest.rounds  # dummy rounds were sent
    reference = transcript(honest_wire)
    assert len(reference) == 1 + honest.rounds
    for wire in (liar_wire, noisy_wire):
        assert transcript(wire) == reference
        for got, want in zip(sizes(wire), sizes(honest_wire), strict=True):
            assert abs(got - want) <= 0.01 * want


def test_a_crafted_answer_earns_no_bit_from_the_done_flag() -> None:
    """The attack of issue 25 on the old protocol: the worker keeps Enc(C_old) so
    nothing moves, plus a chosen record's value; the owner's answer said whether it was
    below a threshold. Now every update before round R carries centroids and round R
    says done, for any answer: the worker learns nothing, and the spot check catches
    the crafted distances (here every record is checked)."""
    owner = owner_for(IRIS, verify_fraction=1.0)
    worker = BlindClusterWorker(owner.start())
    answer = worker.round()
    ctx = worker.context
    record = np.zeros(worker.slots)
    record[149] = 1e3
    crafted = worker.columns[0][0] * record.tolist()  # lambda * x_149 in one slot, else 0
    answer.ciphertexts[0][0] = crafted.serialize()
    assert ts.ckks_vector_from(ctx, answer.ciphertexts[0][0]).size() == worker.slots
    with pytest.raises(WorkerMisbehaved, match="shard 0: distances of record") as caught:
        owner.receive(answer)
    assert caught.value.shard == 0
    assert owner.exchange == 0  # the owner's state is as before: a new worker redoes round 1


# ---- malformed answers: refused before any decryption -----------------------------------


def fresh(worker: BlindClusterWorker) -> bytes:
    """A ciphertext at the top level (two primes): the wrong level and size."""
    return worker.columns[0][0].serialize()


# The blind context encrypts only at the owner (symmetric keys): these two stand for a
# worker with ciphertexts from elsewhere, made here with the owner's context.
def other_scale(worker: BlindClusterWorker) -> bytes:
    vector = ts.ckks_vector(KEYS.context, [0.5] * worker.slots, scale=2**40)
    return (vector * vector).serialize()  # one prime, scale 2^30


def short_vector(worker: BlindClusterWorker) -> bytes:
    return ts.ckks_vector(KEYS.context, [0.5, 0.25, 0.125]).square().serialize()


def honest(worker: BlindClusterWorker) -> bytes:
    return (worker.columns[0][0] - worker.columns[1][0]).square().serialize()


def truncated(worker: BlindClusterWorker) -> bytes:
    return honest(worker)[:-100]


def padded(worker: BlindClusterWorker) -> bytes:
    return honest(worker) + b"\0" * 4096


def not_ckks(worker: BlindClusterWorker) -> bytes:
    return b"\x01" * 1000


@pytest.mark.parametrize(
    "make, reason",
    [
        (fresh, "primes|bytes"),
        (other_scale, "scale"),
        (short_vector, "slots"),
        (padded, "bytes"),
        (not_ckks, "not a CKKS ciphertext"),
        (truncated, "not a CKKS ciphertext"),
    ],
    ids=["top-level", "other-scale", "three-slots", "padded", "garbage", "truncated"],
)
def test_a_malformed_ciphertext_is_refused_and_never_decrypted(
    make: Callable[[BlindClusterWorker], bytes], reason: str
) -> None:
    owner = owner_for(IRIS)
    worker = BlindClusterWorker(owner.start())
    decryptions = Decryptions(owner)
    answer = worker.round()
    answer.ciphertexts[2][0] = make(worker)
    with pytest.raises(WorkerMisbehaved, match=reason):
        owner.receive(answer)
    assert decryptions.count == 0
    assert owner.exchange == 0


def test_an_answer_of_the_wrong_shape_is_refused() -> None:
    owner = owner_for(IRIS)
    worker = BlindClusterWorker(owner.start())
    answer = worker.round()
    # k x a "sums", the old protocol's second step, instead of k x chunks distances.
    sums = BlindClusterRound(exchange=1, ciphertexts=[row * 4 for row in answer.ciphertexts])
    with pytest.raises(WorkerMisbehaved, match="must be 3 x 1 ciphertexts"):
        owner.receive(sums)


# ---- replays and lies ---------------------------------------------------------------------


def test_a_replayed_answer_is_refused_and_a_renumbered_one_is_caught() -> None:
    owner = owner_for(IRIS, verify_fraction=0.02)  # 3 records checked per round
    worker = BlindClusterWorker(owner.start())
    first = worker.round()
    worker.update(owner.receive(first))
    with pytest.raises(WorkerMisbehaved, match="an answer for round 1 when round 2"):
        owner.receive(first)
    # The same distances under the new round's number: the centroids moved, so every
    # record's distances did, and any record checked shows it.
    renumbered = BlindClusterRound(exchange=2, ciphertexts=first.ciphertexts)
    with pytest.raises(WorkerMisbehaved, match="not what its data gives"):
        owner.receive(renumbered)
    owner.receive(worker.round())  # the honest answer is still taken


def test_after_convergence_a_replay_is_harmless() -> None:
    """In a dummy round the centroids are those of the round before: an old answer
    holds the right values, passes, and changes nothing the owner publishes."""
    data, _ = blobs(90, 2, 3, seed=3, std=0.5)
    owner = owner_for(data, verify_fraction=1.0)
    kept: list[BlindClusterRound] = []

    def replay_once_converged(worker: BlindClusterWorker, answer: BlindClusterRound) -> Any:
        if owner.converged and kept:
            return BlindClusterRound(exchange=answer.exchange, ciphertexts=kept[-1].ciphertexts)
        kept.append(answer)
        return answer

    run(owner, replay_once_converged)
    plain = kmeans(data, ClusteringParams(3, min_error=0.0, max_iterations=12))
    assert owner.outcome().labels.tolist() == plain.labels.tolist()
    assert owner.outcome().iterations == plain.iterations < owner.rounds


@pytest.mark.parametrize("distance", [Distance.EUCLIDEAN, Distance.MANHATTAN])
def test_one_records_shifted_distance_is_caught_when_checked(distance: Distance) -> None:
    owner = owner_for(IRIS, distance=distance, verify_fraction=1.0)
    with pytest.raises(WorkerMisbehaved, match="record 40 off by"):
        run(owner, shift_record(40, 0.5))


def test_the_detection_odds_are_reported() -> None:
    owner = owner_for(IRIS, verify_fraction=0.07)
    run(owner)
    report = owner.verification()
    assert report["verify_fraction"] == 0.07
    assert report["detection_per_round"] == pytest.approx(11 / 150, abs=1e-6)  # ceil(10.5)
    assert report["records_checked"] == 11 * owner.rounds
    assert report["rounds"] == 12


# ---- k-NN: the same checks ------------------------------------------------------------------


def knn_owner(**kw: Any) -> tuple[BlindKnnOwner, BlindKnnWorker, list[np.ndarray]]:
    table = read_table(EXAMPLES / "iris.csv", label=True)
    assert table.labels is not None
    owner = BlindKnnOwner(table.features[::2], table.labels[::2], 3, keys=KEYS, **kw)
    worker = BlindKnnWorker(owner.start())
    return owner, worker, owner.row_blocks(table.features[1::2])


def test_knn_answers_are_checked_before_decryption_and_spot_checked() -> None:
    owner, worker, blocks = knn_owner(verify_fraction=1.0)
    decryptions = Decryptions(owner)
    answer = worker.distances(owner.query_rows(blocks[0]))
    answer.distances[1][0] = answer.distances[1][0] + b"\0" * 4096
    with pytest.raises(WorkerMisbehaved, match="bytes"):
        owner.classify(answer)
    assert decryptions.count == 0
    # One training row's distance to one query, shifted: caught by the check in the clear.
    answer = worker.distances(owner.query_rows(blocks[0]))
    first = ts.ckks_vector_from(worker.context, answer.distances[2][0])
    bump = np.zeros(worker.slots)
    bump[30] = 0.25
    answer.distances[2][0] = (first + bump.tolist()).serialize()
    with pytest.raises(WorkerMisbehaved, match="record 30 off by"):
        owner.classify(answer)
    assert owner.verification()["detection_per_round"] == 1.0


# ---- DBSKMeans: the same schedule ------------------------------------------------------------


def test_dbskmeans_runs_the_announced_rounds_whatever_the_data() -> None:
    """Two data sets, one that converges quickly: the worker gets max_iterations
    updates in both, done only in the last."""
    from dms.mining import run_clustering
    from dms.mining.clustering import ClusterUpdate
    from dms.mining.wire import decode

    quick, _ = blobs(120, 2, 3, seed=4, std=0.2)
    slow, _ = blobs(120, 2, 3, seed=6, std=3.0)
    seen = []
    for data in (quick, slow):
        wire = Wire(keep_to_worker=True)
        result = run_clustering(
            "dbskmeans", data, ClusteringParams(3, max_iterations=9), keys=KEYS, wire=wire
        )
        updates = [decode(ClusterUpdate, raw) for raw in wire.to_worker_log[1:]]
        assert [u.done for u in updates] == [False] * 8 + [True]
        seen.append(result.iterations)
    assert seen[0] < 9  # converged early (OPE is keyed at random): the rest were dummy


# ---- only padded sizes travel ----------------------------------------------------------------


def test_a_blind_jobs_params_carry_only_padded_sizes(tmp_path: Path) -> None:
    """What providers see at bid time: records rounded up to whole ciphertexts (N/2 =
    4096 at level 128), queries up to whole blocks of 8; never the exact counts."""
    from dms.jobs.mining_params import MiningParams
    from dms.mining.placed import MiningSettings
    from dms.orchestrator.mining_owner import MiningRequest, plan

    params = MiningParams(algorithm="sknn", k=3, n=150, a=4, queries=30)
    assert (params.protocol, params.n, params.queries) == ("blind", 4096, 32)
    udm = MiningParams(algorithm="sknn", protocol="udm", k=3, n=150, a=4, queries=30)
    assert (udm.n, udm.queries) == (150, 30)  # udm ships U: its sizes are no secret

    settings = MiningSettings(algorithm="skmeans", k=3, shards=2, protocol="blind")
    request = MiningRequest(settings=settings, data=str(EXAMPLES / "iris-features.csv"))
    _, spec, sizes, _ = plan(request)
    assert sizes == [75, 75]
    assert [a.params["n"] for a in spec.allocations] == [4096, 4096]


# ---- --verify replicate -------------------------------------------------------------------


def test_replicated_workers_are_compared_in_full_and_the_liar_named() -> None:
    """Shard 0 runs on workers 0 and 2, shard 1 on 1 and 3. Worker 3 lies about one
    record the spot check does not look at; the comparison with worker 1 finds it, and
    the records recomputed in the clear say which of the two lied."""
    data, _ = blobs(200, 3, 3, seed=12, std=2.0)
    owner = owner_for(data, shards=2, replicas=2)
    owner.spot.sample = lambda n: np.array([0])  # type: ignore[method-assign]
    workers = [BlindClusterWorker(owner.start(w)) for w in range(4)]
    assert [w.chunks for w in workers] == [1, 1, 1, 1]
    answers = [w.round() for w in workers]
    answers[3] = shift_record(40, -0.3)(workers[3], answers[3])
    with pytest.raises(WorkerMisbehaved, match="shard 3: distances of record 140") as caught:
        owner.receive_shards(answers)
    assert caught.value.shard == 3 and owner.exchange == 0
    answers[3] = BlindClusterWorker(owner.start(3)).round()  # placed again: honest
    updates = owner.receive_shards(answers)
    assert len(updates) == 4
    assert owner.verification()["verify"] == "replicate"
    assert owner.verification()["detection_per_round"] == 1.0


def test_replicate_is_refused_where_it_cannot_run() -> None:
    from pydantic import ValidationError

    from dms.mining.placed import MiningSettings, shard_sizes

    settings = MiningSettings(algorithm="skmeans", k=3, shards=2, verify="replicate")
    assert shard_sizes(settings, 150) == [75, 75, 75, 75]
    with pytest.raises(ValidationError, match="replicate is for skmeans with the blind"):
        MiningSettings(algorithm="skmeans", k=3, protocol="udm", verify="replicate")


def test_knn_queries_do_not_depend_on_what_the_worker_returned() -> None:
    """The blocks of queries are fixed before any answer: an honest worker and one
    whose answers differ (below the noise, so unseen) get the same messages."""

    def transcript_of(shift: float) -> tuple[list[bytes], list[int]]:
        owner, worker, blocks = knn_owner()
        wire = Wire(keep_to_worker=True)
        wire.to_worker(owner.start())
        for block in blocks:
            answer = worker.distances(wire.to_worker(owner.query_rows(block)))
            first = ts.ckks_vector_from(worker.context, answer.distances[0][0])
            answer.distances[0][0] = (first + [shift] * worker.slots).serialize()
            owner.classify(wire.to_owner(answer))
        return transcript(wire), sizes(wire)

    honest, honest_sizes = transcript_of(0.0)
    other, other_sizes = transcript_of(1e-11)
    assert honest == other and len(honest) == 1 + 10  # start, then ceil(75 / 8) blocks
    for got, want in zip(other_sizes, honest_sizes, strict=True):
        assert abs(got - want) <= 0.01 * want


# ---- SKNN, protocol udm: its answers are spot-checked too -------------------------------------


def test_a_udm_knn_worker_gets_no_rank_oracle_on_the_training_rows() -> None:
    """The udm owner decrypts the worker's distances and sends back the k nearest indices.
    A worker that returns, instead, its encrypted training blocks with every attribute but
    the first zeroed would get back the k training rows with the smallest first attribute
    (any linear functional of the owner's rows, one per query). The owner recomputes a
    sample of each answer in the clear first, as the blind owner does."""
    from dms.mining.classification import KnnOwner, KnnWorker

    table = read_table(EXAMPLES / "iris.csv", label=True)
    assert table.labels is not None
    train, test = table.features[::2], table.features[1::2]
    owner = KnnOwner(train, table.labels[::2], 3)
    worker = KnnWorker(owner.start())
    a, rows = train.shape[1], owner.rows_per_block
    keep = np.zeros(a * rows)
    keep[:rows] = 1.0  # attribute 0 of every packed row
    block = owner.query_blocks(test)[0]
    answer = worker.distances(owner.query(block))
    crafted = [(b * keep.tolist()).serialize() for b in worker.blocks]
    answer.blocks = [list(crafted) for _ in answer.blocks]
    with pytest.raises(WorkerMisbehaved, match="off by"):
        neighbours, _ = owner.neighbours(answer)
        leaked = np.sort(train[neighbours.indices.array()[0], 0])
        smallest = np.sort(train[:, 0])[:3]
        assert not np.allclose(leaked, smallest), "the rows with the smallest attribute leaked"
    honest = worker.distances(owner.query(block))
    assert owner.neighbours(honest)[0].indices.array().shape == (len(block), 3)


# ---- DBSKMeans / SKMeans udm: the worker's labels and material are checked ------------------


def test_a_dbskmeans_worker_cannot_choose_the_centroids_its_next_ope_image_is_taken_from() -> None:
    """The DBSKMeans owner made the new centroids from the worker's labels and the
    weighted columns it decrypted, and sent OPE(D - C_new) under a fresh key. A worker
    that returned, instead, its own encryptions of far away values t and t + 1 (in one
    record's slot of each of two clusters) had C_new = (t, t + 1): every entry of U for those
    clusters fell in one OPE interval, where the map is affine, and the difference of the
    two gave its scale, so the next update handed it D[x][j] - D[0][0] for every record
    and attribute, to 1e-6. The owner now checks the labels against those the OPE image it
    sent gives, and the decrypted values against its own data, before anything is used."""
    from dms.mining.clustering import ClusterOwner, ClusterWorker
    from dms.mining.schemes.ckks import CkksKeys

    keys = CkksKeys.generate(128)
    data = IRIS
    n, a = data.shape
    owner = ClusterOwner(
        data, ClusteringParams(3, max_iterations=5), algorithm="dbskmeans", keys=keys
    )
    worker = ClusterWorker(owner.start())
    answer = worker.round()
    assert worker.context is not None
    t = 1e5
    labels = answer.labels.array()  # honest labels: only the weighted values lie
    first, second = int(np.flatnonzero(labels == labels[0])[0]), int(np.argmax(labels != labels[0]))
    near, far = int(labels[first]), int(labels[second])
    chosen = np.zeros(n)
    chosen[first], chosen[second] = t, t + 1  # C_new[near] = t, C_new[far] = t + 1
    honest_level = np.ones(n).tolist()  # x 1.0 brings it to the level of an honest answer
    crafted = (ts.ckks_vector(worker.context, chosen.tolist()) * honest_level).serialize()
    answer.weighted = [[crafted] for _ in range(a)]
    with pytest.raises(WorkerMisbehaved, match="shard 0: the weighted value of record"):
        update = owner.receive(answer)
        assert update.udm is not None
        image = update.udm.array()
        unit = np.median(image[:, far, :] - image[:, near, :])  # OPE's scale: the gap is 1
        read = -(image[:, near, :] - image[0, near, 0]) / unit * owner.scale
        leaked = np.allclose(read, data - data[0, 0], atol=1e-6)
        assert not leaked, "the owner's data, up to one offset, read from the next OPE image"
    assert owner.iteration == 0  # nothing of the lie was taken: a new worker redoes round 1
    honest = ClusterWorker(owner.start()).round()
    assert not owner.receive(honest).done


def liu_dbskmeans_first_round() -> tuple[Any, Any, Any]:
    """A DBSKMeans owner on Iris with a Liu key, its worker, and the worker's honest
    first answer (not yet received)."""
    from dms.mining.clustering import ClusterOwner, ClusterWorker
    from dms.mining.schemes.liu import LiuKey

    owner = ClusterOwner(
        IRIS,
        ClusteringParams(3, max_iterations=5),
        algorithm="dbskmeans",
        scheme="liu",
        keys=LiuKey.generate(128),
    )
    worker = ClusterWorker(owner.start())
    return owner, worker, worker.round()


def test_a_dbskmeans_worker_cannot_move_the_centroids_with_its_labels() -> None:
    """Labels other than those the OPE image gives are refused too: a worker that put
    one record alone in a cluster had that record for a centroid, and the next image's
    signs compared every record with it."""
    from dms.mining.arrays import NDArray

    owner, _, answer = liu_dbskmeans_first_round()
    labels = answer.labels.array()
    labels[77] = (labels[77] + 1) % 3
    answer.labels = NDArray.of(labels)
    with pytest.raises(WorkerMisbehaved, match="shard 0: the label of record 77"):
        owner.receive(answer)
    assert owner.iteration == 0


def test_a_liu_worker_cannot_have_its_chosen_shift_decrypted_into_the_centroids() -> None:
    """With Liu the owner took C_new = C_old - Dec(shift) for any shift the worker sent,
    e.g. 1000 times a record's ciphertext: the next OPE image compared every record with
    that chosen multiple. The decrypted shift is now checked against the owner's own."""
    from dms.mining.arrays import NDArray

    owner, worker, answer = liu_dbskmeans_first_round()
    assert answer.shift is not None
    shift = answer.shift.array()
    shift[0] = worker.encrypted[0] * -1000.0  # C_new[0] = C_old[0] + 1000 x D[0]
    answer.shift = NDArray.of(shift)
    with pytest.raises(WorkerMisbehaved, match="shard 0: the shift"):
        owner.receive(answer)
    assert owner.iteration == 0


def test_a_dbskmeans_worker_placed_again_gets_the_image_its_predecessor_had() -> None:
    """Each OPE image of U under a fresh key is one more view of the same values: with
    the map piecewise linear, images whose breakpoints fall in different places join into
    |U| up to one scale. A worker that dropped (or a set of peers that took turns) had
    the owner encrypt the round's U again under a new key at each placement. A worker
    placed again mid-round now gets the image already made for that shard and round."""
    from dms.mining.clustering import ClusterOwner, ClusterWorker

    owner = ClusterOwner(
        IRIS,
        ClusteringParams(3, max_iterations=5, shards=2),
        algorithm="dbskmeans",
        scheme="ckks",
        keys=KEYS,
    )
    first = [owner.start(i) for i in range(2)]
    again = owner.start(1)
    assert again.udm == first[1].udm  # the same bytes: nothing new to a second peer
    workers = [ClusterWorker(s) for s in first]
    updates = owner.receive_shards([w.round() for w in workers])
    replaced = owner.start(0)  # placed again after round 1: the image of round 2
    assert updates[0].udm is not None and replaced.udm == updates[0].udm
    assert replaced.iteration == 1


def test_a_dbskmeans_worker_gets_one_image_of_the_final_u_across_the_dummy_rounds() -> None:
    """After k-means converged, each dummy round sent the final U under a fresh OPE key:
    R - t images of one U, whose linear pieces, breakpoints elsewhere each time, join into
    |U| across intervals. A dummy round now resends the image of the round before, byte
    for byte (same size, same schedule), and a worker placed again during the dummy rounds
    gets that same image. Real FDH-OPE keys, Iris, two shards, R well past convergence."""
    from dms.mining.clustering import ClusterOwner, ClusterUpdate, ClusterWorker
    from dms.mining.wire import encode

    rounds = 12
    owner = ClusterOwner(
        IRIS,
        ClusteringParams(3, max_iterations=rounds, shards=2),
        algorithm="dbskmeans",
        scheme="ckks",
        keys=KEYS,
    )
    workers = [ClusterWorker(owner.start(i)) for i in range(2)]
    sent: list[list[bytes]] = []  # per round: each shard's update, as it travels
    converged_at = None
    replaced = 0
    while True:
        updates = owner.receive_shards([w.round() for w in workers])
        sent.append([encode(u) for u in updates])
        if owner.converged and converged_at is None:
            converged_at = owner.iteration
        if updates[0].done:
            break
        for worker, update in zip(workers, updates, strict=True):
            worker.update(update)
        if converged_at is not None and owner.iteration == converged_at + 2:
            again = owner.start(1)  # shard 1's worker placed again mid dummy rounds
            assert again.udm == updates[1].udm  # its predecessor's image, the same bytes
            workers[1] = ClusterWorker(again)
            replaced += 1
    assert len(sent) == rounds  # the announced schedule, done only in the last
    assert converged_at is not None and converged_at <= rounds - 3, "no dummy rounds to look at"
    assert replaced == 1
    final = sent[converged_at - 1 : rounds - 1]  # the updates carrying OPE(D - C_final)
    for shard in range(2):
        images = {raw for raw in (r[shard] for r in final)}
        assert len(images) == 1, f"shard {shard}: {len(images)} images of the final U"
    sizes = {len(r[shard]) for r in sent[: rounds - 1] for shard in range(2)}
    assert len(sizes) == 1  # every update of the job the same size, dummy or not
    from dms.mining.wire import decode

    assert [decode(ClusterUpdate, r[0]).done for r in sent] == [False] * (rounds - 1) + [True]
