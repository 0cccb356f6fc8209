"""``dms run`` on a store another process holds locked (someone's ``sqlite3 dms.db`` with a
write transaction open): start-up waits ``store_start_wait_s`` at most, all of it together,
saying so every few seconds; past it the node does not start, says why in one line, and
writes nothing. Before, each of start-up's transactions waited SQLite's 30 s busy timeout
in silence (the migration, the peers, the stakes, the node actor's expiry and resumed
deployments), and the first one to give up ended it with "cannot open database ...:
database is locked". specs/node.md, "Start-up on a locked store".
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest

from dms.store import open_database
from tests.clitools import Daemon, env_for, init_home_quick
from tests.conftest import wait_for
from tests.test_store_failures import let_go, locked_by_another_process

PROGRESS = "waiting for the store"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    init_home_quick(home)
    open_database(f"sqlite:///{home / 'dms.db'}").close()  # the file exists, migrated
    return home


def events(home: Path) -> list[str]:
    with closing(sqlite3.connect(f"file:{home / 'dms.db'}?mode=ro", uri=True)) as conn:
        return [row[0] for row in conn.execute("SELECT kind FROM events ORDER BY id")]


def run(home: Path, start_wait_s: float, timeout: float) -> subprocess.CompletedProcess[str]:
    env = env_for(home)
    env["DMS_STORE_START_WAIT_S"] = str(start_wait_s)
    return subprocess.run(
        [sys.executable, "-m", "dms", "run", "--listen", "/ip4/127.0.0.1/tcp/0",
         "--api-port", "0"],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_dms_run_on_a_store_another_process_holds_stops_in_its_bound_saying_why(
    home: Path,
) -> None:
    """The file held for as long as the test runs; store_start_wait_s = 6. Before: no
    word for 30 s, then "cannot open database ...: database is locked"."""
    before = events(home)
    with locked_by_another_process(home / "dms.db", 600) as holder:
        done = run(home, 6, timeout=120)
        assert holder.poll() is None  # held all along
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert PROGRESS in done.stderr, done.stderr  # said while it waited
    last = done.stderr.strip().splitlines()[-1]
    assert "is locked by another process" in last and "did not start" in last, done.stderr
    assert "store_start_wait_s = 6" in last, done.stderr
    assert events(home) == before  # nothing written (no node.started)
    # Let go: the same command starts the node.
    daemon = Daemon(home)
    try:
        assert daemon.info["peer_id"]
    finally:
        assert daemon.stop() == 0
    assert "node.started" in events(home)


def test_dms_run_on_a_store_let_go_within_its_bound_starts_having_said_it_waited(
    home: Path,
) -> None:
    """The file held until the node says it waits for it (3 s into its wait), with
    store_start_wait_s 30 (its default): the node starts once it is let go. Before: it
    started, silent while it waited. The file was held a fixed 8 s: a daemon that took
    over 5 s to reach its store (its imports on a loaded machine, the last test of two
    full runs) waited less than 3 s and said nothing, and the test failed."""
    daemons: list[Daemon] = []
    with locked_by_another_process(home / "dms.db", 600) as holder:
        starting = threading.Thread(target=lambda: daemons.append(Daemon(home)), daemon=True)
        starting.start()
        log = home.with_name(f"{home.name}.stderr")  # Daemon's log (tests/clitools.py)

        def said() -> str:
            return log.read_text() if log.exists() else ""

        wait_for(lambda: PROGRESS in said(), 120, "the node to say it waits for the store")
        assert not daemons  # not started while the store is held
        let_go(holder)
        starting.join(120)
    (daemon,) = daemons
    try:
        assert daemon.info["peer_id"]
    finally:
        assert daemon.stop() == 0
    assert "locked" in daemon.stderr(), daemon.stderr()
    assert "node.started" in events(home)
