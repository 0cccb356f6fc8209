"""What idle provider daemons cost: N ``dms run`` daemons started and onboarded as
``bench/placement.py --processes`` starts them (``dms.sim.processes.ProcessBackend``),
left alone, then measured in windows: the CPU every daemon used a second together
(``cpu_ms_per_s``, psutil's user + system time of each process) and the TCP data
segments they sent a second (``segs_per_s``: ``ss``'s ``data_segs_out`` summed over
the daemons' established connections; each is one write of Noise/Yamux frames, a
stand-in for frames a second; ``kb_per_s``: their ``bytes_sent``).

    python bench/idle.py --nodes 20 --windows 3 --window-s 30 --json

Each line on stdout (``--json``) is one window. The daemons run the ``dms`` this
process imports (PYTHONPATH), so a tree is measured by running this script with
PYTHONPATH pointing at it. ``--pyspy PATH`` records one daemon with py-spy for a
window after the measured ones (raw folded stacks of the thread holding the GIL: a
thread waiting in a lock or epoll is not counted as busy; fold them with
``/work/wt/tools/fold2.py``). Run it under ``flock /tmp/dms-heavy.lock``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from dms.sim.backend import NodeSpec
from dms.sim.faults import FaultPlan
from dms.sim.processes import ProcessBackend
from dms.sim.scenario import Amounts, NodeSettings

AMOUNTS = Amounts(cpu=2, ram=8, disk=10)  # as bench/placement.py's providers onboard


class Daemons(ProcessBackend):
    def extra_run_args(self) -> list[str]:
        return []

    def pids(self) -> list[int]:
        return [int(self.describe(n)["pid"]) for n in self.names if self.running(n)]


def say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


_PID = re.compile(r"pid=(\d+)")
_FIELD = re.compile(r"\b(data_segs_out|bytes_sent):(\d+)")


def segments(pids: set[int]) -> tuple[int, int]:
    """(data segments, bytes) sent so far on the established TCP connections of ``pids``."""
    out = subprocess.run(
        ["ss", "-tinpH", "state", "established"], capture_output=True, text=True, check=False
    ).stdout
    segs = sent = 0
    owner: set[int] = set()
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            owner = {int(p) for p in _PID.findall(line)}
            continue
        if owner & pids:
            fields = dict(_FIELD.findall(line))
            segs += int(fields.get("data_segs_out", 0))
            sent += int(fields.get("bytes_sent", 0))
    return segs, sent


def alive_everywhere(daemons: Daemons, count: int) -> bool:
    for name in daemons.names:
        try:
            alive = daemons.alive_peers(name)
        except Exception:
            return False
        if len(alive) < count - 1:
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--settle-s", type=float, default=30.0, help="after every table is full")
    parser.add_argument("--label", default="")
    parser.add_argument("--pyspy", default="", help="record one daemon to this file")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="dms-idle-"))
    specs = [NodeSpec(f"p-{i + 1}", "p") for i in range(args.nodes)]
    daemons = Daemons(root, specs, NodeSettings(), FaultPlan())
    try:
        say(f"starting {args.nodes} daemons")
        daemons.start(say)
        for name in daemons.names:
            daemons.onboard(name, AMOUNTS)
        deadline = time.monotonic() + 240
        while not alive_everywhere(daemons, args.nodes):
            if time.monotonic() > deadline:
                say("not every peers table is full; measuring anyway")
                break
            time.sleep(2)
        daemons.settle(timeout=240)
        say(f"settled; idle for {args.settle_s:g} s more")
        time.sleep(args.settle_s)
        pids = daemons.pids()
        procs = [psutil.Process(p) for p in pids]
        for i in range(args.windows):
            cpu0, (segs0, bytes0), t0 = cpu_s(procs), segments(set(pids)), time.monotonic()
            time.sleep(args.window_s)
            cpu1, (segs1, bytes1), t1 = cpu_s(procs), segments(set(pids)), time.monotonic()
            took = t1 - t0
            row: dict[str, Any] = {
                "label": args.label,
                "window": i,
                "nodes": args.nodes,
                "seconds": round(took, 1),
                "cpu_ms_per_s": round((cpu1 - cpu0) / took * 1000, 1),
                "segs_per_s": round((segs1 - segs0) / took, 1),
                "kb_per_s": round((bytes1 - bytes0) / took / 1024, 1),
            }
            print(json.dumps(row) if args.json else row, flush=True)
        if args.pyspy:
            say(f"py-spy on daemon {pids[0]} for {args.window_s:g} s")
            subprocess.run(
                ["py-spy", "record", "-p", str(pids[0]), "-r", "200", "-f", "raw", "--threads",
                 "--gil", "-d", str(int(args.window_s)), "-o", args.pyspy, "--nonblocking"],
                check=False, capture_output=True,
            )  # fmt: skip
    finally:
        daemons.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
