"""A long command (``dms run``, ``dms sim``) stops on SIGINT or SIGTERM whenever it comes.

Before (dms.cli.signals): the handler set a ``threading.Event`` the main thread waited
on, and a signal landing while ``Event.wait`` held its lock left the handler waiting on
its own thread for good. The last CI run's daemon, sent SIGTERM as it said it was
running, was still there 60 s later; a daemon sent 300 SIGTERMs hung in 2 runs of 6.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.clitools import Daemon, init_home_quick

WAITER = """
import json, signal, sys, time
from dms.cli.signals import stop_signals
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # put back after the block: the storm's tail
seen = 0
with stop_signals() as signals:
    print("ready", flush=True)
    end = time.monotonic() + 3
    while time.monotonic() < end:  # in and out of the wait, as the storm comes
        if signals.wait(0.0001) is not None:
            seen += 1
print(json.dumps({"seen": seen}), flush=True)
"""


def storm(proc: subprocess.Popen[str], most: int, pause_s: float = 0.0) -> int:
    """SIGTERM to ``proc``, ``pause_s`` apart, ``most`` at most, until it exits."""
    sent = 0
    while sent < most and proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        sent += 1
        if pause_s:
            time.sleep(pause_s)
    return sent


def test_a_storm_of_stop_signals_in_and_out_of_the_wait_never_blocks_it() -> None:
    """Signals tens of microseconds apart, so each lands at some moment of the waiter's
    loop. Before, with the Event: the waiter stuck in its own handler (and each signal
    after nested another stuck handler, to a RecursionError). Not faster: a Python
    handler, any handler, runs again inside itself for a signal come while it runs, and
    signals sent back to back from another core nest it past the recursion limit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WAITER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    stormer = threading.Thread(target=storm, args=(proc, 200_000, 20e-6), daemon=True)
    stormer.start()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["seen"] > 0, out


def test_dms_run_stops_cleanly_when_sent_sigterm_many_times_as_it_says_it_runs(
    tmp_path: Path,
) -> None:
    """300 SIGTERMs as soon as the daemon's line is read, three daemons in turn: each
    stops cleanly (exit 0, its API file removed). Before: 2 daemons of 6 never did."""
    for n in range(3):
        home = tmp_path / f"home{n}"
        init_home_quick(home)
        daemon = Daemon(home)
        storm(daemon.proc, 300)
        try:
            assert daemon.proc.wait(timeout=60) == 0, daemon.stderr()[-2000:]
        finally:
            if daemon.proc.poll() is None:
                daemon.kill()
        assert not (home / "api.json").exists()
