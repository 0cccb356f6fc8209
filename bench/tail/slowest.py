"""The slowest placements of a run and what the processes they touched were doing.

    PLACETRACE=DIR PYTHONPATH=bench/tail:. python bench/placement.py --processes \\
        --nodes 20 --concurrency 1 --jobs 256 --placements DIR/placements.jsonl
    python bench/tail/slowest.py DIR [--concurrency 1] [--over 3]

For each placement slower than ``--over`` times the run's p50: its phases, then for
the requester (R) and each provider whose handler ran during it (by pid), the
collections over 1 ms (``gc<generation>:<ms>``) and the handlers, transactions,
publishes and heartbeat calls over 1 ms in its time. Then every full collection of the
run's window. Stamps from ``bench/tail/sitecustomize.py``."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

SHOWN = ("bid_request", "allocate", "revert", "tx", "publish", "round", "close")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--over", type=float, default=3.0, help="times the p50")
    args = parser.parse_args()
    placements = [
        p
        for p in map(json.loads, (args.folder / "placements.jsonl").open())
        if p["concurrency"] == args.concurrency and p["latency_ms"]
    ]
    stamps: dict[int, list[list[Any]]] = {}
    for path in args.folder.glob("*.jsonl"):
        if path.stem.isdigit():
            stamps[int(path.stem)] = sorted(map(json.loads, path.open()))
    requester = next(pid for pid, got in stamps.items() if any(s[2] == "round" for s in got))
    latencies = sorted(p["latency_ms"] for p in placements)
    p50 = statistics.median(latencies)
    print(f"{len(latencies)} placements, p50 {p50:.1f} ms, max {latencies[-1]:.1f} ms")
    for p in sorted(placements, key=lambda p: p["started"]):
        if p["latency_ms"] < args.over * p50:
            continue
        t0, t1 = p["started"], p["started"] + p["latency_ms"] / 1000

        def during(s: list[Any], t0: float = t0, t1: float = t1) -> bool:
            return s[0] < t1 and s[0] + s[1] / 1000 > t0

        touched = sorted(
            pid
            for pid, got in stamps.items()
            if pid != requester
            and any(s[2] in ("bid_request", "allocate") and during(s) for s in got)
        )
        phases = {k: round(v, 1) for k, v in p["phases_ms"].items() if v}
        line = f"{p['latency_ms']:7.1f} ms {phases}"
        for pid in [requester, *touched]:
            seen = [s for s in stamps[pid] if during(s)]
            gcs = [f"gc{s[4][0]}:{s[1]:.0f}" for s in seen if s[2] == "gc" and s[1] > 1]
            work = [
                f"{s[2]}:{s[1]:.1f}"
                for s in seen
                if (s[2] in SHOWN or s[2].startswith("hbsync")) and s[1] > 1
            ]
            line += f" | {'R' if pid == requester else pid} {' '.join(gcs + work)}"
        print(line)
    start = min(p["started"] for p in placements)
    end = max(p["started"] + p["latency_ms"] / 1000 for p in placements)
    full = [
        (pid, round(s[1]), s[4][2])
        for pid, got in stamps.items()
        for s in got
        if s[2] == "gc" and s[4][0] == 2 and start <= s[0] <= end
    ]
    print(f"full collections in the window ({end - start:.1f} s): (pid, wall ms, CPU ms) {full}")


if __name__ == "__main__":
    main()
