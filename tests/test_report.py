"""``dms mine ... --report``: one self-contained page, its sections and its plot data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dms.cli.app import main
from dms.mining.learned import LEARNED, learned_for
from dms.mining.metrics import matched_agreement, matched_labels
from dms.report import SECTIONS, ReportInput, confusion, pca_2d, render

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IRIS = EXAMPLES / "iris-features.csv"

# Anything a browser would fetch: a src/href/url() or an @import that is not local.
REMOTE = re.compile(
    r"""(?:\b(?:src|href|xlink:href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//)"""
    r"""|(?:url\(\s*["']?\s*(?:https?:)?//)|(?:@import)""",
    re.I,
)


def report_data(page: str) -> dict[str, Any]:
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page)
    assert found, "the page embeds its plot data"
    return json.loads(found.group(1).replace("<\\/", "</"))


def assert_offline(page: str) -> None:
    assert not REMOTE.search(page), REMOTE.search(page)
    # no external resources of any kind: no script or style sheet by reference
    assert "<link" not in page and not re.search(r"<script[^>]*\bsrc=", page)
    assert "<img" not in page and "<iframe" not in page


def sections(page: str) -> list[str]:
    return re.findall(r'<section id="([a-z]+)">', page)


def test_skmeans_report_has_every_section_and_its_plot_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["mine", "skmeans", "--data", str(IRIS), "--k", "3", "--local", "--report"]
    assert main([*args, "--out", str(out), "--compare", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == str(out / "report.html")
    page = (out / "report.html").read_text()
    assert_offline(page)
    assert sections(page) == ["summary", "clusters", "convergence", "timings", "placement",
                              "learned"]  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    data = report_data(page)
    # the clusters: every record in 2-D, the job's labels beside plaintext k-means'
    clusters = data["clusters"]
    assert clusters["total"] == clusters["shown"] == 150 == len(clusters["points"])
    labels = (out / "labels.csv").read_text().split()[1:]
    assert clusters["labels"] == labels
    assert clusters["adjusted_rand_index"] == 1.0 and clusters["matched_agreement"] == 1.0
    assert clusters["baseline"] == labels  # matched to the job's numbering
    # convergence: one change per round, as result.json says
    assert len(result["changes"]) == result["iterations"] == len(result["round_s"])
    assert data["convergence"]["changes"] == result["changes"]
    assert result["changes"][-1] <= 0.015 and result["converged"]
    # time per phase: the owner's timings and the worker's compute
    phases = {(t["who"], t["phase"]) for t in data["timings"]}
    assert {("owner", "keygen"), ("owner", "encrypt"), ("worker", "compute")} <= phases
    # the figures are inline SVG, each drawing its data (gids)
    for figure in ("clusters", "convergence", "timings"):
        assert f'id="fig-{figure}"' in page
    for gid in ("encrypted-0", "plain-2", "changes", "round-times", "phases"):
        assert f'id="{gid}' in page
    assert page.count("<svg") == 3 and "<?xml" not in page and "DOCTYPE svg" not in page
    # what each party learned: every row of the table, this job's highlighted
    for row in LEARNED:
        assert row.case in page
    assert '<tr class="this"><td>SKMeans, blind, CKKS (default)' in page
    assert "--local: the owner and the worker both ran on this machine" in page


def test_sknn_report_has_the_confusion_matrix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = (EXAMPLES / "iris.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    (tmp_path / "train.csv").write_text("\n".join([header, *body[0::3], *body[1::3]]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join([header, *body[2::3]]) + "\n")
    truth = [line.rsplit(",", 1)[1] for line in body[2::3]]
    out = tmp_path / "out"
    args = ["mine", "sknn", "--train", str(tmp_path / "train.csv"), "--test"]
    args += [str(tmp_path / "test.csv"), "--k", "5", "--local", "--report", "--json"]
    assert main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    page = (out / "report.html").read_text()
    assert_offline(page)
    assert sections(page) == ["summary", "clusters", "convergence", "timings", "placement",
                              "confusion", "learned"]  # fmt: skip
    data = report_data(page)
    predicted = (out / "labels.csv").read_text().split()[1:]
    names, matrix = data["confusion"]["labels"], data["confusion"]["matrix"]
    assert names == ["setosa", "versicolor", "virginica"]
    assert sum(map(sum, matrix)) == len(truth) == 50
    hits = sum(p == t for p, t in zip(predicted, truth, strict=True))
    assert sum(matrix[i][i] for i in range(3)) == hits
    assert data["clusters"]["truth"] == truth
    assert data["clusters"]["agreement_with_plain"] == 1.0
    assert 'id="fig-confusion"' in page and 'id="truth-setosa' in page
    assert '<tr class="this"><td>SKNN, blind, CKKS (default)' in page


def test_placed_report_shows_peers_megabytes_and_steps() -> None:
    """The page for a placed job's result (as ``dms mine`` without --local writes it)."""
    rng = np.random.default_rng(1)
    points = np.vstack([rng.normal(0, 1, (40, 3)), rng.normal(6, 1, (40, 3))])
    labels = [0] * 40 + [1] * 40
    summary = {
        "algorithm": "skmeans", "scheme": "ckks", "protocol": "blind", "distance": "euclidean",
        "k": 2, "records": 80, "attributes": 3, "iterations": 2, "converged": True,
        "timings": {"keygen": 0.1, "encrypt": 0.2, "decrypt": 0.05, "total": 3.0},
        "bytes_to_worker": 20_000_000, "bytes_to_owner": 5_000_000,
        "placement": [
            {"shard": "shard0", "peer_id": "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA1",
             "rows": 40, "mb_sent": 10.5, "mb_received": 2.5, "rounds": 4, "placements": 1,
             "lost": []},
            {"shard": "shard1", "peer_id": "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB2",
             "rows": 40, "mb_sent": 9.5, "mb_received": 2.5, "rounds": 4, "placements": 2,
             "lost": []},
        ],
        "replacements": 1, "owner_cpu_s": 0.4, "worker_cpu_s": 1.2, "wall_s": 3.0,
        "session": "abc123",
        "changes": [0.5, 0.01],
        "steps": [{"step": i, "change": None, "s": 0.3 + i / 10, "slowest": "shard0"}
                  for i in range(1, 5)],
    }  # fmt: skip
    page = render(ReportInput(summary, labels, points, baseline=[1] * 40 + [0] * 40))
    assert_offline(page)
    data = report_data(page)
    assert [p["peer_id"][-1] for p in data["placement"]] == ["1", "2"]
    assert [p["mb_sent"] for p in data["placement"]] == [10.5, 9.5]
    assert data["convergence"]["round_s"] == [0.4, 0.5, 0.6, 0.7]
    assert data["convergence"]["changes"] == [0.5, 0.01]
    phases = {(t["who"], t["phase"]): t["s"] for t in data["timings"]}
    assert phases[("workers", "CPU (all shards)")] == 1.2 and phases[("owner", "session CPU")]
    assert 'id="fig-placement"' in page and 'id="mb-sent' in page
    assert "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB2" in page
    assert "replacements: 1" in page and "each provider&#x27;s node also sees" in page
    # the baseline numbered its clusters the other way round: matched, they agree
    assert data["clusters"]["matched_agreement"] == 1.0
    assert data["clusters"]["baseline"] == data["clusters"]["labels"]


def test_report_pieces() -> None:
    projected, shares = pca_2d(np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.1]]))
    assert projected.shape == (3, 2) and shares[0] > 0.99
    assert pca_2d(np.array([[1.0], [2.0]]))[0].shape == (2, 2)  # one attribute: padded
    names, matrix = confusion(["a", "b", "b"], ["a", "a", "b"])
    assert names == ["a", "b"] and matrix == [[1, 0], [1, 1]]
    assert matched_labels([0, 0, 1, 1, 2], [2, 2, 0, 0, 1]) == [0, 0, 1, 1, 2]
    assert matched_agreement([0, 0, 1, 1], [1, 1, 1, 0]) == 0.75
    assert learned_for("sknn", "udm", "liu") is not None
    assert learned_for("kmeans", None, "plain") is not None
    assert set(SECTIONS) >= {"clusters", "convergence", "timings", "placement", "learned"}


def test_learned_table_mirrors_the_spec() -> None:
    """Every row of specs/mining.md's table is in dms.mining.learned, and no other."""
    spec = (Path(__file__).resolve().parent.parent / "specs" / "mining.md").read_text()
    table = spec.split("## What each party learns", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == len(LEARNED)
    for line, row in zip(rows, LEARNED, strict=True):
        first = re.sub(r"\*\*|\\", "", line.split("|")[1]).strip()
        assert first.split(" (")[0] == row.case.split(" (")[0], (first, row.case)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium installed")
def test_report_renders_in_a_browser_with_no_network(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["mine", "kmeans", "--data", str(IRIS), "--k", "3", "--local", "--report"]
    assert main([*args, "--out", str(out), "--json"]) == 0
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--proxy-server=127.0.0.1:9", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert 'id="fig-clusters"' in dom and 'id="learned"' in dom
