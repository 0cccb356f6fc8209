"""bench/close.py: a host's goodbye, py-libp2p's close against ``close_host``; one JSON
line a peer count, every peer told by ``close_host``, nothing left open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "close.py"


def test_the_close_bench_tells_every_peer_and_prints_both_sides() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--peers", "3", "--rounds", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.splitlines()[-1])
    assert line["bench"] == "close" and line["peers"] == 3
    assert line["close_host_left"] == 0 and line["close_host_told"] == 3
    assert line["swarm_close_left"] == 0 and line["swarm_close_told"] == 3  # 3 fit in 5 s
    assert line["swarm_close_s"] > 0 and line["close_host_s"] > 0
