"""``dms mine``: k-means and k-NN, plaintext or encrypted, both roles on this machine (--local)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from dms.cli.common import JsonOption
from dms.cli.output import emit_fields, emit_json, progress_bar
from dms.errors import DmsError
from dms.mining import Distance, MiningError, MiningResult, run_classification, run_clustering
from dms.mining.data import read_table, read_test_table, write_labels
from dms.mining.keyfolder import load_keys, save_keys
from dms.mining.local import knn_ties
from dms.mining.metrics import accuracy, adjusted_rand_index
from dms.mining.schemes import new_keys
from dms.mining.schemes.ckks import CkksKeys
from dms.mining.schemes.liu import LiuKey
from dms.security.keystore import passphrase_from_env_or_prompt
from dms.security.sealing import SealedBox, seal, unseal

app = typer.Typer(help="Privacy-preserving data mining (k-means, k-NN) on CSV data.")

KOption = Annotated[int, typer.Option("--k", help="Clusters (k-means) or neighbours (k-NN).")]
SchemeOption = Annotated[str, typer.Option("--scheme", help="ckks (default) or liu.")]
DistanceOption = Annotated[str, typer.Option("--distance", help="euclidean or manhattan.")]
OutOption = Annotated[Path, typer.Option("--out", help="Folder for labels.csv and result.json.")]
LocalOption = Annotated[
    bool, typer.Option("--local", help="Run owner and worker on this machine (required for now).")
]
LevelOption = Annotated[int, typer.Option("--level", help="Security level: 128, 192 or 256.")]
KeysOption = Annotated[
    Path | None,
    typer.Option("--keys", help="Key folder: used if present, else created (sealed at rest)."),
]
CompareOption = Annotated[
    bool, typer.Option("--compare", help="Also run the plaintext baseline and report agreement.")
]


class MineError(DmsError):
    pass


@contextmanager
def _mining_errors() -> Iterator[None]:
    try:
        yield
    except MiningError as exc:
        raise MineError(str(exc)) from None


def _require_local(local: bool) -> None:
    if not local:
        raise MineError("placement on other nodes is not available yet: add --local")


def _keys(folder: Path | None, scheme: str, level: int) -> CkksKeys | LiuKey | None:
    """Load the owner's keys from ``folder``, or create and save them there."""
    if folder is None or scheme not in ("ckks", "liu"):
        return None
    passphrase = passphrase_from_env_or_prompt("mining keys", not (folder / "meta.json").exists())

    def sealer(data: bytes, name: str) -> bytes:
        return seal(passphrase, data, name.encode()).model_dump_json().encode()

    def unsealer(data: bytes, name: str) -> bytes:
        return unseal(passphrase, SealedBox.model_validate_json(data), name.encode())

    if (folder / "meta.json").exists():
        keys = load_keys(folder, unsealer)
        expected = CkksKeys if scheme == "ckks" else LiuKey
        if not isinstance(keys, expected):
            raise MineError(f"{folder} holds {type(keys).__name__} keys, not {scheme} keys")
        return keys
    keys = new_keys(scheme, level)
    save_keys(folder, keys, sealer)
    return keys


def _write(out: Path, result: MiningResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_labels(out / "labels.csv", result.labels)
    (out / "result.json").write_text(json.dumps(result.summary(), indent=2) + "\n")


def _report(result: MiningResult, out: Path, json_out: bool) -> None:
    if json_out:
        emit_json(result.summary())
        return
    shown: dict[str, Any] = {
        "algorithm": result.algorithm,
        "scheme": result.scheme,
        "distance": result.distance,
        "k": result.k,
        "records": result.records,
    }
    if result.iterations is not None:
        shown["iterations"] = f"{result.iterations} (converged: {result.converged})"
    shown.update({f"time {k} (s)": f"{v:.3f}" for k, v in result.timings.model_dump().items()})
    if result.scheme != "plain":
        shown["sent to worker"] = f"{result.bytes_to_worker / 1e6:.2f} MB"
    for key, value in (result.comparison or {}).items():
        shown[key] = f"{value:.4f}" if isinstance(value, float) else value
    shown["output"] = f"{out / 'labels.csv'}, {out / 'result.json'}"
    emit_fields(shown, title=f"{result.algorithm} ({result.scheme})")


def _clustering(algorithm: str) -> Callable[..., None]:
    def command(
        data: Annotated[Path, typer.Option("--data", help="CSV of numeric features.")],
        k: KOption,
        out: OutOption,
        scheme: SchemeOption = "ckks",
        distance: DistanceOption = "euclidean",
        min_error: Annotated[float, typer.Option("--min-error")] = 0.015,
        max_iterations: Annotated[int, typer.Option("--max-iterations")] = 10,
        init: Annotated[str, typer.Option("--init", help="first or kmeans++.")] = "first",
        seed: Annotated[int | None, typer.Option("--seed")] = None,
        level: LevelOption = 128,
        keys: KeysOption = None,
        compare: CompareOption = False,
        local: LocalOption = False,
        json_out: JsonOption = False,
    ) -> None:
        _require_local(local)
        with _mining_errors():
            metric = Distance.parse(distance)
            table = read_table(data)
            owner_keys = _keys(keys, scheme, level) if algorithm != "kmeans" else None
            settings = {
                "distance": metric,
                "min_error": min_error,
                "init": init,
                "seed": seed,
                "max_iterations": max_iterations,
            }
            with progress_bar(not json_out, f"{algorithm} rounds", max_iterations) as progress:
                result = run_clustering(
                    algorithm,
                    table.features,
                    k,
                    scheme=scheme,
                    level=level,
                    keys=owner_keys,
                    on_round=lambda i, change: progress(i, f"centroid change {change:.4f}"),
                    **settings,
                )
            if compare and algorithm != "kmeans":
                plain = run_clustering("kmeans", table.features, k, **settings)
                result.comparison = {
                    "plain_iterations": plain.iterations,
                    "label_agreement": float(np.mean(np.array(plain.labels) == result.labels)),
                    "adjusted_rand_index": adjusted_rand_index(result.labels, plain.labels),
                    "plain_total_s": plain.timings.total,
                }
        _write(out, result)
        _report(result, out, json_out)

    command.__doc__ = {
        "kmeans": "Plaintext k-means (the baseline).",
        "skmeans": "Secure k-means: the worker clusters encrypted data (CKKS or Liu).",
        "dbskmeans": "Double-blind k-means: distances hidden by order-preserving encryption.",
    }[algorithm]
    return command


def _classification(algorithm: str) -> Callable[..., None]:
    def command(
        train: Annotated[Path, typer.Option("--train", help="CSV of features and a label column.")],
        test: Annotated[Path, typer.Option("--test", help="CSV of features (label optional).")],
        k: KOption,
        out: OutOption,
        label_column: Annotated[
            str | None, typer.Option("--label-column", help="Default: the last column.")
        ] = None,
        scheme: SchemeOption = "ckks",
        distance: DistanceOption = "euclidean",
        level: LevelOption = 128,
        keys: KeysOption = None,
        compare: CompareOption = False,
        local: LocalOption = False,
        json_out: JsonOption = False,
    ) -> None:
        _require_local(local)
        with _mining_errors():
            metric = Distance.parse(distance)
            training = read_table(train, label=True, label_column=label_column)
            queries = read_test_table(test, training)
            assert training.labels is not None
            owner_keys = _keys(keys, scheme, level) if algorithm != "knn" else None
            with progress_bar(not json_out, f"{algorithm} queries", None) as progress:
                result = run_classification(
                    algorithm,
                    training.features,
                    training.labels,
                    queries.features,
                    k,
                    scheme=scheme,
                    distance=metric,
                    level=level,
                    keys=owner_keys,
                    on_block=lambda done, total: progress(done, "", total),
                )
            comparison: dict[str, Any] = {}
            if queries.labels is not None:
                comparison["accuracy"] = accuracy(result.labels, queries.labels)
            if compare and algorithm != "knn":
                plain = run_classification(
                    "knn", training.features, training.labels, queries.features, k, distance=metric
                )
                ties = knn_ties(training.features, queries.features, k, metric)
                differ = [p != q for p, q in zip(plain.labels, result.labels, strict=True)]
                comparison.update(
                    {
                        "agreement_with_plain": 1.0 - sum(differ) / max(len(differ), 1),
                        "differences": sum(differ),
                        "differences_outside_ties": sum(
                            d and not t for d, t in zip(differ, ties, strict=True)
                        ),
                        "exact_ties": int(ties.sum()),
                    }
                )
            result.comparison = comparison or None
        _write(out, result)
        _report(result, out, json_out)

    command.__doc__ = {
        "knn": "Plaintext k-nearest-neighbours classification (the baseline).",
        "sknn": "Secure k-NN: distances computed on encrypted rows (CKKS or Liu).",
    }[algorithm]
    return command


for _name in ("kmeans", "skmeans", "dbskmeans"):
    app.command(_name)(_clustering(_name))
for _name in ("knn", "sknn"):
    app.command(_name)(_classification(_name))
