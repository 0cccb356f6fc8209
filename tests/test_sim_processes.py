"""dms sim in processes mode (a dms run per node) and dms sim up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dms.sim.runner import run_scenario
from dms.sim.scenario import parse_scenario
from tests.clitools import PASSPHRASE, dms_json

TINY = """
        name: tiny
        deadline_s: 20
        allocations:
          - {name: w, executor: compute, resources: {cpu: 100m, ram: 64MiB}, params: {seconds: 0}}
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_processes_mode_places_work_across_dms_run_daemons_and_survives_kill_9(
    tmp_path: Path,
) -> None:
    text = f"""
name: processes
mode: processes
nodes:
  - name: owner
  - name: p
    count: 2
    onboard: {{cpu: 1, ram: 1, disk: 1}}
timeline:
  - deploy:
      name: before
      count: 3
      spec: {TINY}
  - kill: p-1
  - deploy:
      name: during
      spec: {TINY}
  - wait: {{job: during}}
  - restart: p-1
  - wait: {{seconds: 2}}
  - deploy:
      name: after
      count: 3
      concurrent: true
      spec: {TINY}
"""
    lines: list[str] = []
    report = run_scenario(parse_scenario(text, "s.yaml"), root=tmp_path, say=lines.append)
    assert report.ok, [(c.name, c.detail) for c in report.failed]
    assert [b["completed"] for b in report.batches] == [3, 3]
    # Each node ran as its own 'dms run', with its own home and log.
    for name in ("owner", "p-1", "p-2"):
        assert (tmp_path / name / "key" / "dms.json").exists()
        assert (tmp_path / name / "logs" / "run.log").stat().st_size > 0
    assert any("kill      p-1: kill -9" in line for line in lines)


def sim_up(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
    env["DMS_PASSPHRASE"] = PASSPHRASE
    proc = subprocess.Popen(
        [sys.executable, "-m", "dms", "sim", "up", "--root", str(tmp_path), "--json", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    return proc, json.loads(line)


@pytest.mark.parametrize("mode", ["processes", "threads"])
def test_sim_up_prints_each_nodes_home_and_api_and_ctrl_c_stops_them_all(
    tmp_path: Path, mode: str
) -> None:
    proc, info = sim_up(tmp_path, "--nodes", "3", "--mode", mode)
    try:
        nodes = info["nodes"]
        assert [n["name"] for n in nodes] == ["node-1", "node-2", "node-3"]
        assert all(n["api"].startswith("http://127.0.0.1:") for n in nodes)
        # The normal CLI works against any node, with its DMS_HOME.
        home = Path(nodes[0]["home"])
        peers = dms_json(home, "peers", "list")
        assert {p["peer_id"] for p in peers if p["status"] == "alive"} == {
            n["peer_id"] for n in nodes[1:]
        }
        assert dms_json(Path(nodes[2]["home"]), "resources")["onboarded"]
        pids = [n["pid"] for n in nodes if "pid" in n]
        assert len(pids) == (3 if mode == "processes" else 0)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "3 node(s) stopped" in err
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)
    for n in nodes:  # each stopped cleanly: its API file is gone
        assert not (Path(n["home"]) / "api.json").exists()


def test_sim_up_refuses_bad_amounts_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dms", "sim", "up", "--cpu", "lots", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: --cpu: cpu: 'lots' is not a number with a unit"
    ]


def test_a_node_runs_the_dms_of_the_process_that_starts_it(tmp_path: Path) -> None:
    """'python -m dms' put the working directory first on the node's path: started from
    another checkout's folder, a node ran that checkout's dms, whatever PYTHONPATH said
    (a before/after bench run from one folder compared a tree's daemons with
    themselves). Here the folder holds a dms that is not ours."""
    import dms
    from dms.sim.backend import NodeSpec
    from dms.sim.faults import FaultPlan
    from dms.sim.processes import ProcessBackend
    from dms.sim.scenario import NodeSettings

    other = tmp_path / "other"
    (other / "dms").mkdir(parents=True)
    (other / "dms" / "__init__.py").write_text("")
    backend = ProcessBackend(tmp_path / "nodes", [NodeSpec("n", "g")], NodeSettings(), FaultPlan())
    out = subprocess.run(
        [sys.executable, "-c", "import dms; print(dms.__file__)"],
        env=backend._env(tmp_path / "home"),
        cwd=other,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(out).resolve() == Path(dms.__file__).resolve()
