"""Placement as a simulated network grows: dms sim in memory and processes modes.

Each case is a scenario (``dms.sim``): one requester and N - 1 onboarded
providers; once start-up has settled, M single-allocation jobs (a ``compute``
allocation that returns at once) are placed one after another, then M all at
once, as in ``bench/placement.py``. Figures, one JSON line per case:

- ``success_rate``: jobs that completed, over all (2 M);
- ``p50_ms`` / ``p95_ms``: request to running, one after another;
- ``placements_per_s``: all at once, M placements over the time to the last one
  running;
- ``leaked_leases``: leases and allocations still live on any running node 5 s
  after the end (under the 10 s lease, so an expiry cannot hide a leak);
- ``start_s``: from the first node starting to the first job (not a target).

Cases: memory mode at 50, 200 and 500 nodes (node actors on the in-memory
transport, one process), processes mode at 5 and 50 nodes (a ``dms run`` each).
The last line checks the targets: success 1.0 and no leak everywhere; memory
p50 at 500 <= 1.5 x p50 at 50 (placement asks a few peers, never the whole
network); processes p50 at 50 <= 2 x p50 at 5. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dms.sim.runner import Report, run_scenario
from dms.sim.scenario import Scenario

CASES = [("memory", 50), ("memory", 200), ("memory", 500), ("processes", 5), ("processes", 50)]
JOB = {
    "name": "tiny",
    "deadline_s": 30,
    "allocations": [
        {
            "name": "w",
            "executor": "compute",
            "resources": {"cpu": "100m", "ram": "64MiB"},
            "params": {"seconds": 0},
        }
    ],
}


def scenario(mode: str, nodes: int, jobs: int) -> Scenario:
    return Scenario.model_validate(
        {
            "name": f"sim-scale-{mode}-{nodes}",
            "mode": mode,
            "nodes": [
                {"name": "owner"},
                {"name": "p", "count": nodes - 1, "onboard": {"cpu": 1, "ram": 1, "disk": 1}},
            ],
            "timeline": [
                {"deploy": {"name": "one-by-one", "count": jobs, "spec": JOB}},
                {"deploy": {"name": "at-once", "count": jobs, "concurrent": True, "spec": JOB}},
            ],
            "expect": {"settle_s": 5.0},
        }
    )


def say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def figures(mode: str, nodes: int, jobs: int, report: Report) -> dict[str, Any]:
    batches = {b["name"]: b for b in report.batches}
    seq, conc = batches.get("one-by-one", {}), batches.get("at-once", {})
    done = sum(1 for j in report.jobs if j["state"] == "completed")
    first = next((e["t"] for e in report.timeline if e["action"] == "deploy"), None)
    return {
        "bench": "sim_scale",
        "mode": mode,
        "nodes": nodes,
        "jobs": 2 * jobs,
        "success_rate": round(done / (2 * jobs), 3),
        "p50_ms": seq.get("p50_ms"),
        "p95_ms": seq.get("p95_ms"),
        "placements_per_s": conc.get("placements_per_s"),
        "leaked_leases": report.leases.get("leaked"),
        "start_s": first,
        "failed": [c.name for c in report.failed],
    }


def targets(lines: list[dict[str, Any]]) -> dict[str, Any]:
    def p50(mode: str, nodes: int) -> float | None:
        return next((x["p50_ms"] for x in lines if (x["mode"], x["nodes"]) == (mode, nodes)), None)

    out: dict[str, Any] = {
        "bench": "sim_scale_targets",
        "success_all_1": all(x["success_rate"] == 1.0 for x in lines),
        "no_leaks": all(x["leaked_leases"] == 0 for x in lines),
    }
    for mode, small, large, bound in (("memory", 50, 500, 1.5), ("processes", 5, 50, 2.0)):
        a, b = p50(mode, small), p50(mode, large)
        if a and b:
            out[f"{mode}_p50_ratio_{large}_{small}"] = round(b / a, 2)
            out[f"{mode}_ratio_ok"] = b <= bound * a
    out["ok"] = all(v for k, v in out.items() if k.endswith(("_ok", "_1", "leaks")))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=40, help="jobs per phase")
    parser.add_argument(
        "--cases",
        default=",".join(f"{m}:{n}" for m, n in CASES),
        help="mode:nodes,... (default: every case)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    args = parser.parse_args()
    lines = []
    for case in args.cases.split(","):
        mode, nodes = case.split(":")
        root = Path(tempfile.mkdtemp(prefix=f"dms-sim-scale-{mode}-"))
        say(f"{mode}, {nodes} nodes")
        started = time.monotonic()
        try:
            report = run_scenario(
                scenario(mode, int(nodes), args.jobs), root=root, say=lambda t: say(f"  {t}")
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)
        line = figures(mode, int(nodes), args.jobs, report)
        line["wall_s"] = round(time.monotonic() - started, 1)
        lines.append(line)
        print(json.dumps(line) if args.json else line, flush=True)
    summary = targets(lines)
    print(json.dumps(summary) if args.json else summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
