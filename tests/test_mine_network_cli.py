"""``dms mine`` without ``--local``, as a user runs it: three ``dms run`` daemons."""

from __future__ import annotations

import json
from pathlib import Path

from tests.clitools import dms, dms_json, init_homes, providers_and_owners

IRIS = Path("examples/iris-features.csv").resolve()


def test_mine_from_one_daemon_places_the_work_and_matches_local(tmp_path: Path) -> None:
    owner, one, two = tmp_path / "owner", tmp_path / "one", tmp_path / "two"
    init_homes(owner, one, two)
    daemons = providers_and_owners([one, two], [owner])
    first = daemons[0]
    try:
        placed, local = tmp_path / "placed", tmp_path / "local"
        args = ["mine", "skmeans", "--data", str(IRIS), "--k", "3", "--scheme", "ckks"]
        done = dms(owner, *args, "--out", str(placed), "--shards", "2", "--report", timeout=300)
        assert done.returncode == 0, done.stderr
        # Progress as it goes: placement, shipping, one line per round.
        for expected in ("running on", "MB shipped", "iteration 1", "centroid change"):
            assert expected in done.stdout
        # One line says what the worker learns (blind: ciphertexts only).
        assert "note: the worker learns: CKKS ciphertexts only" in done.stderr
        assert "worker learns" not in done.stdout  # once, not again as an event
        assert dms(owner, *args, "--out", str(local), "--local").returncode == 0
        assert (placed / "labels.csv").read_text() == (local / "labels.csv").read_text()
        result = json.loads((placed / "result.json").read_text())
        peers = {p["peer_id"] for p in result["placement"]}
        assert peers == {first.info["peer_id"], daemons[1].info["peer_id"]}
        for key in ("replacements", "owner_cpu_s", "worker_cpu_s", "wall_s"):
            assert key in result
        assert result["excluded"] == []  # no worker was caught
        # Per round: the centroid change and the step's time; the report draws them and
        # names the peers.
        assert len(result["changes"]) == result["iterations"] and result["steps"]
        page = (placed / "report.html").read_text()
        for peer in peers:
            assert peer in page
        assert 'id="fig-placement"' in page and 'id="fig-convergence"' in page
        # The rounds are in the deployment's log too.
        logs = dms_json(owner, "deployment", "logs", result["session"])
        assert any("centroid change" in e["what"] for e in logs["events"])
    finally:
        for daemon in daemons:
            daemon.stop()
