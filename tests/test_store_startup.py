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
from contextlib import closing
from pathlib import Path

import pytest

from dms.store import open_database
from tests.clitools import Daemon, env_for, init_home_quick
from tests.test_store_failures import locked_by_another_process

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
    """The file held 8 s, store_start_wait_s 30 (its default): the node starts once it is let go,
    and said meanwhile what it waits for. Before: it started, silent for those 8 s."""
    with locked_by_another_process(home / "dms.db", 8):
        daemon = Daemon(home)
    try:
        assert daemon.info["peer_id"]
    finally:
        assert daemon.stop() == 0
    log = daemon.stderr()
    assert PROGRESS in log and "locked" in log, log
    assert "node.started" in events(home)
