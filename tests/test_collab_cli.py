"""``dms mine collab`` as users run it: three owners' ``dms run`` daemons and a provider."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dms.mining.data import read_table
from dms.mining.plain import ClusteringParams, kmeans
from tests.clitools import Daemon, dms, dms_json
from tests.conftest import wait_for

IRIS = read_table(Path("examples/iris-features.csv").resolve()).features


def test_three_owners_propose_join_and_get_the_joint_clustering(tmp_path: Path) -> None:
    homes = [tmp_path / name for name in ("provider", "alice", "bob", "carol")]
    for home in homes:
        assert dms(home, "init").returncode == 0
        (home / "config.toml").write_text("heartbeat_s = 0.5\n")
    done = dms(homes[0], "onboard", "--cpu", "1", "--ram", "1", "--disk", "1", timeout=120)
    assert done.returncode == 0, done.stderr
    first = Daemon(homes[0])
    daemons = [first] + [Daemon(h, "--bootstrap", first.info["addrs"][0]) for h in homes[1:]]
    alice, bob, carol = homes[1:]
    files = []
    for home, rows in zip(homes[1:], np.array_split(IRIS, 3), strict=True):
        np.savetxt(home / "rows.csv", rows, delimiter=",", fmt="%.17g")
        files.append(home / "rows.csv")
    np.savetxt(tmp_path / "start.csv", IRIS[:3], delimiter=",", fmt="%.17g")
    try:

        def provider_known() -> bool:
            rows = dms_json(alice, "peers", "list")
            return any(r.get("onboarded", {}).get("cpu") == 1.0 for r in rows)

        wait_for(provider_known, 30, "alice to hear the provider")
        others = ",".join(d.info["peer_id"] for d in daemons[2:])
        proposal = tmp_path / "proposal.json"
        args = ["mine", "collab", "propose", "--data", str(files[0]), "--owners", others]
        args += ["--k", "3", "--rounds", "4", "--init", "supplied"]
        args += ["--centroids", str(tmp_path / "start.csv"), "--out", str(proposal), "--json"]
        done = dms(alice, *args)
        assert done.returncode == 0, done.stderr
        collab_id = json.loads(done.stdout)["collab_id"]
        for home, path in ((bob, files[1]), (carol, files[2])):
            done = dms(home, "mine", "collab", "join", str(proposal), "--data", str(path))
            assert done.returncode == 0, done.stderr
        again = dms(bob, "mine", "collab", "join", str(proposal), "--data", str(files[1]))
        assert again.returncode != 0 and "already joined" in again.stderr
        plain = kmeans(
            IRIS, ClusteringParams(3, min_error=-1.0, max_iterations=4), centroids=IRIS[:3].copy()
        )
        labels: list[str] = []
        for home in (alice, bob, carol):
            out = home / "out"
            done = dms(home, "mine", "collab", "result", collab_id, "--wait", "120",
                       "--out", str(out), timeout=180)  # fmt: skip
            assert done.returncode == 0, done.stderr
            result = json.loads((out / "result.json").read_text())
            np.testing.assert_allclose(result["centroids"], plain.centroids, atol=1e-9)
            labels += (out / "labels.csv").read_text().split()[1:]
        assert labels == [str(v) for v in plain.labels]
    finally:
        for daemon in daemons:
            daemon.stop()
