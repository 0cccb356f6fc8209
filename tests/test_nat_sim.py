"""``dms sim`` mode netns: examples/sim/nat.yaml across real NATs (root only), and the
reason given where namespaces cannot be made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dms.cli.app import main
from dms.sim.netns import unavailable
from dms.sim.scenario import ScenarioError, parse_scenario

WHY_NOT = unavailable()


@pytest.fixture(autouse=True)
def _no_dms_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DMS_HOME", "DMS_DB_URL", "DMS_API_PORT", "DMS_BOOTSTRAP", "DMS_LISTEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.skipif(WHY_NOT is not None, reason=f"no NAT topology: {WHY_NOT}")
def test_the_nat_scenario_mines_on_two_nated_providers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A public relay, two providers and an owner each behind a NAT of its own: the
    owner's encrypted k-means is placed on both providers, gives the labels of
    --local, and the report says how each worker was reached."""
    report_dir = tmp_path / "report"
    before = set(_namespaces())
    args = ["sim", "run", "examples/sim/nat.yaml", "--json", "--report", str(report_dir)]
    code = main([*args, "--root", str(tmp_path / "homes")])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    report = json.loads(out)
    assert report["ok"] and report["mode"] == "netns" and report["nodes"] == 4
    (job,) = report["jobs"]
    assert job["state"] == "completed" and job["labels_equal_local"]
    # No provider can be dialed from the owner's NAT: each shard's worker was reached
    # through the relay, or directly once hole punching opened a path.
    assert len(job["paths"]) == 2 and set(job["paths"]) <= {"relayed", "direct"}, job
    assert "relay public; 3 node(s) behind NAT" in err
    left = [ns for ns in set(_namespaces()) - before if ns.endswith("-provider-1")]
    assert not left, f"the namespaces outlive the run: {left}"


def _namespaces() -> list[str]:
    import subprocess

    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def test_netns_mode_says_why_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the rights to make namespaces the run stops before any node starts,
    with the reason (not a traceback)."""
    import dms.sim.netns_mode

    monkeypatch.setattr(dms.sim.netns_mode, "unavailable", lambda: "network namespaces need root")
    code = main(["sim", "run", "examples/sim/nat.yaml", "--root", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code != 0
    assert "mode netns cannot run here: network namespaces need root" in err
    assert "Traceback" not in err


def test_a_netns_scenario_needs_a_public_node() -> None:
    text = "mode: netns\nnodes:\n  - name: owner\n  - name: p\n    count: 2\n"
    with pytest.raises(ScenarioError, match="needs a public node"):
        parse_scenario(text, "nat.yaml")
