"""A data owner's mining session whose stored rows cannot be read (``mining_sessions``,
or its deployment's row): spoiled with sqlite3 while the node is stopped, as a hand
edit, an older or newer version or disk trouble leaves them. The node starts, each
such session is failed with the reason (its phase says so), warned of once, and
status, result and the CLI say why; the readable ones go on as before
(``specs/orchestration.md``, "Restart safety"; ``specs/mining.md``)."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from dms.actor import RemoteError
from dms.orchestrator.records import MiningRow
from dms.orchestrator.store import DeploymentStore
from dms.sim.cluster import LocalCluster
from dms.store.db import open_database
from tests.clitools import Daemon, dms_many, init_home_quick
from tests.conftest import wait_for
from tests.test_metrics import scrape, value
from tests.test_orchestrator import TERMINAL, network, owner, spec, status, wait_state

IRIS = str(Path("examples/iris-features.csv").resolve())

# How each placing session's stored rows are spoiled (SQL on its rows, as sqlite3 would
# run it), the session's id as :id.
SPOILED = {
    "deployment_not_json": "UPDATE deployments SET slots = '[{' WHERE id = :id",
    "progress_not_json": "UPDATE mining_sessions SET progress = '{\"phase\": ' WHERE id = :id",
    "phase_unknown": "UPDATE mining_sessions SET phase = 'paused' WHERE id = :id",
    "checkpoint_not_object": "UPDATE mining_sessions SET checkpoint = '[1, 2]' WHERE id = :id",
    "created_no_time": "UPDATE mining_sessions SET created_at = 'yesterday' WHERE id = :id",
    # What the last version left when it failed an unreadable deployment: the session's
    # own row still 'placing', its deployment failed.
    "deployment_ended": "UPDATE deployments SET state = 'failed', ended_at = 1 WHERE id = :id",
}


def mine(node: Any, **request: Any) -> str:
    settings = {"algorithm": "kmeans", "scheme": "plain", "k": 3}
    return owner(node, "/dms/node/mining/new", {"settings": settings, "data": IRIS, **request})[
        "id"
    ]


def session(node: Any, session_id: str) -> dict[str, Any]:
    return owner(node, "/dms/node/mining/status", {"id": session_id})


def test_a_mining_session_whose_stored_rows_cannot_be_read_fails_and_the_node_starts(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Sessions placing when the node stops (each asks more cores than any provider has,
    so it waits), one completed. Spoiled: the deployment's row, the session's progress
    (not JSON), its phase (unknown), its checkpoint (not an object), its created_at (no
    time), its deployment ended while it still reads placing (what the last version left),
    the completed one's labels (not JSON). Before, status raised on the progress (an
    internal error), and every spoiled session but the phase's kept reading 'placing'
    for ever. Now the node starts, the good placing session fails as a restarted one
    does, each spoiled one is failed with why (warned once, its id named), and the
    completed one still reads completed, its result refused saying why. The metrics,
    which read every session's progress (and failed whole on one that is not JSON),
    count them."""
    net.serve_api = True
    requester, _ = network(net, 2)
    done = mine(requester)
    wait_for_phase(requester, done, "completed")
    good = mine(requester, cpu=64, timeout_s=600)
    bad = {how: mine(requester, cpu=64, timeout_s=600) for how in SPOILED}
    for waiting in (good, *bad.values()):
        assert session(requester, waiting)["phase"] == "placing"
        assert status(requester, waiting)["state"] not in TERMINAL
    requester.stop()
    with closing(sqlite3.connect(requester.settings.home / "dms.db")) as db, db:
        for how, session_id in bad.items():
            assert db.execute(SPOILED[how], {"id": session_id}).rowcount == 1, how
        db.execute("UPDATE mining_sessions SET labels = '[0, 1' WHERE id = ?", (done,))
    with caplog.at_level(logging.WARNING, logger="dms"):
        requester = net.restart(requester)
        for session_id in (good, *bad.values()):
            wait_state(requester, session_id, TERMINAL, 60)
    restarted = session(requester, good)
    assert restarted["phase"] == "failed" and "restarted" in restarted["progress"]["reason"]
    assert restarted["unreadable"] is None and restarted["algorithm"] == "kmeans", restarted
    for how, session_id in bad.items():
        failed = session(requester, session_id)
        assert failed["phase"] == "failed", (how, failed)
        said = failed["progress"].get("reason")
        if how == "progress_not_json":  # left as it was: the read says why
            assert said is None and "progress is not JSON" in failed["unreadable"], failed
        else:
            assert "could not be read" in said or "not saved" in said, (how, failed)
        assert status(requester, session_id)["state"] == "failed", how
        warned = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and session_id in r.getMessage()
        ]
        assert len(warned) == 1, (how, warned)
    assert "'paused' is unknown" in session(requester, bad["phase_unknown"])["progress"]["reason"]
    checkpoint = session(requester, bad["checkpoint_not_object"])
    assert checkpoint["checkpoint"] is None and "checkpoint is list" in checkpoint["unreadable"]
    assert "'yesterday' is no time" in session(requester, bad["created_no_time"])["unreadable"]
    ended = session(requester, bad["deployment_ended"])["progress"]["reason"]
    assert "its deployment is failed" in ended, ended
    kept = session(requester, done)
    assert kept["phase"] == "completed" and kept["unreadable"] is None, kept
    with pytest.raises(RemoteError) as refused:
        owner(requester, "/dms/node/mining/result", {"id": done})
    assert refused.value.code == "unreadable", refused.value
    assert "its labels is not JSON" in refused.value.reason, refused.value
    listed = {r["id"]: r for r in owner(requester, "/dms/node/deployment/list")}
    assert listed[done]["state"] == "completed"
    samples = scrape(requester)
    assert value(samples, "dms_mining_sessions", phase="failed") == len(bad) + 1
    assert value(samples, "dms_mining_sessions", phase="completed") == 1


def wait_for_phase(node: Any, session_id: str, phase: str) -> None:
    wait_for(lambda: session(node, session_id)["phase"] == phase, 60, f"{session_id} {phase}")


def test_a_daemon_starts_over_unreadable_mining_sessions_and_dms_status_shows_why(
    tmp_path: Path,
) -> None:
    """``dms run`` over a store holding a session mid-job whose progress is not JSON and a
    completed one whose checkpoint is not JSON. Before, the completed one's status raised
    in the node (an internal error), and ``dms status`` left it out without a word; the
    one mid-job was failed as a restarted one, its unreadable progress written over. Now
    ``dms status`` (and ``--json``) lists both with why, the one mid-job failed as
    unreadable, and the daemon warned of it once."""
    home = tmp_path / "home"
    init_home_quick(home)
    now = time.time()
    with closing(open_database(f"sqlite:///{home / 'dms.db'}")) as db:
        store = DeploymentStore(db)
        for session_id, state, phase in (("s-mid", "bidding", "mining"),
                                         ("s-done", "completed", "completed")):  # fmt: skip
            store.save(
                {
                    "id": session_id, "name": "mine-kmeans", "state": state,
                    "spec": spec(params={"seconds": 600.0}), "slots": [], "events": [],
                    "created_at": now, "running_at": None, "ended_at": None,
                }
            )  # fmt: skip
            store.save_mining(MiningRow(session_id, "kmeans", phase, {"phase": phase}))
    with closing(sqlite3.connect(home / "dms.db")) as conn, conn:
        conn.execute("UPDATE mining_sessions SET progress = '{\"steps\": [' WHERE id = 's-mid'")
        conn.execute("UPDATE mining_sessions SET checkpoint = '{' WHERE id = 's-done'")
    daemon = Daemon(home)
    try:
        (code, shown, err), (code2, listed, err2) = dms_many(
            home, [["status", "--timeout", "30"], ["status", "--json", "--timeout", "30"]]
        )
    finally:
        assert daemon.stop() == 0, daemon.stderr()
    assert code == 0, (shown, err)
    assert "failed (unreadable)" in shown and "completed (unreadable)" in shown, shown
    assert code2 == 0, err2
    mining = {m["id"]: m for m in json.loads(listed)["mining"]}
    assert mining["s-mid"]["phase"] == "failed", mining
    assert "its progress is not JSON" in mining["s-mid"]["reason"], mining
    assert mining["s-done"]["phase"] == "completed", mining
    assert "its checkpoint is not JSON" in mining["s-done"]["unreadable"], mining
    warned = [line for line in daemon.stderr().splitlines() if "s-mid cannot resume" in line]
    assert len(warned) == 1, daemon.stderr()


def test_a_restart_keeps_a_sessions_saved_completion_and_its_progress(net: LocalCluster) -> None:
    """Two placing sessions when the node stops (each waits for cores no provider has).
    One's stored row then reads completed with its result, its deployment's end not
    saved (the node stopped while its workers were told to finish); the other's holds
    the steps it made. Both deployments are resumed, and fail: a session cannot resume.
    Before, the resumed actor, which knows nothing of the session, wrote its own
    progress over the stored one: the completed session read failed, its result refused
    ('the session is failed, not completed'), and the other's steps were lost. Now the
    completed one is left as it is, and the other fails keeping what it made."""
    net.serve_api = True
    requester, _ = network(net, 2)
    completed, stepped = (mine(requester, cpu=64, timeout_s=600) for _ in range(2))
    for waiting in (completed, stepped):
        assert session(requester, waiting)["phase"] == "placing"
    requester.stop()
    steps = [{"step": 1, "change": 0.5, "slowest": None, "s": 0.1}]
    with closing(sqlite3.connect(requester.settings.home / "dms.db")) as db, db:
        db.execute(
            "UPDATE mining_sessions SET phase = 'completed', progress = ?, result = ?,"
            " labels = '[0, 1]' WHERE id = ?",
            (json.dumps({"phase": "completed", "steps": steps}), '{"k": 3}', completed),
        )
        db.execute(
            "UPDATE mining_sessions SET phase = 'mining', progress = ? WHERE id = ?",
            (json.dumps({"phase": "mining", "steps": steps, "total_steps": 9}), stepped),
        )
    requester = net.restart(requester)
    for session_id in (completed, stepped):
        wait_state(requester, session_id, TERMINAL, 60)
    kept = session(requester, completed)
    assert kept["phase"] == "completed" and kept["progress"]["steps"] == steps, kept
    result = owner(requester, "/dms/node/mining/result", {"id": completed})
    assert result["result"] == {"k": 3} and result["labels"] == [0, 1], result
    failed = session(requester, stepped)
    assert failed["phase"] == "failed" and "restarted" in failed["progress"]["reason"], failed
    assert failed["progress"]["steps"] == steps and failed["progress"]["total_steps"] == 9
    assert failed["algorithm"] == "kmeans", failed
