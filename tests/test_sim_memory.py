"""dms sim in memory mode: many real node actors on the in-memory transport."""

from __future__ import annotations

from pathlib import Path

import pytest

from dms.cli.app import main
from dms.sim.runner import run_scenario
from dms.sim.scenario import load_scenario, parse_scenario

TINY = """
        name: tiny
        deadline_s: 30
        allocations:
          - {name: w, executor: compute, resources: {cpu: 100m, ram: 64MiB}, params: {seconds: 0}}
"""


def test_memory_mode_places_kills_restarts_and_takes_every_fault(tmp_path: Path) -> None:
    text = f"""
mode: memory
nodes:
  - name: owner
  - name: a
    count: 15
    onboard: {{cpu: 1, ram: 1, disk: 1}}
  - name: b
    count: 15
    onboard: {{cpu: 1, ram: 1, disk: 1}}
    labels: [b]
timeline:
  - deploy:
      name: seq
      count: 10
      spec: {TINY}
  - kill: a-1
  - kill: b-1
  - partition: [[owner, a], [b]]
  - deploy:
      name: only-b
      concurrent: true
      spec:
        name: only-b
        deadline_s: 30
        allocations:
          - name: w
            executor: compute
            resources: {{cpu: 100m, ram: 64MiB}}
            constraints: {{labels: [b]}}
  - wait: {{seconds: 1}}
  - heal: true
  - wait: {{job: only-b}}
  - link: {{between: [owner, a], latency_ms: 100}}
  - link: {{between: [owner, b-2], loss: 0.5}}
  - deploy:
      name: conc
      count: 10
      concurrent: true
      spec: {TINY}
  - restart: a-1
  - wait: {{job: conc.10}}
expect:
  settle_s: 12
"""
    lines: list[str] = []
    report = run_scenario(parse_scenario(text, "s.yaml"), root=tmp_path, say=lines.append)
    assert report.ok, [(c.name, c.detail) for c in report.failed]
    jobs = {j["name"]: j for j in report.jobs}
    assert jobs["only-b"]["placement_ms"] >= 1000  # placed after the heal
    assert report.faults["dropped_partition"] > 0
    assert report.faults["delayed"] > 0
    assert [b["completed"] for b in report.batches] == [10, 10]
    assert any("restart   a-1" in line for line in lines)


def test_memory_mode_refuses_a_mining_scenario_with_the_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["sim", "run", "examples/sim/quickstart.yaml", "--mode", "memory"])
    err = capsys.readouterr().err
    assert code == 1
    assert "timeline.0.mine (line 17): mining needs libp2p" in err


@pytest.mark.slow
def test_the_500_node_example_places_every_job_without_leaks(tmp_path: Path) -> None:
    scenario = load_scenario(Path("examples/sim/placement-500.yaml"))
    report = run_scenario(scenario, root=tmp_path)
    assert report.ok, [(c.name, c.detail) for c in report.failed]
    assert report.nodes == 500
    assert [b["completed"] for b in report.batches] == [40, 40]


def test_a_memory_node_whose_start_fails_on_its_store_says_so(tmp_path: Path) -> None:
    """86789ab has the node actor keep a store's error of its start for the start's
    handshake (STARTED), no longer raising it: dms run's Node.start asks and says it,
    but a memory node never asked, and one whose restart met a damaged row ran on
    half-started (no heartbeat, no peering), its error at DEBUG only. It now fails the
    restart saying why, as dms run does, and is not running."""
    import sqlite3
    from contextlib import closing

    from dms.sim.backend import NodeSpec, SimError
    from dms.sim.faults import FaultPlan
    from dms.sim.memory import MemoryBackend
    from dms.sim.scenario import NodeSettings

    backend = MemoryBackend(tmp_path, [NodeSpec("a", "a")], NodeSettings(), FaultPlan())
    backend.start(lambda _: None)
    try:
        backend.crash("a")
        with closing(sqlite3.connect(backend.node("a").home / "dms.db")) as conn, conn:
            conn.execute("INSERT INTO onboarding VALUES (1, 'lots', 1024, 1024, 0, 0.0, 0)")
        with pytest.raises(SimError) as failed:
            backend.restart("a")
        said = str(failed.value)
        assert "the store is damaged: the onboarding row's amounts" in said, said
        assert said.startswith("a did not start: "), said
        assert not backend.running("a")
    finally:
        backend.stop()
