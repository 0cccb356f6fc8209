"""bench/provider_handlers.py: the provider's placement handlers alone, in one process;
one JSON line with each handler's figures, no lease left behind and the ledger's
invariant kept, also when a deployment's own actor (with its certificate) asks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "provider_handlers.py"


@pytest.mark.parametrize("child", [False, True])
def test_the_handlers_bench_places_and_leaves_no_lease(tmp_path: Path, child: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
    env["TMPDIR"] = str(tmp_path)
    args = ["--n", "20", "--warmup", "5", "--json", *(["--child"] if child else [])]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.splitlines()[-1])
    assert line["leaked_leases"] == 0 and line["violations"] == []
    assert line["child"] is child
    for handler in ("bid_request", "allocate", "revert"):
        figures = line["handlers_us"][handler]
        assert figures["wall"] > 0 and figures["cpu"] > 0 and figures["rtt"] > 0
    assert line["inner_us"]["lock_many"]["wall"] > 0 and line["end_us"] > 0
