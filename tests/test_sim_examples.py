"""The scenarios of examples/sim, run as a user runs them (dms sim run FILE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dms.cli.app import main


@pytest.fixture(autouse=True)
def _no_dms_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DMS_HOME", "DMS_DB_URL", "DMS_API_PORT", "DMS_BOOTSTRAP", "DMS_LISTEN"):
        monkeypatch.delenv(var, raising=False)


def test_quickstart_a_provider_killed_mid_job_and_the_labels_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's main job: 4 nodes, encrypted k-means on Iris on two providers, one
    killed mid-job; every expectation holds, and report.json says so."""
    code = main(["sim", "run", "examples/sim/quickstart.yaml", "--json", "--report", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["failed"] == []
    assert report["duration_s"] > 0  # how long it takes is measured in bench/, not here
    (job,) = report["jobs"]
    assert job["state"] == "completed" and job["replacements"] >= 1
    assert job["labels_equal_local"] and job["labels_equal_plaintext"]
    assert report["leases"]["leaked"] == 0
    kills = [e for e in report["timeline"] if e["action"] == "kill"]
    assert len(kills) == 1 and "worker of iris" in kills[0]["what"]
    # With --json the timeline goes to stderr, as it happens; stdout is the report.
    assert "kill -9" in err and "iris completed" in err
    names = {e["name"] for e in report["expectations"]}
    assert {"every job completes", "no leaked lease", "mining labels equal --local"} <= names


@pytest.mark.slow
def test_twenty_runs_in_a_row_of_a_provider_killed_mid_mining(tmp_path: Path) -> None:
    """The quickstart, 20 times: each run completes after its worker is killed and
    replaced, with no lease left, and every run gives the same labels."""
    from dms.sim.runner import run_scenario
    from dms.sim.scenario import load_scenario

    scenario = load_scenario(Path("examples/sim/quickstart.yaml"))
    digests = set()
    for i in range(20):
        report = run_scenario(scenario, root=tmp_path / f"run{i}")
        assert report.ok, (i, [(c.name, c.detail) for c in report.failed])
        (job,) = report.jobs
        assert job["replacements"] >= 1 and job["labels_equal_plaintext"]
        digests.add(job["labels_sha256"])
    assert len(digests) == 1


def test_examples_readme_names_every_job_file_and_scenario() -> None:
    """examples/README.md listed the data only: a newcomer looking there for the job
    file of 'dms deploy' or the scenarios of 'dms sim run' found neither."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    readme = (examples / "README.md").read_text()
    files = sorted((examples / "jobs").glob("*.yaml")) + sorted((examples / "sim").glob("*.yaml"))
    assert files
    missing = [
        str(f.relative_to(examples)) for f in files if f"`{f.relative_to(examples)}`" not in readme
    ]
    assert not missing, missing
