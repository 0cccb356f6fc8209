"""dms sim run: scenarios of real nodes, their timelines and expectations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dms.cli.app import main
from dms.sim.runner import run_scenario
from dms.sim.scenario import parse_scenario

COMPUTE = Path("examples/jobs/compute.yaml").resolve()
TINY = """
        name: tiny
        deadline_s: 20
        allocations:
          - {name: w, executor: compute, resources: {cpu: 100m, ram: 64MiB}, params: {seconds: 0}}
"""


def scenario(body: str, tmp_path: Path, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


@pytest.fixture(autouse=True)
def _no_dms_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DMS_HOME", "DMS_DB_URL", "DMS_API_PORT", "DMS_BOOTSTRAP", "DMS_LISTEN"):
        monkeypatch.delenv(var, raising=False)


def test_a_failed_expectation_exits_non_zero_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = scenario(
        f"""
name: strict
nodes:
  - name: owner
  - name: p
    count: 2
    onboard: {{cpu: 1, ram: 1, disk: 1}}
timeline:
  - deploy:
      name: many
      count: 3
      spec: {TINY}
expect:
  placement_p50_ms: 0.001
""",
        tmp_path,
    )
    code = main(["sim", "run", str(path), "--report", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 1
    assert "error: 1 expectation(s) failed: placement p50 <= 0.001 ms" in err
    assert "FAILED" in out and "every job completes" in out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["failed"] == ["placement p50 <= 0.001 ms"]
    (batch,) = report["batches"]
    assert batch["completed"] == 3 and batch["p50_ms"] > 0


def test_kill_restart_onboard_and_offboard_steps(tmp_path: Path) -> None:
    """A provider killed and started again from its home takes work again; a node
    onboarded mid-run takes work; an offboarded one is refused bids for."""
    text = f"""
name: lifecycle
nodes:
  - name: owner
  - name: p
    count: 2
    onboard: {{cpu: 1, ram: 1, disk: 1}}
  - name: late
timeline:
  - kill: p-1
  - deploy:
      name: during
      spec: {TINY}
  - wait: {{job: during}}
  - restart: p-1
  - offboard: {{node: p-2}}
  - onboard: {{node: late, cpu: 1, ram: 1, disk: 1}}
  - wait: {{seconds: 1.5}}
  - deploy:
      name: after
      count: 4
      spec: {TINY}
  - wait: {{job: after.4}}
  - kill: p-2
  - kill: p-2
"""
    lines: list[str] = []
    report = run_scenario(parse_scenario(text, "s.yaml"), root=tmp_path, say=lines.append)
    by_name = {c.name: c for c in report.checks}
    # The second kill of p-2 fails (it is not running): the run says which step.
    assert not by_name["every step ran"].ok
    assert "step 11 (kill): p-2 is not running" in by_name["every step ran"].detail
    assert by_name["every job completes"].ok, by_name["every job completes"].detail
    assert by_name["no leaked lease"].ok
    assert any("restart   p-1" in line for line in lines)
