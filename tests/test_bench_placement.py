"""bench/placement.py in processes mode (issue 30): every provider a dms run daemon of its
own, the requester measured in the bench's process; one JSON line per concurrency with
the keys the issue names, and no lease left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "placement.py"
KEYS = {"p50_ms", "p95_ms", "placements_per_s", "concurrency", "leaked_leases", "phases_ms"}


def test_processes_mode_places_on_provider_daemons_and_prints_the_figures(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
    env["TMPDIR"] = str(tmp_path)  # where the run's node homes go
    args = ["--processes", "--nodes", "2", "--concurrency", "1", "2", "--jobs", "4", "--json"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["concurrency"] for line in lines] == [1, 2]
    for line in lines:
        assert line.keys() >= KEYS, line
        assert line["mode"] == "processes" and line["providers"] == 2 and line["nodes"] == 3
        assert line["success_rate"] == 1.0 and line["leaked_leases"] == 0, line
        assert line["p50_ms"] > 0 and line["placements_per_s"] > 0
        assert line["phases_ms"].keys() >= {"setup", "bids", "commit"}
        # Each placement's bid, allocate and revert messages, between the requester and
        # the providers' processes, are counted.
        assert line["messages_per_placement"] > 0
    # The nodes' homes (50 daemons' stores and logs a run) are gone with the run.
    assert not list(tmp_path.glob("dms-placement-*"))
