"""dms sim with a collaboration step (issue 29): several owners' joint k-means on real node
actors, in memory mode (the aggregator's session carries inline messages only there)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dms.cli.app import main
from dms.mining.collab import Proposal
from dms.mining.plain import ClusteringParams, kmeans
from dms.sim.collab import plaintext_reference
from dms.sim.runner import run_scenario
from dms.sim.scenario import ScenarioError, parse_scenario

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _no_dms_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DMS_HOME", "DMS_DB_URL", "DMS_API_PORT", "DMS_BOOTSTRAP", "DMS_LISTEN"):
        monkeypatch.delenv(var, raising=False)


def small(threshold: int, kill: str | None = "owner-5") -> str:
    """Five owners; with ``kill``, that owner is killed after round 2 of 200 (the rounds
    do not end before it: the collaboration fails or drops it). An owner drops after
    10 s without an answer: 3 s was no longer than a loaded machine's pause, and
    dropped a live owner."""
    steps = f"  - wait: {{job: iris, steps: 2}}\n  - kill: {kill}\n" if kill else ""
    return f"""
name: collab-small
mode: memory
nodes:
  - name: owner
    count: 5
  - name: provider
    count: 2
    onboard: {{cpu: 1, ram: 1, disk: 1}}
timeline:
  - collab:
      name: iris
      owners: [owner]
      blobs: {{rows: 3000, attributes: 4, centers: 3, seed: 7, std: 1.5}}
      k: 3
      rounds: {200 if kill else 10}
      threshold: {threshold}
      owner_timeout_s: 10
{steps}  - wait: {{job: iris}}
"""


def test_the_50_owner_example_completes_and_equals_plaintext(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/sim/collab-50.yaml as a user runs it: 50 owners' node actors get k-means
    in the clear on the union, every round over all fifty."""
    code = main(["sim", "run", "examples/sim/collab-50.yaml", "--json", "--report", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    report = json.loads(out)
    assert report["ok"] and report["nodes"] == 53
    (job,) = report["jobs"]
    assert job["kind"] == "collab" and job["state"] == "completed"
    assert job["owners"] == 50 and job["steps"] == 10
    assert job["dropped"] == []
    assert job["equals_plaintext"] is True, job["plaintext_detail"]
    assert job["aggregator"].startswith("provider-")
    assert 0 < job["kb_per_owner_per_round"] < 64  # O(m) per owner, whatever n is
    assert report["leases"]["leaked"] == 0


def test_an_owner_killed_mid_job_stops_the_simulated_collaboration_naming_it(
    tmp_path: Path,
) -> None:
    """A round summed without the killed owner, beside the rounds summed with it, would
    give its statistics: the collaboration fails instead, naming it (threshold 3 of 5:
    not for want of owners)."""
    lines: list[str] = []
    scenario = parse_scenario(small(threshold=3), "s.yaml")
    report = run_scenario(scenario, root=tmp_path, say=lines.append)
    (job,) = report.jobs
    assert job["state"] == "failed"
    reason = job["reason"]
    # Killed before its input: "no input from P"; between its input and its unmask
    # reply, that round still sums (its self mask rebuilt) and the next has no input.
    assert "no input from" in reason and "a round is summed only over all" in reason, job
    assert not any(c.ok for c in report.checks if c.name == "every job completes")
    assert report.leases["leaked"] == 0  # the aggregator's lease went with the failure


def test_a_simulated_collaboration_without_faults_is_plaintext_kmeans_of_the_union(
    tmp_path: Path,
) -> None:
    report = run_scenario(parse_scenario(small(3, kill=None), "s.yaml"), root=tmp_path)
    assert report.ok, [(c.name, c.detail) for c in report.failed]
    (job,) = report.jobs
    assert job["equals_plaintext"] is True and job["dropped"] == []


def test_the_plaintext_reference_counts_a_dropped_owners_rows_until_it_dropped() -> None:
    iris = np.loadtxt(EXAMPLES / "iris-features.csv", delimiter=",", skiprows=1)
    parts = np.array_split(iris, 3)
    proposal = Proposal(
        collab_id="r", owners=["a", "b", "c"], a=4, k=3, rounds=5, threshold=2,
        centroids=iris[:3].tolist(),
    )  # fmt: skip
    centroids, labels = plaintext_reference(parts, proposal, {})
    five = ClusteringParams(3, min_error=-1.0, max_iterations=5)
    plain = kmeans(iris, five, centroids=iris[:3].copy())
    np.testing.assert_allclose(centroids, plain.centroids, atol=1e-9)
    assert np.concatenate(labels).tolist() == plain.labels.tolist()  # type: ignore[arg-type]
    centroids, labels = plaintext_reference(parts, proposal, {2: 1})  # c never counted
    two = kmeans(np.concatenate(parts[:2]), five, centroids=iris[:3].copy())
    np.testing.assert_allclose(centroids, two.centroids, atol=1e-9)
    assert labels[2] is None


BAD = """
mode: memory
nodes:
  - name: owner
    count: 4
  - name: provider
    onboard: {{cpu: 1, ram: 1, disk: 1}}
timeline:
  - collab:
      name: c
      owners: [{owners}]
      {rows}
      k: 2
      threshold: {threshold}
"""


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"threshold": 5}, "timeline.0.collab.threshold (line 14): threshold 5 with 4 owners"),
        ({"owners": "nobody"}, "timeline.0.collab.owners.0 (line 11): no group or node 'nobody'"),
        ({"rows": "data: nothing.csv"}, "collab.data (line 12): no such file: nothing.csv"),
        ({"rows": "seed: 1"}, "timeline.0.collab (line 10): give the rows as 'data' (a CSV) or"),
    ],
)
def test_a_bad_collab_step_is_refused_with_its_field_and_line(
    fields: dict[str, object], message: str
) -> None:
    values = {"owners": "owner", "rows": "blobs: {rows: 100, attributes: 2, centers: 2}"}
    values["threshold"] = 3
    text = BAD.format(**{**values, **fields})
    with pytest.raises(ScenarioError) as err:
        parse_scenario(text, "s.yaml", base=EXAMPLES)
    assert message in str(err.value)
