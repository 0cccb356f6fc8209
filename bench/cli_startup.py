"""What a ``dms`` command costs to start, against the commit before lazy imports.

    flock /tmp/dms-heavy.lock python bench/cli_startup.py [--json] [--runs N] [--baseline REV]
        [--only COMMAND ...]

Each command runs as the tests and users run it: ``python -m dms ...`` in a subprocess,
against a running node of a fresh home (the commands that only talk to the local API),
or as the node itself (``run``: started, until it says it is up, then stopped). The
baseline is the same command from a git worktree of ``REV`` (default: the commit before
this bench), in the same run, alternating with this tree so both see the same load.

``--only run`` measures the node alone (``--only 'peers list'`` one command; repeatable).
One JSON line per command (``--json``), medians over ``--runs``:

- ``import_ms``: the process's imports (``python -X importtime``, the top-level modules'
  cumulative times summed), ``baseline_ms`` the same for ``REV``;
- ``cpu_ms``: the whole process's CPU time (user + system; for ``run``, start-up to
  stop), ``baseline_cpu_ms`` the same for ``REV``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The commit before the light command line (dms/files.py, imports inside commands).
BASELINE = "8af4841"
PASSPHRASE = "bench cli startup"
COMMANDS = [
    ["--help"],
    ["version"],
    ["actor", "cmd", "/public/hello"],
    ["peers", "list"],
    ["status"],
    ["deployment", "list"],
    ["cap", "list"],
]
RUN = ["run", "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0", "--json"]
IMPORT_LINE = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (\S)")


def import_ms(stderr: str) -> float:
    """The top-level modules' cumulative import times in ``-X importtime`` output."""
    return sum(int(m[1]) for m in IMPORT_LINE.finditer(stderr)) / 1000


def env_for(tree: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
    env.update(PYTHONPATH=str(tree), DMS_HOME=str(home), DMS_PASSPHRASE=PASSPHRASE)
    return env


def children_cpu_s() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def command(tree: Path, home: Path, args: list[str]) -> tuple[float, float]:
    """(import ms, CPU ms) of ``dms ARGS``."""
    before = children_cpu_s()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dms", *args],
        env=env_for(tree, home),
        cwd=tree,  # 'python -m' puts the working directory first on sys.path
        capture_output=True,
        text=True,
        timeout=120,
    )
    cpu = children_cpu_s() - before
    if done.returncode != 0:
        raise SystemExit(f"dms {' '.join(args)} ({tree}) failed: {done.stderr[-2000:]}")
    return import_ms(done.stderr), cpu * 1000


def node(tree: Path, home: Path) -> tuple[float, float]:
    """(import ms, CPU ms) of ``dms run`` from its start until it is up, then stopped."""
    before = children_cpu_s()
    # Its stderr (the import times, then its log) to a file: a pipe nobody reads while
    # it starts would fill and stop it.
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "dms", *RUN],
            env=env_for(tree, home),
            cwd=tree,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        assert proc.stdout is not None
        up = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        err.seek(0)
        stderr = err.read()
    cpu = children_cpu_s() - before
    if not up or proc.returncode != 0:
        raise SystemExit(f"dms run ({tree}) failed: {stderr[-2000:]}")
    return import_ms(stderr), cpu * 1000


def init(home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dms", "init"],
        env=env_for(ROOT, home),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise SystemExit(f"dms init failed: {done.stderr}")


def measure(
    base: Path, tmp: Path, runs: int, only: list[str] | None = None
) -> dict[str, dict[str, list[float]]]:
    """Per command (those named in ``only``, or all): import and CPU ms of this tree and
    of ``base``, ``runs`` each."""
    commands = [args for args in COMMANDS if only is None or " ".join(args) in only]
    home, spare = tmp / "home", tmp / "spare"
    init(home)
    init(spare)  # the homes of 'run' (another node holds 'home')
    found: dict[str, dict[str, list[float]]] = {}

    def add(name: str, which: str, figures: tuple[float, float]) -> None:
        row = found.setdefault(name, {})
        row.setdefault(f"{which}import", []).append(figures[0])
        row.setdefault(f"{which}cpu", []).append(figures[1])

    daemon = subprocess.Popen(
        [sys.executable, "-m", "dms", *RUN],
        env=env_for(ROOT, home),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert daemon.stdout is not None
        if not daemon.stdout.readline():
            raise SystemExit("the node for the commands did not start")
        for n in range(runs):
            # Alternate which tree goes first, so neither always runs on a warmer cache.
            trees = [(ROOT, ""), (base, "base_")][:: 1 if n % 2 == 0 else -1]
            for args in commands:
                for tree, which in trees:
                    add(" ".join(args), which, command(tree, home, args))
            if only is None or "run" in only:
                for tree, which in trees:
                    add("run", which, node(tree, spare))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON line per command")
    parser.add_argument("--runs", type=int, default=5, help="runs of each command per tree")
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare with")
    names = ["run", *(" ".join(args) for args in COMMANDS)]
    parser.add_argument("--only", action="append", choices=names, help="this command alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dms-cli-startup-") as name:
        tmp = Path(name)
        base = tmp / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline],
            check=True,
            capture_output=True,
        )
        try:
            found = measure(base, tmp, args.runs, args.only)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                check=False,
                capture_output=True,
            )
    for name, row in found.items():
        figures = {
            "bench": "cli_startup",
            "command": name,
            "import_ms": round(statistics.median(row["import"])),
            "baseline_ms": round(statistics.median(row["base_import"])),
            "cpu_ms": round(statistics.median(row["cpu"])),
            "baseline_cpu_ms": round(statistics.median(row["base_cpu"])),
            "runs": args.runs,
            "baseline": args.baseline,
        }
        if args.json:
            print(json.dumps(figures))
        else:
            print(
                f"dms {name:<22} imports {figures['import_ms']:5d} ms "
                f"(baseline {figures['baseline_ms']:5d}), CPU {figures['cpu_ms']:5d} ms "
                f"(baseline {figures['baseline_cpu_ms']:5d})"
            )


if __name__ == "__main__":
    main()
