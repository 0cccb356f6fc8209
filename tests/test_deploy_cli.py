"""``dms deploy`` and ``dms deployment ...`` against two running daemons, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

from tests.clitools import dms, dms_json, init_homes, providers_and_owners, side_by_side

JOB = """\
name: cli-demo
strategy: score
deadline_s: 20
allocations:
  - name: w
    executor: compute
    count: 2
    resources: {cpu: 100m, ram: 64MiB}
    params: {seconds: 0.5}
"""


def test_deploy_follow_then_inspect_the_deployment(tmp_path: Path) -> None:
    requester, provider = tmp_path / "requester", tmp_path / "provider"
    init_homes(requester, provider)
    p, r = providers_and_owners([provider], [requester])
    try:
        job = tmp_path / "job.yaml"
        job.write_text(JOB)
        done = dms(requester, "deploy", str(job), "--follow")
        assert done.returncode == 0, done.stderr
        assert "chose" in done.stdout and "completed" in done.stdout
        deployments = dms_json(requester, "deployment", "list")
        assert deployments[0]["name"] == "cli-demo" and deployments[0]["state"] == "completed"
        dep = deployments[0]["id"]
        status, manifest, logs, missing = side_by_side([
            lambda: dms_json(requester, "deployment", "status", dep),
            lambda: dms_json(requester, "deployment", "manifest", dep),
            lambda: dms_json(requester, "deployment", "logs", dep),
            lambda: dms(requester, "deployment", "status", "nope"),
        ])  # fmt: skip
        assert [s["status"] for s in status["slots"]] == ["completed", "completed"]
        assert {s["peer_id"] for s in manifest["slots"]} == {p.info["peer_id"]}
        assert len(logs["logs"]) == 2
        assert missing.returncode == 1 and "no deployment 'nope'" in missing.stderr
        # A params typo fails at once, names the field and its line, and places nothing.
        typo = tmp_path / "typo.yaml"
        typo.write_text(JOB.replace("seconds", "secnds"))
        done = dms(requester, "deploy", str(typo), "--follow")
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "allocations.0.params.secnds (line 9): allocation 'w': compute params" in done.stderr
        assert len(dms_json(requester, "deployment", "list")) == 1
        submitted = json.loads(dms(requester, "deploy", str(job), "--json").stdout)
        assert len(submitted["id"]) == 16
    finally:
        assert r.stop() == 0
        assert p.stop() == 0
