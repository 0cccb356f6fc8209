"""``dms mine``: k-means and k-NN, plaintext or encrypted.

Without ``--local`` the job goes to this home's running node, whose mining
session places one worker per shard on other nodes and keeps the keys here
(``specs/mining.md``, "Placed on other nodes"). With ``--local`` both roles
run in this process. Either way the output is ``DIR/labels.csv`` and
``DIR/result.json``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dms.actor import RemoteError
from dms.cli import collab
from dms.cli.common import JsonOption, settings
from dms.cli.events import EventFeed
from dms.cli.output import console, emit_fields, emit_json, progress_bar, say, say_line
from dms.cli.waiting import Waiting, placement_hint
from dms.errors import DmsError
from dms.mining.defaults import DEFAULT_VERIFY_FRACTION
from dms.mining.errors import MiningError
from dms.mining.learned import worker_learns
from dms.node.client import NodeClient, running_node
from dms.security.keystore import session_passphrase
from dms.security.sealing import SealedBox, seal, unseal

if TYPE_CHECKING:
    # NumPy and TenSEAL load inside the commands that run (0.13 s of CPU): 'dms --help' and
    # every other command build this group without them (tests/test_cli_startup.py).
    import numpy as np

    from dms.mining import Distance
    from dms.mining.schemes.ckks import CkksKeys
    from dms.mining.schemes.liu import LiuKey

app = typer.Typer(help="Privacy-preserving data mining (k-means, k-NN) on CSV data.")
app.add_typer(collab.app, name="collab")

KOption = Annotated[int, typer.Option("--k", help="Clusters (k-means) or neighbours (k-NN).")]
SchemeOption = Annotated[str, typer.Option("--scheme", help="ckks (default) or liu.")]
DistanceOption = Annotated[str, typer.Option("--distance", help="euclidean or manhattan.")]
OutOption = Annotated[Path, typer.Option("--out", help="Folder for labels.csv and result.json.")]
LocalOption = Annotated[
    bool,
    typer.Option("--local", help="Run owner and worker here, not on other nodes."),
]
ShardsOption = Annotated[
    int, typer.Option("--shards", min=1, max=64, help="Workers the rows are split across.")
]
StrategyOption = Annotated[
    str, typer.Option("--strategy", help="score, round-robin, two-choices, random or first-offer.")
]
MaxPriceOption = Annotated[
    float | None, typer.Option("--max-price", min=0, help="Most a worker may ask.")
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", help="Seconds to place each worker before failing.")
]
LevelOption = Annotated[int, typer.Option("--level", help="Security level: 128, 192 or 256.")]
KeysOption = Annotated[
    Path | None,
    typer.Option("--keys", help="Key folder: used if present, else created (sealed at rest)."),
]
ProtocolOption = Annotated[
    str | None,
    typer.Option(
        "--protocol",
        help="blind (CKKS default: the worker sees only ciphertexts) or udm (the reference's).",
    ),
]
CompareOption = Annotated[
    bool, typer.Option("--compare", help="Also run the plaintext baseline and report agreement.")
]
ReportOption = Annotated[
    bool,
    typer.Option("--report", help="Also write DIR/report.html: plots of the job, offline."),
]


class MineError(DmsError):
    pass


@contextmanager
def _mining_errors() -> Iterator[None]:
    try:
        yield
    except MiningError as exc:
        raise MineError(str(exc)) from None


def _protocol(algorithm: str, scheme: str, protocol: str | None) -> str | None:
    """The protocol this job runs (None for plaintext and DBSKMeans' own)."""
    from dms.mining.local import resolve_protocol

    if algorithm in ("kmeans", "knn"):
        if protocol is not None:
            raise MineError(f"{algorithm} runs in the clear: --protocol applies to skmeans, sknn")
        return None
    return resolve_protocol(algorithm, scheme, protocol)


def _settings(
    algorithm: str, scheme: str, protocol: str | None, level: int, k: int, metric: Distance
) -> dict[str, Any]:
    """The settings every placed job sends its node (``MiningSettings``)."""
    plaintext = algorithm in ("kmeans", "knn")
    return {
        "algorithm": algorithm,
        "scheme": "plain" if plaintext else scheme,
        "protocol": protocol,
        "level": level,
        "k": k,
        "distance": str(metric),
    }


def _protocol_arg(protocol: str | None) -> dict[str, Any]:
    return {"protocol": protocol} if protocol is not None else {}


class Placement:
    """How a job is placed when it is not ``--local``."""

    def __init__(self, shards: int, strategy: str, max_price: float | None, timeout: float):
        self.shards, self.strategy, self.max_price, self.timeout = (
            shards,
            strategy,
            max_price,
            timeout,
        )


def _checked(k: int, local: bool, shards: int, timeout: float) -> None:
    """Mistakes said in the flags' own words, before anything runs."""
    from dms.jobs.spec import MAX_DEADLINE_S  # the node's bound of the placement's deadline

    if k < 1:
        raise MineError("--k must be at least 1")
    if not timeout >= 1:  # NaN too
        raise MineError("--timeout must be at least 1 second")
    if timeout > MAX_DEADLINE_S:
        raise MineError(
            f"--timeout must be at most {MAX_DEADLINE_S} seconds "
            f"({MAX_DEADLINE_S / 86400:g} days), the node's limit"
        )
    if local and shards != 1:
        raise MineError(
            f"--shards {shards} splits the rows across other nodes and --local runs all of "
            "it here: drop one of them"
        )


# The node's check of a placed job's settings, said as the flag it came from.
_BOUND = re.compile(r"settings\.(\w+): Input should be (greater|less) than or equal to (\S+)")


def _in_flags(reason: str) -> str:
    match = _BOUND.search(reason)
    if match is None:
        return reason
    flag, side, bound = match.group(1).replace("_", "-"), match.group(2), match.group(3)
    return f"--{flag} must be at {'least' if side == 'greater' else 'most'} {bound}"


def _node() -> NodeClient:
    home = settings().home
    client = running_node(home)
    if client is None:
        raise MineError(
            f"no node is running for {home}: start one with 'dms run' "
            "(see README, 'Mining on other nodes'), or add --local to mine on this machine"
        )
    return client


def _secret(keys: CkksKeys | LiuKey | None) -> bytes | None:
    from dms.mining.schemes.ckks import CkksKeys

    if keys is None:
        return None
    return keys.secret_context_bytes() if isinstance(keys, CkksKeys) else keys.to_bytes()


def _mine_on_network(
    request: dict[str, Any], placement: Placement, json_out: bool
) -> tuple[dict[str, Any], list[Any]]:
    """Hand the job to this home's node, show its progress, return (result, labels)."""
    client = _node()
    s = request["settings"]
    learns = worker_learns(s["algorithm"], s.get("protocol"), s.get("scheme", "ckks"))
    say_line(f"note: {learns}", err=True)  # a terminal cut its words at the edge
    request.update(
        strategy=placement.strategy,
        max_price=placement.max_price,
        timeout_s=placement.timeout,
    )
    request["settings"]["shards"] = placement.shards
    try:
        created = client.invoke("/dms/node/mining/new", request, timeout=120)
    except RemoteError as exc:  # its code kept, as every error reply prints it
        raise RemoteError(exc.code, _in_flags(exc.reason), exc.rule) from None
    session = created["id"]
    if not json_out:
        console.print(
            f"mining session {session}: placing {placement.shards} worker(s)", highlight=False
        )
    status: dict[str, Any] = {}
    waiting = Waiting(client, session, say)
    feed = EventFeed(skip=lambda what: what == learns)  # said above
    try:
        while True:
            status = client.invoke("/dms/node/mining/status", {"id": session}, timeout=30)
            progress = status.get("progress") or {}
            if not json_out:
                for line in feed.lines(progress.get("events", [])):
                    say(line)
                    waiting.news()
            if status["phase"] == "failed":
                reason = progress.get("reason", "")
                hint = placement_hint(reason, placement.shards)
                ended = f"mining session {session} failed: {reason}"
                raise MineError(f"{ended}\n{hint}" if hint else ended)
            if status["phase"] == "completed":
                break
            if not json_out:
                waiting.tick()  # nothing new for a few seconds: say what it waits for
            time.sleep(0.3)
    except KeyboardInterrupt:
        client.invoke("/dms/node/deployment/shutdown", {"id": session}, timeout=30)
        raise MineError(f"interrupted: mining session {session} shut down") from None
    answer = client.invoke("/dms/node/mining/result", {"id": session}, timeout=120)
    result = {"session": session, **answer["result"]}
    # Per round: the centroid change (the last checkpoint has every round's) and the
    # step's time (the slowest shard's, as the owner waited for it).
    checkpoint = status.get("checkpoint") or {}
    if checkpoint.get("changes") is not None:
        result.setdefault("changes", checkpoint["changes"])
    steps = (status.get("progress") or {}).get("steps") or []
    result.setdefault(
        "steps", [{k: s.get(k) for k in ("step", "change", "s", "slowest")} for s in steps]
    )
    return result, list(answer["labels"])


def _keys(
    folder: Path | None, scheme: str, level: int, protocol: str | None = None
) -> CkksKeys | LiuKey | None:
    """Load the owner's keys from ``folder``, or create and save them there (for the
    blind protocol, keys made for it: one level at a 2^50 scale, more precise)."""
    from dms.mining.blind_kmeans import blind_keys
    from dms.mining.keyfolder import load_keys, save_keys
    from dms.mining.schemes import new_keys
    from dms.mining.schemes.ckks import CkksKeys
    from dms.mining.schemes.liu import LiuKey

    if folder is None or scheme not in ("ckks", "liu"):
        return None
    lookup = session_passphrase(settings().home)

    def unsealer(passphrase: str) -> Callable[[bytes, str], bytes]:
        return lambda data, name: unseal(
            passphrase, SealedBox.model_validate_json(data), name.encode()
        )

    if (folder / "meta.json").exists():
        # The unlocked passphrase first; one that does not open them is a note, then a prompt.
        keys = lookup.open("mining keys", lambda p: load_keys(folder, unsealer(p)))
        expected = CkksKeys if scheme == "ckks" else LiuKey
        if not isinstance(keys, expected):
            raise MineError(f"{folder} holds {type(keys).__name__} keys, not {scheme} keys")
        return keys
    passphrase = lookup("mining keys", True)

    def sealer(data: bytes, name: str) -> bytes:
        return seal(passphrase, data, name.encode()).model_dump_json().encode()

    keys = blind_keys(level) if protocol == "blind" else new_keys(scheme, level)
    save_keys(folder, keys, sealer)
    return keys


def _write(out: Path, summary: dict[str, Any], labels: list[Any]) -> None:
    from dms.mining.data import write_labels

    out.mkdir(parents=True, exist_ok=True)
    write_labels(out / "labels.csv", labels)
    (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")


def _html_report(
    out: Path,
    summary: dict[str, Any],
    labels: list[Any],
    points: np.ndarray,
    baseline: list[Any] | None,
    truth: list[Any] | None = None,
) -> Path:
    from dms.report import ReportInput, write_report  # matplotlib loads only for this

    job = ReportInput(summary, labels, points, baseline=baseline, truth=truth)
    return write_report(out, job)


class _Rounds:
    """The local runner's rounds as they come: centroid change and wall time of each."""

    def __init__(self, bar: Callable[..., None]) -> None:
        self.bar = bar
        self.changes: dict[int, float] = {}
        self.seconds: dict[int, float] = {}
        self._last = time.perf_counter()

    def __call__(self, i: int, change: float) -> None:
        now = time.perf_counter()
        self.changes[i], self.seconds[i] = change, now - self._last
        self._last = now
        self.bar(i, f"centroid change {change:.4f}")

    def into(self, summary: dict[str, Any]) -> None:
        summary["changes"] = [self.changes[i] for i in sorted(self.changes)]
        summary["round_s"] = [round(self.seconds[i], 4) for i in sorted(self.seconds)]


def _report(summary: dict[str, Any], out: Path, json_out: bool, report: Path | None = None) -> None:
    if json_out:
        emit_json({**summary, "report": str(report)} if report else summary)
        return
    shown: dict[str, Any] = {
        key: summary[key]
        for key in ("algorithm", "scheme", "protocol", "distance", "k", "records")
        if summary.get(key) is not None
    }
    if summary.get("iterations") is not None:
        shown["iterations"] = f"{summary['iterations']} (converged: {summary['converged']})"
    shown.update({f"time {k} (s)": f"{v:.3f}" for k, v in summary["timings"].items()})
    if summary["scheme"] != "plain" or summary.get("placement"):
        shown["sent to worker"] = f"{summary['bytes_to_worker'] / 1e6:.2f} MB"
    for shard in summary.get("placement") or []:
        shown[f"{shard['shard']} on"] = (
            f"{shard['peer_id'][-12:]} ({shard['rows']} rows, {shard['mb_sent']:.1f} MB out, "
            f"{shard['mb_received']:.1f} MB back)"
        )
    if summary.get("placement"):
        shown["replacements"] = summary["replacements"]
    for key, value in (summary.get("comparison") or {}).items():
        shown[key] = f"{value:.4f}" if isinstance(value, float) else value
    shown["output"] = f"{out / 'labels.csv'}, {out / 'result.json'}"
    if report is not None:
        shown["report"] = str(report)
    emit_fields(shown, title=f"{summary['algorithm']} ({summary['scheme']})")


def _clustering(algorithm: str) -> Callable[..., None]:
    def command(
        data: Annotated[Path, typer.Option("--data", help="CSV of numeric features.")],
        k: KOption,
        out: OutOption,
        scheme: SchemeOption = "ckks",
        protocol: ProtocolOption = None,
        distance: DistanceOption = "euclidean",
        min_error: Annotated[float, typer.Option("--min-error")] = 0.015,
        max_iterations: Annotated[int, typer.Option("--max-iterations")] = 10,
        init: Annotated[str, typer.Option("--init", help="first or kmeans++.")] = "first",
        verify: Annotated[
            str,
            typer.Option(
                "--verify",
                help="sample (records rechecked in the clear each round) or replicate "
                "(also each shard on a second worker, compared in full).",
            ),
        ] = "sample",
        verify_fraction: Annotated[
            float,
            typer.Option("--verify-fraction", help="Share of records rechecked each round."),
        ] = DEFAULT_VERIFY_FRACTION,
        seed: Annotated[int | None, typer.Option("--seed")] = None,
        level: LevelOption = 128,
        keys: KeysOption = None,
        compare: CompareOption = False,
        report: ReportOption = False,
        local: LocalOption = False,
        shards: ShardsOption = 1,
        strategy: StrategyOption = "score",
        max_price: MaxPriceOption = None,
        timeout: TimeoutOption = 120.0,
        json_out: JsonOption = False,
    ) -> None:
        from dms.mining import ClusteringParams, Distance, run_clustering
        from dms.mining.data import read_table
        from dms.mining.metrics import adjusted_rand_index, matched_agreement

        html: Path | None = None
        _checked(k, local, shards, timeout)
        if verify not in ("sample", "replicate"):
            raise MineError(f"--verify is sample or replicate, not {verify!r}")
        if local and verify == "replicate":
            raise MineError(
                "--verify replicate runs each shard on two other nodes and --local runs "
                "it here: drop one of them"
            )
        with _mining_errors():
            metric = Distance.parse(distance)
            table = read_table(data)
            protocol = _protocol(algorithm, scheme, protocol)
            owner_keys = _keys(keys, scheme, level, protocol) if algorithm != "kmeans" else None
            params = ClusteringParams(
                k,
                distance=metric,
                min_error=min_error,
                max_iterations=max_iterations,
                init=init,
                seed=seed,
                level=level,
            )
            if local:
                with progress_bar(not json_out, f"{algorithm} rounds", max_iterations) as bar:
                    rounds = _Rounds(bar)
                    result = run_clustering(
                        algorithm,
                        table.features,
                        params,
                        scheme=scheme,
                        keys=owner_keys,
                        on_round=rounds,
                        **_protocol_arg(protocol),
                    )
                summary, labels = result.summary(), list(result.labels)
                rounds.into(summary)
            else:
                request = {
                    "settings": {
                        **_settings(algorithm, scheme, protocol, level, k, metric),
                        "min_error": min_error,
                        "max_iterations": max_iterations,
                        "init": init,
                        "seed": seed,
                        "verify": verify,
                        "verify_fraction": verify_fraction,
                    },
                    "data": str(data.resolve()),
                    "keys": _secret(owner_keys),
                }
                placement = Placement(shards, strategy, max_price, timeout)
                summary, labels = _mine_on_network(request, placement, json_out)
            plain = None
            if (compare or report) and algorithm != "kmeans":
                plain = run_clustering("kmeans", table.features, params)
            if compare and plain is not None:
                summary["comparison"] = {
                    "plain_iterations": plain.iterations,
                    # cluster numbers are arbitrary: the share of records together in
                    # both once clusters are matched, not of equal numbers
                    "label_agreement": matched_agreement(plain.labels, labels),
                    "adjusted_rand_index": adjusted_rand_index(labels, plain.labels),
                    "plain_total_s": plain.timings.total,
                }
            _write(out, summary, labels)
            if report:
                baseline = list(plain.labels) if plain is not None else labels
                html = _html_report(out, summary, labels, table.features, baseline)
        _report(summary, out, json_out, html)

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
        protocol: ProtocolOption = None,
        distance: DistanceOption = "euclidean",
        level: LevelOption = 128,
        keys: KeysOption = None,
        compare: CompareOption = False,
        report: ReportOption = False,
        local: LocalOption = False,
        shards: ShardsOption = 1,
        strategy: StrategyOption = "score",
        max_price: MaxPriceOption = None,
        timeout: TimeoutOption = 120.0,
        json_out: JsonOption = False,
    ) -> None:
        from dms.mining import Distance, run_classification
        from dms.mining.data import read_table, read_test_table
        from dms.mining.local import knn_ties
        from dms.mining.metrics import accuracy

        html: Path | None = None
        _checked(k, local, shards, timeout)
        with _mining_errors():
            metric = Distance.parse(distance)
            training = read_table(train, label=True, label_column=label_column)
            queries = read_test_table(test, training)
            assert training.labels is not None
            protocol = _protocol(algorithm, scheme, protocol)
            owner_keys = _keys(keys, scheme, level, protocol) if algorithm != "knn" else None
            if local:
                with progress_bar(not json_out, f"{algorithm} queries", None) as bar:
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
                        on_block=lambda done, total: bar(done, "", total),
                        **_protocol_arg(protocol),
                    )
                summary, labels = result.summary(), list(result.labels)
            else:
                request = {
                    "settings": _settings(algorithm, scheme, protocol, level, k, metric),
                    "train": str(train.resolve()),
                    "test": str(test.resolve()),
                    "label_column": label_column,
                    "keys": _secret(owner_keys),
                }
                placement = Placement(shards, strategy, max_price, timeout)
                summary, labels = _mine_on_network(request, placement, json_out)
            comparison: dict[str, Any] = {}
            if queries.labels is not None:
                comparison["accuracy"] = accuracy(labels, queries.labels)
            plain = None
            if (compare or report) and algorithm != "knn":
                plain = run_classification(
                    "knn", training.features, training.labels, queries.features, k, distance=metric
                )
            if compare and plain is not None:
                ties = knn_ties(training.features, queries.features, k, metric)
                differ = [p != q for p, q in zip(plain.labels, labels, strict=True)]
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
            summary["comparison"] = comparison or None
            _write(out, summary, labels)
            if report:
                baseline = list(plain.labels) if plain is not None else labels
                html = _html_report(
                    out, summary, labels, queries.features, baseline, queries.labels
                )
        _report(summary, out, json_out, html)

    command.__doc__ = {
        "knn": "Plaintext k-nearest-neighbours classification (the baseline).",
        "sknn": "Secure k-NN: distances computed on encrypted rows (CKKS or Liu).",
    }[algorithm]
    return command


for _name in ("kmeans", "skmeans", "dbskmeans"):
    app.command(_name)(_clustering(_name))
for _name in ("knn", "sknn"):
    app.command(_name)(_classification(_name))
