"""Rows of the node's own tables that cannot be read (spoiled with sqlite3 while the node
is stopped, as a hand edit or disk trouble leaves them): the remembered peers and the
node's settings. Each kept ``dms run`` from starting, with a raw traceback; now the
node starts, warns of each once, and writes it over when it writes that row again
(``specs/layout.md``, "Store")."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import make_url, text

from dms.network.discovery import PeerInfoView
from dms.network.peerbook import PeerBook
from dms.resources import ResourceLedger
from dms.store import LATEST_VERSION
from dms.store.db import open_database
from dms.store.errors import StoreError, client_command
from tests.clitools import Daemon, dms, dms_many, init_home_quick

# Peer ids of nodes that do not exist (dialed, the dial fails: nothing else happens).
NOT_JSON, NUMBER, NO_TIME = (
    "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo",
    "12D3KooWJ3mvhSeH71NcAiBK47Gw2aovFGzgja18FToY8TwyACjD",
    "12D3KooWSdHKCqbGsM1pCJpvoJBGsZJgPoH6MU34kGcRu8a9ANQN",
)
SPOILED = [
    f"INSERT INTO known_peers VALUES ('{NOT_JSON}', '[\"/ip4/127.0.0.1', '2026-01-01 00:00:00')",
    f"INSERT INTO known_peers VALUES ('{NUMBER}', '5', '2026-01-01 00:00:00')",
    f"INSERT INTO known_peers VALUES ('{NO_TIME}', '[\"/ip4/127.0.0.1/tcp/9\"]', 'yesterday')",
    "INSERT INTO node_settings VALUES ('registered_capability', '{\"version\": ')",
]


def test_a_daemon_starts_over_unreadable_remembered_peers_and_settings(tmp_path: Path) -> None:
    """Remembered peers whose addresses are not JSON, a number, or whose last-seen time
    is no time, and a capability setting that is not JSON: ``dms run`` raised each (the
    JSON error out of the peer book's read, or the node actor not starting). Now it
    starts: the unreadable peers are not dialed (the readable one is), each warned of
    once, the setting counts as not set (``dms benchmark`` writes it again), and a
    peer remembered again is written over."""
    home = tmp_path / "home"
    init_home_quick(home)
    open_database(f"sqlite:///{home / 'dms.db'}").close()  # its tables
    with closing(sqlite3.connect(home / "dms.db")) as conn, conn:
        for sql in SPOILED:
            conn.execute(sql)
    daemon = Daemon(home)
    try:
        [(code, shown, err), (code2, measured, err2)] = dms_many(
            home, [["peers", "list", "--json"], ["benchmark", "--json", "--timeout", "60"]]
        )
    finally:
        assert daemon.stop() == 0, daemon.stderr()
    assert code == 0 and isinstance(json.loads(shown), list), err
    assert code2 == 0 and json.loads(measured)["seconds"] > 0, err2
    log = daemon.stderr()
    assert "Traceback" not in log, log
    for peer, why in ((NOT_JSON, "are not JSON"), (NUMBER, "are int, not a list")):
        warned = [line for line in log.splitlines() if f"remembered peer {peer}" in line]
        assert len(warned) == 1 and why in warned[0], (peer, warned)
    assert log.count("the setting 'registered_capability' in the store is not JSON") == 1, log
    with closing(open_database(f"sqlite:///{home / 'dms.db'}")) as db:
        assert db.get_setting("registered_capability")["seconds"] > 0  # measured again
        book = PeerBook(db)
        assert book.dial_addrs() == [f"/ip4/127.0.0.1/tcp/9/p2p/{NO_TIME}"]
        book.remember([PeerInfoView(NOT_JSON, ["/ip4/127.0.0.1/tcp/7"])])
        assert f"/ip4/127.0.0.1/tcp/7/p2p/{NOT_JSON}" in book.dial_addrs()


def test_a_ledger_row_that_holds_no_number_is_named_not_a_traceback(tmp_path: Path) -> None:
    """An onboarding row or a live lease holding text where its amounts or expiry belong:
    ``dms resources`` (and the node's start, which reads the same pools) raised Python's
    conversion error with a traceback. Nothing can be counted from such a row, so the
    command fails, in one line naming the row and what to do."""
    home = tmp_path / "home"
    init_home_quick(home)
    url = f"sqlite:///{home / 'dms.db'}"
    open_database(url).close()  # its tables
    spoiled = {
        "the onboarding row's amounts: ('lots', 1024, 1024, 0)": (
            "INSERT INTO onboarding VALUES (1, 'lots', 1024, 1024, 0, 0.0, 0)"
        ),
        "the locked leases' expiry (expires_at): 'soon'": (
            "INSERT INTO leases VALUES ('ab', 'locked', 100, 10, 10, 0, 'h', 'r', 0, 'soon', "
            "NULL, NULL)"
        ),
    }
    for said, sql in spoiled.items():
        with closing(sqlite3.connect(home / "dms.db")) as conn, conn:
            conn.execute("DELETE FROM onboarding")
            conn.execute("DELETE FROM leases")
            conn.execute(sql)
        [(code, out, err)] = dms_many(home, [["resources", "--json"]])
        assert code == 1 and not out, (said, out, err)
        assert err.startswith("error: the store is damaged: " + said), (said, err)
        assert "correct or delete that row" in err and len(err.strip().splitlines()) == 1, err
        # the client of this database, on it (it said 'sqlite3 DMS_HOME/dms.db' whatever
        # the backend: client_command, as the schema rows' messages)
        assert f"of the database ({client_command(make_url(url))}), then" in err, err


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_a_damaged_row_of_a_database_in_memory_names_no_file_to_open(url: str) -> None:
    """A test's store in memory: its damage message named the client on an empty path,
    "(sqlite3 ''), then try again". There is no file: it says so."""
    db = open_database(url)
    try:
        with db.transaction() as conn:
            conn.execute(text("INSERT INTO onboarding VALUES (1, 'lots', 1024, 1024, 0, 0.0, 0)"))
        with pytest.raises(StoreError) as raised:
            ResourceLedger(db).pools()
    finally:
        db.close()
    said = str(raised.value)
    assert said.startswith("the store is damaged: the onboarding row's amounts"), said
    assert "''" not in said and "sqlite3" not in said, said
    assert "(SQLite in memory: no file to open, only this process reaches it)" in said, said


def test_a_schema_version_that_holds_no_number_is_named_not_a_traceback(tmp_path: Path) -> None:
    """``schema_version`` holding text where its number belongs: every open of the
    database raised TypeError (a number compared with text) with a traceback, out of
    ``dms resources`` and ``dms run``. With the Alembic revision there to say which
    schema it is, the number is written again and the command works; without it, the
    command fails in one line naming the row."""
    home = tmp_path / "home"
    init_home_quick(home)
    open_database(f"sqlite:///{home / 'dms.db'}").close()  # its tables
    with closing(sqlite3.connect(home / "dms.db")) as conn, conn:
        conn.execute("UPDATE schema_version SET version = 'two'")
    [(code, out, err)] = dms_many(home, [["resources", "--json"]])
    assert code == 0 and json.loads(out)["leases"] == 0, err
    with closing(sqlite3.connect(home / "dms.db")) as conn, conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (LATEST_VERSION,)
        conn.execute("UPDATE schema_version SET version = 'two'")
        conn.execute("DROP TABLE alembic_version")
    said = "error: the store is damaged: schema_version holds 'two' where the schema's number"
    for command in (["resources", "--json"], ["run"]):
        done = dms(home, *command)
        assert done.returncode == 1 and not done.stdout, (command, done.stdout, done.stderr)
        assert done.stderr.startswith(said), (command, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, (command, done.stderr)


def test_dms_stop_names_a_damaged_api_file_and_how_to_stop_the_running_node(
    tmp_path: Path,
) -> None:
    """A node runs, but its ``api.json`` is damaged (a hand edit, a full disk): ``dms
    stop`` said "no node is running", of a running node. Now it says the file is damaged
    and how to stop that node (its pid, from the home's run lock); with no node running
    it still says that none is."""
    home = tmp_path / "home"
    init_home_quick(home)
    daemon = Daemon(home)
    try:
        (home / "api.json").write_text('{"host": "127.0.0.1", "po')
        refused = dms(home, "stop")
        pid = daemon.proc.pid
        assert refused.returncode == 1 and not refused.stdout, refused
        said = refused.stderr.strip()
        assert f"{home / 'api.json'} is damaged" in said and f"'kill {pid}'" in said, said
        assert len(said.splitlines()) == 1, said
    finally:
        assert daemon.stop() == 0, daemon.stderr()
    (home / "api.json").write_text("{")
    stopped = dms(home, "stop")
    assert stopped.returncode == 1 and "no node is running" in stopped.stderr, stopped


def test_a_start_that_fails_on_a_damaged_row_says_one_line_in_the_log_too(
    tmp_path: Path,
) -> None:
    """The node actor's start reads the pools: on a damaged onboarding row its
    ``on_start`` raised, and pykka logged "Unhandled exception in NodeActor" with the
    traceback before ``dms run`` said the error (prefixed "the node actor did not
    start"; ``--detach``: "the node did not start: the node actor did not start"). Now
    the actor keeps the store's error for the start's handshake, which
    raises it, and the node stops: one line, in the terminal and in the log of a
    ``--detach``; the home is free again (the second start says the same)."""
    home = tmp_path / "home"
    init_home_quick(home)
    open_database(f"sqlite:///{home / 'dms.db'}").close()  # its tables
    with closing(sqlite3.connect(home / "dms.db")) as conn, conn:
        conn.execute("INSERT INTO onboarding VALUES (1, 'lots', 1024, 1024, 0, 0.0, 0)")
    said = "error: the store is damaged: the onboarding row's amounts: ('lots', 1024, 1024, 0)"
    where = ["--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0"]
    for command in (["run", *where], ["run", "--detach", *where]):
        done = dms(home, *command)
        assert done.returncode == 1 and not done.stdout, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr and "Unhandled" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, (command, done.stderr)
        assert said.removeprefix("error: ") in done.stderr, done.stderr
        assert "node actor" not in done.stderr, done.stderr
    log = (home / "logs" / "dms.log").read_text()
    assert "Traceback" not in log and "Unhandled" not in log, log
    [logged] = [line for line in log.splitlines() if not line.startswith("--- dms run")]
    assert logged.startswith(said), log
