"""`dms mine` as a user runs it: outputs, formats, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dms.cli.app import main
from dms.mining.data import read_table, read_test_table

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dms", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )


def test_skmeans_writes_labels_and_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "mine",
            "skmeans",
            "--data",
            str(EXAMPLES / "iris.csv"),
            "--k",
            "3",
            "--out",
            str(out),
            "--local",
            "--json",
            "--compare",
        ]
    )
    # iris.csv carries the species column: clustering wants numbers only.
    assert code != 0
    code = main(
        [
            "mine",
            "skmeans",
            "--data",
            str(EXAMPLES / "iris-features.csv"),
            "--k",
            "3",
            "--out",
            str(out),
            "--local",
            "--json",
            "--compare",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "result.json").read_text())
    assert printed == saved
    assert saved["algorithm"] == "skmeans" and saved["scheme"] == "ckks"
    assert saved["converged"] is True and len(saved["centroids"]) == 3
    assert set(saved["timings"]) == {"keygen", "encrypt", "compute", "decrypt", "total"}
    assert saved["comparison"]["label_agreement"] == 1.0
    rows = list(csv.reader((out / "labels.csv").open()))
    assert rows[0] == ["label"] and len(rows) == 151


def test_sknn_reports_accuracy_when_test_has_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "knn"
    code = main(
        [
            "mine",
            "sknn",
            "--train",
            str(EXAMPLES / "iris.csv"),
            "--test",
            str(EXAMPLES / "iris-features.csv"),
            "--k",
            "5",
            "--scheme",
            "liu",
            "--distance",
            "MANHATHAN",
            "--out",
            str(out),
            "--local",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["distance"] == "manhattan" and result["comparison"] is None
    labels = [r[0] for r in csv.reader((out / "labels.csv").open())][1:]
    assert len(labels) == 150 and set(labels) <= {"setosa", "versicolor", "virginica"}

    code = main(
        [
            "mine",
            "knn",
            "--train",
            str(EXAMPLES / "iris.csv"),
            "--test",
            str(EXAMPLES / "iris.csv"),
            "--k",
            "1",
            "--out",
            str(out),
            "--local",
            "--json",
        ]
    )
    assert code == 0
    assert json.loads((out / "result.json").read_text())["comparison"]["accuracy"] == 1.0
    capsys.readouterr()


def test_key_folder_is_reused_and_sealed(
    tmp_path: Path, dms_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    args = [
        "mine",
        "skmeans",
        "--data",
        str(EXAMPLES / "iris-features.csv"),
        "--k",
        "3",
        "--scheme",
        "liu",
        "--keys",
        str(keys),
        "--out",
        str(tmp_path / "o"),
        "--local",
        "--json",
    ]
    assert main(args) == 0
    assert {p.name for p in keys.iterdir()} == {"secretkey", "meta.json"}
    sealed = (keys / "secretkey").read_text()
    assert '"k"' not in sealed and "ciphertext" in sealed
    assert main(args) == 0  # loads the same keys
    os.environ["DMS_PASSPHRASE"] = "wrong"
    assert main(args) == 1
    assert "wrong passphrase" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, args, message",
    [
        (None, ("--k", "2"), "no such file"),
        ("", ("--k", "2"), "empty"),
        ("a,b\n1,2\n3,x\n", ("--k", "1"), "row 3, column 'b': 'x' is not a number"),
        ("1,2\n3,4\n", ("--k", "0"), "k must be at least 1"),
        ("1,2\n3,4\n", ("--k", "3"), "k = 3 exceeds the 2 records"),
        ("1,2\n3,4,5\n", ("--k", "1"), "row 2 has 3 cells"),
        ("1,2\n3,4\n", ("--k", "1", "--distance", "cosine"), "unknown distance"),
        ("1,2\n3,4\n", ("--k", "1", "--scheme", "rsa"), "unknown scheme"),
    ],
)
def test_bad_clustering_input_is_one_line(
    tmp_path: Path, content: str | None, args: tuple[str, ...], message: str
) -> None:
    data = tmp_path / "data.csv"
    if content is not None:
        data.write_text(content)
    result = run_cli(
        "mine", "skmeans", "--data", str(data), "--out", str(tmp_path / "o"), "--local", *args
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # nothing on stdout (a progress bar begun before the mistake was found left an
    # empty line in a pipe)
    assert result.stdout == ""
    assert not (tmp_path / "o" / "labels.csv").exists()


def test_mismatched_train_and_test_columns(tmp_path: Path) -> None:
    test = tmp_path / "test.csv"
    test.write_text("1,2\n3,4\n")
    result = run_cli(
        "mine",
        "sknn",
        "--train",
        str(EXAMPLES / "iris.csv"),
        "--test",
        str(test),
        "--k",
        "3",
        "--out",
        str(tmp_path / "o"),
        "--local",
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "test rows have 2 columns; training has 4 features" in result.stderr


def test_without_a_running_node_placement_says_how_to_start_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DMS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DMS_PASSPHRASE", "pw")
    assert run_cli("init").returncode == 0
    result = run_cli(
        "mine",
        "skmeans",
        "--data",
        str(EXAMPLES / "iris-features.csv"),
        "--k",
        "3",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2  # one sentence (wrapped at most once by the terminal)
    assert "dms run" in result.stderr and "--local" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("timeout", "said"),
    [
        ("604801", "error: --timeout must be at most 604800 seconds (7 days), the node's limit"),
        ("1e9", "error: --timeout must be at most 604800 seconds (7 days), the node's limit"),
        ("0", "error: --timeout must be at least 1 second"),
        ("-5", "error: --timeout must be at least 1 second"),
        # float() reads both; typer's min=1 let them through to "no node is running"
        ("inf", "error: --timeout must be at most 604800 seconds (7 days), the node's limit"),
        ("nan", "error: --timeout must be at least 1 second"),
        ("604800", "error: no node is running for"),  # the limit itself is taken
    ],
)
def test_a_timeout_outside_the_nodes_limits_is_one_line_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timeout: str, said: str
) -> None:
    """``--timeout`` past the node's 7 days went to the node, which refused it in
    pydantic's words ("bad_payload: timeout_s: Input should be less than or equal to
    604800"); without a node, the mistake went unsaid behind "no node is running". 0 or
    less was typer's boxed usage error. Now the CLI says either in one line, naming the
    limit, the node's own (``dms.jobs.spec.MAX_DEADLINE_S``)."""
    monkeypatch.setenv("DMS_HOME", str(tmp_path / "home"))
    data = str(EXAMPLES / "iris-features.csv")
    result = run_cli(
        "mine", "skmeans", "--data", data, "--k", "3", "--out", str(tmp_path / "o"),
        "--timeout", timeout,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(said) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "o").exists()


def test_the_clis_timeout_limit_is_the_one_the_node_checks() -> None:
    """One limit: a mining request's ``timeout_s`` becomes its deployment's deadline, and
    both are bounded by ``MAX_DEADLINE_S``, which the CLI names."""
    from annotated_types import Le

    from dms.jobs.spec import MAX_DEADLINE_S, DeploymentSpec
    from dms.node.collab import ProposeRequest
    from dms.orchestrator.mining_owner import MiningRequest

    for model, field in (
        (MiningRequest, "timeout_s"),
        (DeploymentSpec, "deadline_s"),
        (ProposeRequest, "timeout_s"),
    ):
        bounds = [m.le for m in model.model_fields[field].metadata if isinstance(m, Le)]
        assert bounds == [MAX_DEADLINE_S], (model.__name__, field, bounds)


def test_csv_reading_rules(tmp_path: Path) -> None:
    no_header = tmp_path / "plain.csv"
    no_header.write_text("1,2,a\n3,4,b\n")
    table = read_table(no_header, label=True)
    assert table.labels == ["a", "b"] and table.features.tolist() == [[1, 2], [3, 4]]
    named = tmp_path / "named.csv"
    named.write_text("kind,x,y\na,1,2\nb,3,4\n")
    table = read_table(named, label=True, label_column="kind")
    assert table.labels == ["a", "b"] and table.columns == ["x", "y"]
    with_label = tmp_path / "test.csv"
    with_label.write_text("kind,x,y\nb,5,6\n")
    assert read_test_table(with_label, table).labels == ["b"]
    without = tmp_path / "test2.csv"
    without.write_text("5,6\n")
    assert read_test_table(without, table).labels is None


def test_synthetic_generator_is_seeded(tmp_path: Path) -> None:
    from dms.mining.data import _main as generate

    paths = [tmp_path / f"{i}.csv" for i in range(3)]
    for path, seed in zip(paths, (4, 4, 5), strict=True):
        assert (
            generate(
                [
                    "classification",
                    "--n",
                    "50",
                    "--a",
                    "3",
                    "--classes",
                    "2",
                    "--seed",
                    str(seed),
                    "--out",
                    str(path),
                ]
            )
            == 0
        )
    assert paths[0].read_text() == paths[1].read_text() != paths[2].read_text()
    table = read_table(paths[0], label=True)
    assert table.features.shape == (50, 3) and set(table.labels or []) <= {"class0", "class1"}


def test_unusable_output_path_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli(
        "mine",
        "kmeans",
        "--data",
        str(EXAMPLES / "iris-features.csv"),
        "--k",
        "3",
        "--out",
        str(blocker / "out"),
        "--local",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(blocker) in result.stderr and len(result.stderr.strip().splitlines()) == 1
