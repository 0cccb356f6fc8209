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
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from dms.mining import run_classification, run_clustering
from dms.mining.classification import KnnOwner, KnnWorker
from dms.mining.data import blobs
from dms.mining.metrics import adjusted_rand_index
from dms.mining.schemes.ckks import CkksKeys

A, K = 8, 5


def emit(figures: dict[str, object], as_json: bool) -> None:
    print(json.dumps(figures) if as_json else "  ".join(f"{k}={v}" for k, v in figures.items()))
    sys.stdout.flush()


def clustering_cases(n: int, as_json: bool) -> None:
    data, _ = blobs(n, A, K, seed=n, std=2.0)
    plain = run_clustering("kmeans", data, K)
    for algorithm in ("skmeans", "dbskmeans"):
        for scheme in ("liu", "ckks"):
            secure = run_clustering(algorithm, data, K, scheme=scheme)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--n-test", type=int, default=50, help="SKNN queries per case")
    parser.add_argument("--naive-train", type=int, default=100)
    parser.add_argument("--naive-test", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    args = parser.parse_args()
    for n in args.sizes:
        clustering_cases(n, args.json)
        classification_cases(n, args.n_test, args.json)
    naive_vs_packed(args.naive_train, args.naive_test, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
