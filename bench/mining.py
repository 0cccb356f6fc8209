"""Encrypted mining vs its plaintext baseline, measured in the same run.

One JSON line per case (with --json): ``algorithm, scheme, n, a, k, plain_s,
enc_s, ratio, agreement`` for n = 1,000 and 10,000 records, a = 8, k = 5.
Clustering compares with k-means on the same data and settings (first-k
initialization); ``agreement`` is the fraction of equal labels, or the
adjusted Rand index for DBSKMeans (``agreement_metric`` says which). SKNN
classifies ``n_test`` queries against n training records. The case
``sknn_naive_vs_packed`` times CKKS distances computed the reference system's
way (one ciphertext per record, a slot-sum per pair) against the packed way on
the same data, and reports ``speedup``.

Blind protocols (``--case``; the worker sees only CKKS ciphertexts, see specs/mining.md):
``skmeans_blind`` and ``sknn_blind`` print ``n, a, k, plain_s, enc_s, ratio,
owner_cpu_s, worker_cpu_s, mb_per_round, rounds, agreement`` for n = 10,000, a = 8
and n = 100,000, a = 2 (k = 5; SKNN: ``n_test`` queries against n training rows; a
round is one round trip: a k-means iteration or a dummy round of the announced
schedule, or one block of queries). ``skmeans_blind`` adds
``owner_cpu_s_per_iteration`` (the owner's CPU in a round that is a k-means
iteration), ``plain_s_per_iteration`` (a whole plaintext k-means iteration),
``round_trips_per_iteration``, ``verify_fraction`` and ``detection_per_round``.
``blind_fold`` times the two places to fold the masked sums' slots of the previous
protocol (owner after decryption, worker by rotations); ``blind_sign`` measures what
a non-interactive round (argmin by polynomial sign approximation) would cost and how
precise it is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import tenseal as ts

from dms.mining import run_classification, run_clustering
from dms.mining.blind_kmeans import (
    MAGNITUDE_BUDGET,
    BlindClusterOwner,
    BlindClusterWorker,
    blind_keys,
    load_vectors,
    pack_columns,
)
from dms.mining.blind_knn import BlindKnnOwner, BlindKnnWorker
from dms.mining.classification import KnnOwner, KnnWorker
from dms.mining.data import blobs
from dms.mining.metrics import adjusted_rand_index
from dms.mining.plain import ClusteringParams, kmeans, knn
from dms.mining.schemes.ckks import CkksKeys, load_public_context
from dms.mining.wire import Wire

A, K = 8, 5


def emit(figures: dict[str, object], as_json: bool) -> None:
    print(json.dumps(figures) if as_json else "  ".join(f"{k}={v}" for k, v in figures.items()))
    sys.stdout.flush()


def clustering_cases(n: int, as_json: bool) -> None:
    data, _ = blobs(n, A, K, seed=n, std=2.0)
    plain = run_clustering("kmeans", data, ClusteringParams(K))
    for algorithm in ("skmeans", "dbskmeans"):
        for scheme in ("liu", "ckks"):
            secure = run_clustering(algorithm, data, ClusteringParams(K), scheme=scheme)
            if algorithm == "skmeans":
                same = np.array(secure.labels) == np.array(plain.labels)
                agreement, metric = float(same.mean()), "labels"
            else:
                agreement, metric = adjusted_rand_index(secure.labels, plain.labels), "ari"
            emit(
                {
                    "algorithm": algorithm,
                    "scheme": scheme,
                    "n": n,
                    "a": A,
                    "k": K,
                    "plain_s": round(plain.timings.total, 4),
                    "enc_s": round(secure.timings.total, 4),
                    "ratio": round(secure.timings.total / plain.timings.total, 1),
                    "agreement": round(agreement, 4),
                    "agreement_metric": metric,
                    "iterations": secure.iterations,
                    "plain_iterations": plain.iterations,
                    "mb_to_worker": round(secure.bytes_to_worker / 1e6, 2),
                },
                as_json,
            )


def classification_cases(n: int, n_test: int, as_json: bool) -> None:
    x, y = blobs(n + n_test, A, 3, seed=n + 1, std=4.0)
    labels = [f"c{v}" for v in y]
    train, test, train_labels = x[:n], x[n:], labels[:n]
    plain = run_classification("knn", train, train_labels, test, K)
    for scheme in ("liu", "ckks"):
        secure = run_classification("sknn", train, train_labels, test, K, scheme=scheme)
        agreement = float(
            np.mean([a == b for a, b in zip(plain.labels, secure.labels, strict=True)])
        )
        emit(
            {
                "algorithm": "sknn",
                "scheme": scheme,
                "n": n,
                "a": A,
                "k": K,
                "n_test": n_test,
                "plain_s": round(plain.timings.total, 4),
                "enc_s": round(secure.timings.total, 4),
                "ratio": round(secure.timings.total / plain.timings.total, 1),
                "agreement": round(agreement, 4),
                "agreement_metric": "predictions",
            },
            as_json,
        )


def naive_vs_packed(n_train: int, n_test: int, as_json: bool) -> None:
    """Squared Euclidean distances for every (query, record) pair, two ways."""
    x, _ = blobs(n_train + n_test, A, 3, seed=7, std=2.0)
    train, test = x[:n_train], x[n_train:]
    truth = ((test[:, None, :] - train[None, :, :]) ** 2).sum(axis=2)

    keys = CkksKeys.generate(128, galois=True)  # slot sums need rotation keys
    started = time.perf_counter()
    records = [keys.encrypt(row) for row in train]
    naive = np.empty_like(truth)
    for qi, query in enumerate(test):
        encrypted_query = keys.encrypt(query)
        for ti, record in enumerate(records):
            diff = record - encrypted_query
            naive[qi, ti] = keys.decrypt((diff * diff).sum())[0]
    naive_s = time.perf_counter() - started

    started = time.perf_counter()  # the library's packed SKNN, owner and worker
    owner = KnnOwner(train, ["x"] * n_train, 1, scheme="ckks")
    worker = KnnWorker(owner.start())
    packed = (
        np.concatenate(
            [
                owner.neighbours(worker.distances(owner.query(b)))[1]
                for b in owner.query_blocks(test)
            ]
        )
        * owner.scale**2
    )
    packed_s = time.perf_counter() - started
    emit(
        {
            "algorithm": "sknn_naive_vs_packed",
            "scheme": "ckks",
            "n": n_train,
            "a": A,
            "n_test": n_test,
            "naive_s": round(naive_s, 3),
            "packed_s": round(packed_s, 4),
            "speedup": round(naive_s / packed_s, 1),
            "max_abs_error_naive": float(np.abs(naive - truth).max()),
            "max_abs_error_packed": float(np.abs(packed - truth).max()),
        },
        as_json,
    )


class Cpu:
    """CPU seconds spent inside calls, per side (process time: every thread counts)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, fn, *args):  # type: ignore[no-untyped-def]
        began = time.process_time()
        try:
            return fn(*args)
        finally:
            self.seconds += time.process_time() - began


BLIND_SIZES = [(10_000, 8), (100_000, 2)]


def skmeans_blind(n: int, a: int, k: int, as_json: bool) -> None:
    """One job end to end at the default settings: max_iterations rounds announced, one
    round trip each, the rounds after convergence dummy (spot checks only)."""
    data, _ = blobs(n, a, k, seed=n, std=2.0)
    began = time.perf_counter()
    plain = kmeans(data, ClusteringParams(k))
    plain_s = time.perf_counter() - began
    owner_cpu, worker_cpu, wire = Cpu(), Cpu(), Wire()
    iterating_cpu = Cpu()  # the owner's CPU in the rounds that were k-means iterations
    began = time.perf_counter()
    owner = BlindClusterOwner(data, ClusteringParams(k))
    start = wire.to_worker(owner_cpu(owner.start))
    start_mb = wire.bytes_to_worker / 1e6
    worker = worker_cpu(BlindClusterWorker, start)
    round_trips = 0
    while True:
        answer = wire.to_owner(worker_cpu(worker.round))
        clock = iterating_cpu if owner.iterating else Cpu()
        update = wire.to_worker(owner_cpu(clock, owner.receive, answer))
        round_trips += 1
        worker_cpu(worker.update, update)
        if update.done:
            break
    enc_s = time.perf_counter() - began
    out = owner.outcome()
    check = owner.verification()
    emit(
        {
            "case": "skmeans_blind",
            "n": n,
            "a": a,
            "k": k,
            "plain_s": round(plain_s, 4),
            "enc_s": round(enc_s, 2),
            "ratio": round(enc_s / plain_s, 1),
            "owner_cpu_s": round(owner_cpu.seconds, 2),
            "worker_cpu_s": round(worker_cpu.seconds, 2),
            "owner_cpu_s_per_iteration": round(iterating_cpu.seconds / out.iterations, 4),
            "plain_s_per_iteration": round(plain_s / plain.iterations, 5),
            "round_trips_per_iteration": round_trips / owner.rounds,
            "verify_fraction": check["verify_fraction"],
            "detection_per_round": check["detection_per_round"],
            "mb_per_round": round(
                (wire.bytes_to_worker + wire.bytes_to_owner - start_mb * 1e6) / 1e6 / round_trips,
                1,
            ),
            "rounds": round_trips,
            "iterations": out.iterations,
            "plain_rounds": plain.iterations,
            "agreement": float(np.mean(out.labels == plain.labels)),
            "same_centroids": bool(np.array_equal(out.centroids, plain.centroids)),
            "mb_start": round(start_mb, 1),
            "near_ties": sum(owner.near_ties),
        },
        as_json,
    )


def sknn_blind(n: int, a: int, k: int, n_test: int, as_json: bool) -> None:
    x, y = blobs(n + n_test, a, 3, seed=n + 1, std=4.0)
    labels = [f"c{v}" for v in y]
    train, test, train_labels = x[:n], x[n:], labels[:n]
    began = time.perf_counter()
    plain = knn(train, train_labels, test, k)
    plain_s = time.perf_counter() - began
    owner_cpu, worker_cpu, wire = Cpu(), Cpu(), Wire()
    began = time.perf_counter()
    owner = BlindKnnOwner(train, train_labels, k)
    start = wire.to_worker(owner_cpu(owner.start))
    start_mb = wire.bytes_to_worker / 1e6
    worker = worker_cpu(BlindKnnWorker, start)
    predictions: list[object] = []
    blocks = owner.row_blocks(test)
    for block in blocks:
        query = wire.to_worker(owner_cpu(owner.query_rows, block))
        predictions += owner_cpu(owner.classify, wire.to_owner(worker_cpu(worker.distances, query)))
    enc_s = time.perf_counter() - began
    differ = np.array([p != q for p, q in zip(plain, predictions, strict=True)])
    emit(
        {
            "case": "sknn_blind",
            "n": n,
            "a": a,
            "k": k,
            "n_test": n_test,
            "plain_s": round(plain_s, 4),
            "enc_s": round(enc_s, 2),
            "ratio": round(enc_s / plain_s, 1),
            "owner_cpu_s": round(owner_cpu.seconds, 2),
            "worker_cpu_s": round(worker_cpu.seconds, 2),
            "mb_per_round": round(
                (wire.bytes_to_worker + wire.bytes_to_owner - start_mb * 1e6) / 1e6 / len(blocks),
                1,
            ),
            "rounds": len(blocks),
            "agreement": float(1 - differ.mean()),
            "mb_start": round(start_mb, 1),
            "queries_per_round": owner.block,
            "near_ties": owner.near_ties,
            "differences_outside_near_ties": int((differ & ~np.array(owner.tied)).sum()),
        },
        as_json,
    )


def blind_fold(n: int, a: int, k: int, as_json: bool) -> None:
    """The masked sums' slots, folded by the owner after decryption (no Galois keys) or
    by the worker with rotations (TenSEAL's sum(): log2(N/2) rotations per ciphertext).
    A folded sum reaches n * reach, which must stay within the blind keys' magnitude
    budget: the worker variant scales the data down to fit, and loses precision."""
    raw, _ = blobs(n, a, k, seed=n, std=2.0)
    labels = kmeans(raw, ClusteringParams(k, max_iterations=1)).labels
    figures: dict[str, object] = {"case": "blind_fold", "n": n, "a": a, "k": k}
    for where in ("owner", "worker"):
        reach = 1.0 if where == "owner" else MAGNITUDE_BUDGET / n
        data = raw / np.abs(raw).max() * reach
        keys = blind_keys(128)
        if where == "worker":
            keys.context.generate_galois_keys()
        public = load_public_context(keys.public_context_bytes())
        columns = [load_vectors(public, c, keys.slots) for c in pack_columns(keys, data)]
        masks = [
            load_vectors(public, m, keys.slots)
            for m in pack_columns(keys, np.eye(k)[labels][:, : k - 1])
        ]
        began = time.perf_counter()
        rows = []
        for y in range(k):
            for j in range(a):
                chunks = range(len(columns[0]))
                if y < k - 1:
                    terms = [masks[y][c] * columns[j][c] for c in chunks]
                else:  # the last mask is 1 - the others, as the worker derives it
                    terms = []
                    for c in chunks:
                        rest = masks[0][c]
                        for z in range(1, k - 1):
                            rest = rest + masks[z][c]
                        terms.append((-rest + 1.0) * columns[j][c])
                total = terms[0]
                for t in terms[1:]:
                    total += t
                rows.append((total.sum() if where == "worker" else total).serialize())
        worker_s = time.perf_counter() - began
        began = time.perf_counter()
        sums = np.array(
            [keys.decrypt(c)[0 if where == "worker" else slice(None)].sum() for c in rows]
        )
        owner_s = time.perf_counter() - began
        truth = np.array([[data[labels == y, j].sum() for j in range(a)] for y in range(k)])
        figures[f"{where}_folds"] = {
            "worker_s": round(worker_s, 3),
            "owner_s": round(owner_s, 3),
            "mb_sums": round(sum(map(len, rows)) / 1e6, 2),
            "mb_public_context": round(len(keys.public_context_bytes()) / 1e6, 1),
            "reach": reach,
            "max_rel_error": float(np.abs(sums - truth.ravel()).max() / np.abs(truth).max()),
        }
    emit(figures, as_json)


def blind_sign(as_json: bool) -> None:
    """A non-interactive round needs argmin on ciphertexts: sign(d_y - d_z) by a composite
    polynomial (f(x) = (35x - 35x^3 + 21x^5 - 5x^7) / 16, depth 3 per application)."""
    coeffs = [0.0, 35 / 16, 0.0, -35 / 16, 0.0, 21 / 16, 0.0, -5 / 16]
    rng = np.random.default_rng(0)
    data, _ = blobs(100_000, 2, 5, seed=100_000, std=2.0)
    centroids = kmeans(data, ClusteringParams(5)).centroids
    dist = ((data[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    part = np.sort(dist, axis=1)
    # The argument of sign() must lie in [-1, 1]: gaps are divided by the largest difference.
    gaps = (part[:, 1] - part[:, 0]) / (dist.max() - dist.min())
    figures: dict[str, object] = {"case": "blind_sign", "n": 100_000, "a": 2, "k": 5}
    for degree, depth in ((16384, 7), (32768, 19)):
        context = ts.context(
            ts.SCHEME_TYPE.CKKS, degree, coeff_mod_bit_sizes=[60] + [40] * depth + [60]
        )
        context.global_scale = 2**40
        context.generate_relin_keys()
        slots = degree // 2
        x = rng.choice(np.concatenate([gaps, -gaps]), slots)
        vector = ts.ckks_vector(context, x.tolist())
        began = time.perf_counter()
        vector * vector  # the cost of one multiplication at the top level
        mult_s = time.perf_counter() - began
        applications = (depth - 4) // 3  # levels: distance 1, combining signs 2, mask x data 1
        began = time.perf_counter()
        for _ in range(applications):
            vector = vector.polyval(coeffs)
        sign_s = time.perf_counter() - began
        approx = np.array(vector.decrypt())
        wrong = np.abs(approx - np.sign(x)) > 0.5
        chunks = -(-100_000 // slots)
        public = context.serialize(save_secret_key=False, save_relin_keys=True)
        figures[f"N{degree}"] = {
            "levels": depth,
            "sign_applications": applications,
            "mult_top_level_s": round(mult_s, 3),
            "sign_s_per_ciphertext": round(sign_s, 2),
            "round_estimate_s": round(chunks * 10 * sign_s, 1),  # k(k-1)/2 = 10 comparisons
            "mb_public_context": round(len(public) / 1e6, 1),
            "fraction_unresolved": float(wrong.mean()),
            "records_unresolved_per_round": round(float(wrong.mean()) * 100_000),
            "unresolved_below_gap": float(np.abs(x[wrong]).max(initial=0.0)),
        }
    emit(figures, as_json)


BLIND_CASES = ("skmeans_blind", "sknn_blind", "blind_fold", "blind_sign")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--n-test", type=int, default=50, help="SKNN queries per case")
    parser.add_argument("--naive-train", type=int, default=100)
    parser.add_argument("--naive-test", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    parser.add_argument(
        "--case",
        choices=BLIND_CASES,
        nargs="+",
        help="run only these blind-protocol cases (default: the udm cases above)",
    )
    args = parser.parse_args()
    if args.case:
        for case in args.case:
            if case == "skmeans_blind":
                for n, a in BLIND_SIZES:
                    skmeans_blind(n, a, K, args.json)
            elif case == "sknn_blind":
                for n, a in BLIND_SIZES:
                    sknn_blind(n, a, K, args.n_test, args.json)
            elif case == "blind_fold":
                blind_fold(10_000, 8, K, args.json)
            else:
                blind_sign(args.json)
        return 0
    for n in args.sizes:
        clustering_cases(n, args.json)
        classification_cases(n, args.n_test, args.json)
    naive_vs_packed(args.naive_train, args.naive_test, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
