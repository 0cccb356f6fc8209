"""``dms mine collab`` as users run it: three owners' ``dms run`` daemons and a provider."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from dms.cli.collab import _no_result
from dms.mining.data import read_table
from dms.mining.plain import ClusteringParams, kmeans
from tests.clitools import (
    Daemon,
    dms,
    dms_json,
    env_for,
    init_homes,
    providers_and_owners,
    side_by_side,
)
from tests.conftest import wait_for

IRIS = read_table(Path("examples/iris-features.csv").resolve()).features


class Network:
    """A provider (``cpu`` cores) and three owners' daemons, each owner with a third of
    Iris in its home; alice proposes."""

    def __init__(self, tmp_path: Path, cpu: str = "1") -> None:
        self.tmp = tmp_path
        homes = [tmp_path / name for name in ("provider", "alice", "bob", "carol")]
        init_homes(*homes)
        self.daemons = providers_and_owners(homes[:1], homes[1:], cpu=cpu)
        self.bootstrap = self.daemons[0].info["addrs"][0]
        self.alice, self.bob, self.carol = homes[1:]
        self.files = []
        for home, rows in zip(homes[1:], np.array_split(IRIS, 3), strict=True):
            np.savetxt(home / "rows.csv", rows, delimiter=",", fmt="%.17g")
            self.files.append(home / "rows.csv")
        np.savetxt(tmp_path / "start.csv", IRIS[:3], delimiter=",", fmt="%.17g")

    def propose(self, rounds: int) -> tuple[str, Path]:
        others = ",".join(d.info["peer_id"] for d in self.daemons[2:])
        proposal = self.tmp / "proposal.json"
        args = ["mine", "collab", "propose", "--data", str(self.files[0]), "--owners", others]
        args += ["--k", "3", "--rounds", str(rounds), "--init", "supplied"]
        args += ["--centroids", str(self.tmp / "start.csv"), "--out", str(proposal), "--json"]
        done = dms(self.alice, *args)
        assert done.returncode == 0, done.stderr
        collab_id = json.loads(done.stdout)["collab_id"]
        joins = side_by_side(
            lambda h=h, f=f: dms(h, "mine", "collab", "join", str(proposal), "--data", str(f))
            for h, f in ((self.bob, self.files[1]), (self.carol, self.files[2]))
        )
        for done in joins:
            assert done.returncode == 0, done.stderr
        return collab_id, proposal

    def results(self, collab_id: str, wait_s: int) -> list[dict]:
        """Each owner's ``dms mine collab result --wait``, side by side: its result.json,
        with its labels."""
        homes = (self.alice, self.bob, self.carol)
        args = ["mine", "collab", "result", collab_id, "--wait", str(wait_s), "--out"]
        dones = side_by_side(
            lambda h=h: dms(h, *args, str(h / "out"), timeout=wait_s + 60) for h in homes
        )
        out = []
        for home, done in zip(homes, dones, strict=True):
            assert done.returncode == 0, done.stderr
            result = json.loads((home / "out" / "result.json").read_text())
            result["labels"] = (home / "out" / "labels.csv").read_text().split()[1:]
            out.append(result)
        return out

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()


def test_result_wait_that_ends_without_a_result_fails_with_the_reason(tmp_path: Path) -> None:
    """``result --wait`` that waited and got no result exits non-zero and says where the
    collaboration stands (here: nobody to place the aggregator, the other owner never
    joins); with --json the status is still printed, with the reason as ``error``."""
    home = tmp_path / "alice"
    init_homes(home)
    np.savetxt(home / "rows.csv", IRIS[:20], delimiter=",", fmt="%.17g")
    daemon = Daemon(home)
    try:
        args = ["mine", "collab", "propose", "--data", str(home / "rows.csv"), "--k", "2"]
        args += ["--owners", "12D3KooWAbsentOwnerAbsentOwnerAbsentOwnerAbsent"]
        done = dms(home, *args, "--out", str(tmp_path / "p.json"), "--json")
        assert done.returncode == 0, done.stderr
        collab_id = json.loads(done.stdout)["collab_id"]
        wait = ["mine", "collab", "result", collab_id, "--wait", "1", "--out", str(tmp_path / "o")]
        done = dms(home, *wait)
        assert done.returncode != 0
        assert "no result after waiting 1 s: the collaboration is still at" in done.stderr
        assert collab_id in done.stdout  # the status table first
        done = dms(home, *wait, "--json")
        assert done.returncode != 0 and "no result after waiting 1 s" in done.stderr
        shown = json.loads(done.stdout)
        assert shown["error"].startswith("no result after waiting 1 s") and "result" not in shown
        assert not (tmp_path / "o").exists()
        status = dms_json(home, "mine", "collab", "result", collab_id)  # no wait: a status
        assert status["phase"] != "completed" and status["error"] is None
    finally:
        daemon.stop()


def test_propose_and_join_read_a_data_file_relative_to_where_they_are_typed(
    tmp_path: Path,
) -> None:
    """The README's 'dms mine collab propose --data mine.csv' (and 'join ... --data
    theirs.csv'): the node read the file in its own working folder, not the user's
    ('bad_payload: mine.csv: no such file' for a file right there)."""
    alice, bob, here = tmp_path / "alice", tmp_path / "bob", tmp_path / "here"
    init_homes(alice, bob)
    here.mkdir()
    np.savetxt(here / "mine.csv", IRIS[:20], delimiter=",", fmt="%.17g")
    np.savetxt(here / "theirs.csv", IRIS[20:40], delimiter=",", fmt="%.17g")
    first = Daemon(alice)  # their working folder is the test's, not 'here'
    daemons = [first, *Daemon.joining(first, bob)]
    try:

        def typed(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "dms", *args]
            env = env_for(home)
            return subprocess.run(argv, cwd=here, env=env, capture_output=True, text=True)

        owners = daemons[1].info["peer_id"]
        done = typed(alice, "mine", "collab", "propose", "--data", "mine.csv", "--k", "2",
                     "--owners", owners, "--out", "p.json", "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        done = typed(bob, "mine", "collab", "join", "p.json", "--data", "theirs.csv", "--json")
        assert done.returncode == 0, done.stderr
    finally:
        for daemon in daemons:
            daemon.stop()


def test_result_wait_says_the_aggregator_was_lost_when_the_round_waits_for_a_new_one() -> None:
    """As a provider whose aggregator stopped answering left it (round 39 of 40, then
    no provider to place a new one): the reason names the loss, not only the round."""
    lost = "the aggregator failed: timeout: no reply from did:key:z6Mk to /dms/allocation/session"
    session = {"phase": "rounds", "round": 39, "rounds": 40, "aggregator_losses": [
        {"peer_id": "12D3KooWProvider", "reason": lost}]}  # fmt: skip
    why = _no_result({"phase": "rounds", "session": session}, 180)
    assert why == (
        "no result after waiting 180 s: the collaboration is still at phase rounds, round 39 "
        f"of 40; its aggregator was lost 1 time(s), last: {lost}"
    )


def test_three_owners_propose_join_and_get_the_joint_clustering(tmp_path: Path) -> None:
    net = Network(tmp_path)
    bob, files = net.bob, net.files
    try:
        collab_id, proposal = net.propose(rounds=4)
        again = dms(bob, "mine", "collab", "join", str(proposal), "--data", str(files[1]))
        assert again.returncode != 0 and "already joined" in again.stderr
        plain = kmeans(
            IRIS, ClusteringParams(3, min_error=-1.0, max_iterations=4), centroids=IRIS[:3].copy()
        )
        labels: list[str] = []
        for result in net.results(collab_id, 120):
            np.testing.assert_allclose(result["centroids"], plain.centroids, atol=1e-9)
            labels += result["labels"]
        assert labels == [str(v) for v in plain.labels]
    finally:
        net.stop()


def test_the_proposers_daemon_killed_mid_job_resumes_the_collaboration_after_a_restart(
    tmp_path: Path,
) -> None:
    """kill -9 of the proposer's daemon after round 3, then dms run again: its seat comes
    back from its home (sealed), a new session places a new aggregator, replays what it
    had relayed and resumes at the next round; every owner gets plaintext k-means on the
    union, nobody dropped (the owners only wait while the proposer is down)."""
    net = Network(tmp_path, cpu="2")  # room for the new aggregator beside the old one
    rounds = 40
    try:
        collab_id, _ = net.propose(rounds=rounds)

        def session() -> dict:
            return dms_json(net.alice, "mine", "collab", "result", collab_id)["session"]

        wait_for(lambda: (session().get("rounds_done") or 0) >= 3, 120, "round 3")
        net.daemons[1].kill()
        [kept] = (net.alice / "collab").glob("*.seat")  # sealed, this user's only
        assert set(json.loads(kept.read_text())) == {"collab_id", "sealed"}
        assert kept.stat().st_mode & 0o077 == 0
        net.daemons[1] = Daemon(net.alice, "--bootstrap", net.bootstrap)
        plain = kmeans(
            IRIS, ClusteringParams(3, min_error=-1.0, max_iterations=rounds), centroids=IRIS[:3]
        )
        labels: list[str] = []
        for result in net.results(collab_id, 180):
            assert result["dropped"] == []
            np.testing.assert_allclose(result["centroids"], plain.centroids, atol=1e-9)
            labels += result["labels"]
        assert labels == [str(v) for v in plain.labels]
        final = session()
        assert final["phase"] == "completed" and final["restarts"] == 1, final
    finally:
        net.stop()
