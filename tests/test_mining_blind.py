"""Blind k-means and k-NN: the plaintext answers, and nothing but ciphertexts at the worker."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import tenseal as ts

from dms.mining import Distance, MiningError, WorkerMisbehaved, run_classification, run_clustering
from dms.mining.blind_kmeans import (
    BlindClusterOwner,
    BlindClusterStart,
    BlindClusterUpdate,
    BlindClusterWorker,
    blind_keys,
)
from dms.mining.blind_knn import BlindKnnOwner, BlindKnnWorker, nearest_with_ties
from dms.mining.data import blobs, classification, read_table
from dms.mining.plain import ClusteringParams, kmeans, knn
from dms.mining.schemes.ckks import load_public_context
from dms.mining.schemes.liu import LiuKey
from dms.mining.wire import Wire, decode, encode

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IRIS = read_table(EXAMPLES / "iris-features.csv").features
IRIS_LABELLED = read_table(EXAMPLES / "iris.csv", label=True)
KEYS = blind_keys(128)  # one context for the module: key generation is the slow part


def datasets() -> list[tuple[str, np.ndarray, int]]:
    small, _ = blobs(400, 6, 4, seed=3, std=1.5)
    thousands, _ = blobs(300, 5, 3, seed=4, std=150.0, spread=2000.0, offset=5000.0)
    return [("iris", IRIS, 3), ("blobs", small, 4), ("thousands", thousands, 3)]


def run_blind_kmeans(
    owner: BlindClusterOwner,
    wire: Wire | None = None,
    seen: Callable[[BlindClusterOwner], None] | None = None,
) -> BlindClusterWorker:
    wire = wire or Wire()
    worker = BlindClusterWorker(wire.to_worker(owner.start()))
    while True:
        if seen:
            seen(owner)
        update = wire.to_worker(owner.receive(wire.to_owner(worker.round())))
        worker.update(update)
        if update.done:
            return worker


# ---- same answers as in the clear ------------------------------------------------------


@pytest.mark.parametrize("distance", [Distance.EUCLIDEAN, Distance.MANHATTAN])
@pytest.mark.parametrize("init, seed", [("first", None), ("kmeans++", 5)])
@pytest.mark.parametrize("name, data, k", datasets(), ids=lambda v: v if isinstance(v, str) else "")
def test_blind_kmeans_gives_the_plain_labels(
    distance: Distance, init: str, seed: int | None, name: str, data: np.ndarray, k: int
) -> None:
    plain = kmeans(data, ClusteringParams(k, distance=distance, init=init, seed=seed))
    owner = BlindClusterOwner(
        data, ClusteringParams(k, distance=distance, init=init, seed=seed), keys=KEYS
    )
    run_blind_kmeans(owner)
    out = owner.outcome()
    # Near-ties are counted, one figure per iteration, and on these sets none flipped.
    assert len(owner.near_ties) == out.iterations and all(t >= 0 for t in owner.near_ties)
    assert out.labels.tolist() == plain.labels.tolist()
    assert (out.iterations, out.converged) == (plain.iterations, plain.converged)
    assert np.allclose(out.centroids, plain.centroids, rtol=1e-5, atol=1e-6)


def test_run_clustering_defaults_to_blind_for_ckks_and_reports_near_ties() -> None:
    plain = run_clustering("kmeans", IRIS, ClusteringParams(3))
    blind = run_clustering("skmeans", IRIS, ClusteringParams(3), keys=KEYS)
    udm = run_clustering("skmeans", IRIS, ClusteringParams(3), keys=KEYS, protocol="udm")
    liu = run_clustering("skmeans", IRIS, ClusteringParams(3), scheme="liu")
    assert (blind.protocol, udm.protocol, liu.protocol, plain.protocol) == (
        "blind",
        "udm",
        "udm",
        "plain",
    )
    assert blind.labels == udm.labels == liu.labels == plain.labels
    assert blind.near_ties is not None and udm.near_ties is None
    assert blind.summary()["near_ties"] == blind.near_ties
    x, y = classification(60, 3, 2, seed=3)
    sknn = run_classification("sknn", x[:50], list(y[:50]), x[50:], 3, keys=KEYS)
    assert sknn.protocol == "blind" and sknn.labels == knn(x[:50], list(y[:50]), x[50:], 3)


def test_blind_kmeans_on_shards_and_with_a_worker_placed_again() -> None:
    data, _ = blobs(300, 3, 3, seed=11, std=2.0)
    plain = kmeans(data, ClusteringParams(3))
    owner = BlindClusterOwner(data, ClusteringParams(3, shards=3), keys=KEYS)
    wire = Wire()
    workers = [BlindClusterWorker(wire.to_worker(owner.start(i))) for i in range(3)]
    exchanges = 0
    while True:
        answers = [wire.to_owner(w.round()) for w in workers]
        updates = owner.receive_shards(answers)
        exchanges += 1
        if updates[0].done:
            break
        for worker, update in zip(workers, updates, strict=True):
            worker.update(wire.to_worker(update))
        if exchanges in (1, 2):  # shard 1's worker is lost: once before sums, once before distances
            workers[1] = BlindClusterWorker(wire.to_worker(owner.start(1)))
            assert workers[1].exchange == exchanges
    assert owner.outcome().labels.tolist() == plain.labels.tolist()
    with pytest.raises(MiningError, match="finished"):
        owner.start(0)


def test_the_owner_refuses_answers_out_of_step() -> None:
    owner = BlindClusterOwner(IRIS, ClusteringParams(3), keys=KEYS)
    worker = BlindClusterWorker(owner.start())
    first = worker.round()
    owner.receive(first)
    with pytest.raises(WorkerMisbehaved, match="an answer for round 1 when round 2 was asked"):
        owner.receive(first)  # replayed
    with pytest.raises(MiningError, match="has not arrived"):
        worker.round()


def assert_same_except_counted_ties(
    plain: list[Any], blind: list[Any], tied: list[bool], allowed: int = 0
) -> None:
    differ = [a != b for a, b in zip(plain, blind, strict=True)]
    assert len(tied) == len(plain)
    assert not any(d and not t for d, t in zip(differ, tied, strict=True))
    assert sum(differ) <= max(allowed, sum(tied))


@pytest.mark.parametrize("distance", [Distance.EUCLIDEAN, Distance.MANHATTAN])
@pytest.mark.parametrize("k", [1, 5])
def test_blind_knn_gives_the_plain_predictions(distance: Distance, k: int) -> None:
    x, y = classification(232, 5, 3, seed=9)
    labels = [f"c{v}" for v in y]
    train, test, train_labels = x[:200], x[200:], labels[:200]
    owner = BlindKnnOwner(train, train_labels, k, distance=distance, keys=KEYS)
    worker = BlindKnnWorker(owner.start())
    predictions = []
    for block in owner.query_blocks(test):
        predictions += owner.classify(worker.distances(owner.query(block)))
    plain = knn(train, train_labels, test, k, distance=distance)
    assert_same_except_counted_ties(plain, predictions, owner.tied)
    assert owner.near_ties == sum(owner.tied)


def test_blind_knn_on_iris_counts_its_ties() -> None:
    table = IRIS_LABELLED
    assert table.labels is not None
    train, test, train_labels = table.features[::2], table.features[1::2], table.labels[::2]
    owner = BlindKnnOwner(train, train_labels, 3, keys=KEYS)
    worker = BlindKnnWorker(owner.start())
    predictions = []
    for block in owner.row_blocks(test):
        predictions += owner.classify(worker.distances(owner.query_rows(block)))
    # Iris is full of exact ties (one-decimal data): they are counted, ranked again in
    # the clear on the rows as given, and the predictions are plaintext knn's.
    assert owner.near_ties > 5
    assert predictions == knn(train, train_labels, test, 3)


def test_blind_knn_on_shards_ranks_as_one_worker() -> None:
    x, y = classification(140, 4, 3, seed=2)
    train, test, labels = x[:120], x[120:], [int(v) for v in y[:120]]
    one = BlindKnnOwner(train, labels, 3, keys=KEYS)
    many = BlindKnnOwner(train, labels, 3, keys=KEYS, shards=4, block=5)
    w1 = BlindKnnWorker(one.start())
    ws = [BlindKnnWorker(many.start(i)) for i in range(4)]
    p1, ps = [], []
    for block in one.query_blocks(test):
        p1 += one.classify(w1.distances(one.query(block)))
    for block in many.query_blocks(test):
        query = many.query(block)
        indices, _ = many.neighbours_shards([w.distances(query) for w in ws])
        ps += many.vote(indices)
    assert p1 == ps == knn(train, labels, test, 3)


def test_near_ties_go_by_index_as_exact_ties_do_in_the_clear() -> None:
    dist = np.array([[0.5, 0.2 + 4e-7, 0.2, 0.9], [0.1, 0.3, 0.2, 0.4]])
    indices, tied = nearest_with_ties(dist, 2, 1e-6)
    assert indices.tolist() == [[1, 2], [0, 2]]
    assert tied.tolist() == [True, False]


# ---- what may be asked, and what is refused --------------------------------------------


def test_protocols_that_cannot_be_blind_are_refused_with_a_reason() -> None:
    with pytest.raises(MiningError, match="not IND-CPA"):
        run_clustering("skmeans", IRIS, ClusteringParams(3), scheme="liu", protocol="blind")
    with pytest.raises(MiningError, match="not IND-CPA"):
        run_classification("sknn", IRIS, [0] * 150, IRIS[:2], 3, scheme="liu", protocol="blind")
    with pytest.raises(MiningError, match="double-blind"):
        run_clustering("dbskmeans", IRIS, ClusteringParams(3), protocol="blind")
    with pytest.raises(MiningError, match="unknown protocol"):
        run_clustering("skmeans", IRIS, ClusteringParams(3), protocol="secret")
    with pytest.raises(MiningError, match="in the clear"):
        run_clustering("kmeans", IRIS, ClusteringParams(3), protocol="blind")
    with pytest.raises(MiningError, match="CKKS only"):
        BlindClusterOwner(IRIS, ClusteringParams(3), keys=LiuKey.generate(128))  # type: ignore[arg-type]
    assert (
        run_clustering("dbskmeans", IRIS, ClusteringParams(3, seed=1, init="kmeans++")).protocol
        == "udm"
    )


def test_worker_classes_never_touch_secret_material() -> None:
    from dms.mining import blind_kmeans, blind_knn

    for module, worker in ((blind_kmeans, "BlindClusterWorker"), (blind_knn, "BlindKnnWorker")):
        tree = ast.parse(inspect.getsource(getattr(module, worker)))
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not names & {"decrypt", "secret_key", "secret_context_bytes", "keys", "labels"}


# ---- what the worker receives ------------------------------------------------------------


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values[i] in sorted_set, for millions of values: a 2^24-entry filter on the low bits,
    then an exact look-up of the few candidates."""
    out = np.zeros(len(values), dtype=bool)
    if not len(sorted_set):
        return out
    low = np.uint64(2**24 - 1)
    table = np.zeros(2**24, dtype=bool)
    table[(sorted_set & low).astype(np.int64)] = True
    candidates = np.flatnonzero(table[(values & low).astype(np.int64)])
    at = np.searchsorted(sorted_set, values[candidates]).clip(max=len(sorted_set) - 1)
    out[candidates] = sorted_set[at] == values[candidates]
    return out


class Patterns:
    """Encodings of plaintext values to search for in bytes: float64 (both byte orders),
    float32 pairs, integer windows, and decimal text."""

    def __init__(self) -> None:
        self.words: dict[int, str] = {}  # one 8-byte word (little-endian uint64) -> what
        self.grams: dict[tuple[int, ...], str] = {}  # four consecutive 8-byte words
        self.texts: dict[str, str] = {}

    def floats(self, what: str, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        for v in values.ravel():
            if v != 0 and not float(v).is_integer():  # 0.0 and small integers are in headers
                for order in ("<f8", ">f8"):
                    self.words[int(np.array(v, order).view("<u8"))] = what
                text = repr(float(v))
                if len(text) >= 7:
                    self.texts[text] = what
        rows = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values[None, :]
        for row in rows:
            for order in ("<f4", ">f4"):
                r = row.astype(order)
                for j in range(len(r) - 1):
                    if r[j] != 0 or r[j + 1] != 0:
                        self.words[int(r[j : j + 2].view("<u8")[0])] = what + " (float32)"
            if len(row) > 1:
                for fmt in ("{}", "{:.6f}", "{:.2f}"):
                    text = ",".join(fmt.format(float(v)) for v in row)
                    if len(text) >= 7:
                        self.texts[text] = what + " (decimal)"
                        self.texts[text.replace(",", ", ")] = what + " (decimal)"

    def integers(self, what: str, values: Iterable[int]) -> None:
        """Windows of 32 bytes of consecutive integers as int8/16/32/64, float32/64, and
        decimal text (short or zero-filled runs of small integers are in any header)."""
        array = np.asarray(list(values), dtype=np.int64)
        for dtype in ("<u1", "<i2", "<i4", "<i8", "<f4", ">f4", "<f8", ">f8"):
            per = 32 // np.dtype(dtype).itemsize
            for i in range(0, len(array) - per + 1):
                gram = tuple(int(w) for w in array[i : i + per].astype(dtype).view("<u8"))
                if len(set(gram)) > 1 and 0 not in gram:  # zero words are in every header
                    self.grams[gram] = f"{what} ({dtype})"
        for i in range(0, len(array) - 8 + 1):
            window = array[i : i + 8].tolist()
            if len(set(window)) > 1:
                self.texts[",".join(map(str, window))] = f"{what} (decimal)"

    def found(self, blobs: Iterable[bytes]) -> set[str]:
        hits: set[str] = set()
        words = np.array(sorted(self.words), dtype=np.uint64)
        firsts = np.array(sorted({g[0] for g in self.grams}), dtype=np.uint64)
        digits = re.compile(rb"[-0-9.,eE ]{5,}")
        for blob in blobs:
            for offset in range(8):
                usable = (len(blob) - offset) // 8
                view = np.frombuffer(blob, dtype="<u8", count=usable, offset=offset)
                for at in np.flatnonzero(_member(view, words)):
                    hits.add(self.words[int(view[at])])
                for at in np.flatnonzero(_member(view, firsts)):
                    gram = tuple(int(w) for w in view[at : at + 4])
                    if gram in self.grams:
                        hits.add(self.grams[gram])
            runs = b"|".join(digits.findall(blob)).decode("ascii")
            hits.update(what for text, what in self.texts.items() if text in runs)
        return hits


def kmeans_patterns(data: np.ndarray, owner: BlindClusterOwner, history: list[Any]) -> Patterns:
    """D, U = D - C and C for every round's centroids (in the data's units, and scaled as
    the udm and the blind owners scale them), and every round's labels."""
    patterns = Patterns()
    peak = np.abs(data).max()  # the udm owner's scaling
    for transform in (
        lambda v: v,
        lambda v: v / peak,
        lambda v: (v - owner.offset) / owner.scale,  # the blind owner's
    ):
        d = transform(data)
        patterns.floats("D", d)
        for centroids, labels in history:
            c = transform(centroids)
            patterns.floats("C", c)
            patterns.floats("U", d[:, None, :] - c[None, :, :])
            patterns.integers("labels", labels)
    return patterns


def plain_history(data: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centroids used, labels given) for each iteration of plaintext k-means."""
    out = []
    for rounds in range(1, kmeans(data, ClusteringParams(k)).iterations + 1):
        before = (
            kmeans(data, ClusteringParams(k, max_iterations=rounds - 1)).centroids
            if rounds > 1
            else data[:k]
        )
        out.append((before, kmeans(data, ClusteringParams(k, max_iterations=rounds)).labels))
    return out


def check_blind_fields(raw: bytes, slots: int) -> None:
    """Every field of a message to the worker: a CKKS ciphertext of ``slots`` slots, the
    public context, or a size or name known before any data is read."""
    message = msgpack.unpackb(raw, raw=False)
    allowed_ints = {"k", "attributes", "chunks", "slots", "exchange", "rounds", "block"}
    allowed_names = {"protocol": {"blind"}, "distance": {"euclidean", "manhattan"}}
    if "context" in message:
        assert not load_public_context(message["context"]).has_galois_keys()
    for field, value in message.items():
        if field in allowed_ints:
            assert isinstance(value, int) and not isinstance(value, bool)
        elif field in allowed_names:
            assert value in allowed_names[field]
        elif field == "done":
            assert isinstance(value, bool)
        elif field == "context":
            assert isinstance(value, bytes)
        else:  # every other field: a table of ciphertexts
            assert field in {"columns", "centroids", "queries"}, field
            assert isinstance(value, list) and all(isinstance(row, list) for row in value)
            for row in value:
                for cipher in row:
                    assert isinstance(cipher, bytes)
                    assert ts.ckks_vector_from(CONTEXT, cipher).size() == slots


CONTEXT = load_public_context(KEYS.public_context_bytes())


def test_the_blind_kmeans_worker_receives_ciphertexts_only_and_the_udm_worker_does_not() -> None:
    data, _ = blobs(150, 4, 3, seed=22, std=1.0)  # three iterations
    k = 3
    history = plain_history(data, k)
    wire = Wire(keep_to_worker=True)
    owner = BlindClusterOwner(data, ClusteringParams(k), keys=KEYS)
    run_blind_kmeans(owner, wire)
    assert owner.outcome().labels.tolist() == history[-1][1].tolist()
    patterns = kmeans_patterns(data, owner, history)
    assert len(wire.to_worker_log) == 1 + owner.rounds  # start, then centroids ..., done
    for raw in wire.to_worker_log:
        check_blind_fields(raw, KEYS.slots)
    assert patterns.found(wire.to_worker_log) == set()

    # Positive control: the same search, on what the udm protocol sends its worker.
    udm = Wire(keep_to_worker=True)
    run_clustering("skmeans", data, ClusteringParams(k), keys=KEYS, protocol="udm", wire=udm)
    assert "U" in patterns.found(udm.to_worker_log)
    # ... and each kind of encoding, placed in a message, is found.
    label_rows = np.array([history[0][1]])
    for field, value in (("D", data), ("C", history[-1][0]), ("labels", label_rows)):
        for encoded in (
            encode(BlindClusterUpdate(exchange=1, done=False)) + value.astype("<f8").tobytes(),
            msgpack.packb(value.tolist()),
            ",".join(str(v) for v in value.ravel().tolist()).encode(),
            value.astype(">f4").tobytes(),
        ):
            found = patterns.found([b"\x8f" * 13 + encoded])
            assert any(hit.startswith(field) for hit in found), (field, encoded[:40])


def test_the_blind_knn_worker_receives_no_labels_no_indices_and_no_rows() -> None:
    x, y = classification(110, 4, 3, seed=5)
    train, test, labels = x[:100], x[100:], [int(v) for v in y[:100]]
    wire = Wire(keep_to_worker=True)
    result = run_classification("sknn", train, labels, test, 3, keys=KEYS, wire=wire)
    assert result.labels == knn(train, labels, test, 3)
    patterns = Patterns()
    patterns.floats("train", train)
    patterns.floats("test", test)
    patterns.integers("labels", labels)
    dist = ((test[:, None, :] - train[None, :, :]) ** 2).sum(axis=2)
    neighbours = np.argsort(dist, axis=1, kind="stable")[:, :3]
    patterns.integers("indices", neighbours.ravel())
    for raw in wire.to_worker_log:
        check_blind_fields(raw, KEYS.slots)
    assert patterns.found(wire.to_worker_log) == set()

    udm = Wire(keep_to_worker=True)
    run_classification("sknn", train, labels, test, 3, keys=KEYS, protocol="udm", wire=udm)
    found = patterns.found(udm.to_worker_log)
    assert any(h.startswith("labels") for h in found)
    assert any(h.startswith("indices") for h in found)


def test_the_worker_does_the_same_work_whatever_the_data() -> None:
    """Same steps, same numbers of ciphertexts, every round and for two data sets of one
    shape; the ciphertexts' byte sizes differ by their compression only."""

    def trace(data: np.ndarray) -> list[tuple[Any, ...]]:
        wire = Wire(keep_to_worker=True)
        owner = BlindClusterOwner(
            data, ClusteringParams(3, max_iterations=4, min_error=0.0), keys=KEYS
        )
        run_blind_kmeans(owner, wire)
        shapes = []
        for raw in wire.to_worker_log[1:]:
            update = decode(BlindClusterUpdate, raw)
            table = update.centroids
            sizes = [len(c) for row in table for c in row]
            shapes.append((update.done, len(table), len(table[0]) if table else 0, sizes))
        start = decode(BlindClusterStart, wire.to_worker_log[0])
        return [(start.k, start.attributes, start.chunks, start.rounds), *shapes]

    one, _ = blobs(200, 3, 3, seed=1, std=1.0)
    other, _ = blobs(200, 3, 3, seed=2, std=5.0, offset=100.0)
    a, b = trace(one), trace(other)
    assert [s[:3] for s in a] == [s[:3] for s in b]
    steps = [s[0] for s in a[1:]]
    assert steps == [False] * 3 + [True]
    sizes = [size for s in a[1:] + b[1:] for size in s[3]]
    assert max(sizes) <= 1.01 * min(sizes)


# ---- keys, precision and reach -------------------------------------------------------


def test_blind_keys_are_precise_and_keep_in_a_key_folder(tmp_path: Path) -> None:
    from dms.mining.blind_kmeans import calibrate
    from dms.mining.keyfolder import load_keys, save_keys
    from dms.mining.schemes.ckks import CkksKeys

    assert calibrate(KEYS, 8, 1.0) < 1e-8  # 8 x the largest error of a squared distance
    assert calibrate(CkksKeys.generate(128), 8, 1.0) > 1e-6  # the reference parameters
    save_keys(tmp_path / "keys", KEYS, lambda raw, _name: raw)
    loaded = load_keys(tmp_path / "keys", lambda raw, _name: raw)
    assert isinstance(loaded, CkksKeys)
    owner = BlindClusterOwner(IRIS, ClusteringParams(3), keys=loaded)
    run_blind_kmeans(owner)
    assert owner.outcome().labels.tolist() == kmeans(IRIS, ClusteringParams(3)).labels.tolist()


def test_a_query_beyond_the_ckks_reach_is_refused_unless_given_up_front() -> None:
    x, y = classification(60, 3, 2, seed=3)
    far = x[50:] * 1e4
    owner = BlindKnnOwner(x[:50], list(y[:50]), 3, keys=KEYS)
    with pytest.raises(MiningError, match="overflow"):
        owner.query_blocks(far)
    result = run_classification("sknn", x[:50], list(y[:50]), far, 3, keys=KEYS)
    assert result.labels == knn(x[:50], list(y[:50]), far, 3)


# ---- the labels of scikit-learn's KMeans ---------------------------------------------------


def sklearn_kmeans(data: np.ndarray, init: np.ndarray) -> Any:
    """scikit-learn's Lloyd k-means from the same initial centroids, one run, run to a
    fixed point (tol = 0). Its k-means++ is greedy and draws from its own generator, so
    "the same init" is ours, handed over as an array."""
    cluster = pytest.importorskip("sklearn.cluster")
    k = init.shape[0]
    return cluster.KMeans(k, init=init, n_init=1, algorithm="lloyd", tol=0.0, max_iter=300).fit(
        data
    )


def blind_to_convergence(data: np.ndarray, k: int, init: str, seed: int | None) -> Any:
    owner = BlindClusterOwner(
        data, ClusteringParams(k, init=init, seed=seed, min_error=0.0, max_iterations=20), keys=KEYS
    )
    run_blind_kmeans(owner)
    return owner


@pytest.mark.parametrize("seed", range(10))
def test_blind_labels_are_sklearns_on_iris_with_kmeans_plus_plus(seed: int) -> None:
    from dms.mining.plain import initial_centroids

    reference = sklearn_kmeans(IRIS, initial_centroids(IRIS, 3, "kmeans++", seed))
    out = blind_to_convergence(IRIS, 3, "kmeans++", seed).outcome()
    assert out.converged
    assert out.labels.tolist() == reference.labels_.tolist()
    assert out.iterations == reference.n_iter_
    assert np.allclose(out.centroids, reference.cluster_centers_, rtol=0, atol=1e-12)


@pytest.mark.parametrize("init, seed", [("first", None), ("kmeans++", 1)])
def test_blind_labels_are_sklearns_with_one_record_at_a_million(
    init: str, seed: int | None
) -> None:
    """Every other distance falls below the CKKS noise: all are decided in the clear."""
    from dms.mining.plain import initial_centroids

    data, _ = blobs(300, 2, 4, seed=2, std=1.0)
    data[10] = 1e6
    reference = sklearn_kmeans(data, initial_centroids(data, 4, init, seed))
    owner = blind_to_convergence(data, 4, init, seed)
    out = owner.outcome()
    assert out.labels.tolist() == reference.labels_.tolist()
    assert out.iterations == reference.n_iter_
    assert np.allclose(out.centroids, reference.cluster_centers_, rtol=1e-12, atol=1e-9)
    assert sum(owner.near_ties) > 0
