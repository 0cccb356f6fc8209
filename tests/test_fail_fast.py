"""Job mistakes fail fast: at validate, at deploy, and when every provider declines for good.

A decline that no retry can change (the provider has no such executor, or its
executor rejects the params) ends the deployment at once with each peer's
reason, instead of retrying until the deadline (a params typo once retried 176
times in 3 minutes and never ended).
"""

from __future__ import annotations

from typing import Any

import pytest

from dms.actor import RemoteError
from dms.jobs.base import ExecutorError
from dms.orchestrator.rounds import BidRounds
from dms.resources import Resources
from dms.sim.cluster import LocalCluster
from tests.test_orchestrator import (
    TERMINAL,
    deploy,
    live_leases,
    network,
    owner,
    spec,
    wait_state,
)


class PickyCompute:
    """A provider's compute executor that takes at most 0.1 s of work."""

    kind = "compute"

    def check(self, params: dict[str, Any], resources: Resources | None = None) -> None:
        if float(params.get("seconds", 0)) > 0.1:
            raise ExecutorError("compute params: seconds: this node runs at most 0.1 s")


@pytest.mark.parametrize(
    ("executors", "reason"),
    [
        ({}, "no executor 'compute' on this node"),
        ({"compute": PickyCompute()}, "compute params: seconds: this node runs at most 0.1 s"),
    ],
    ids=["no-executor", "params-rejected"],
)
def test_a_job_every_provider_declines_for_good_fails_at_once_with_their_reasons(
    net: LocalCluster, monkeypatch: pytest.MonkeyPatch, executors: dict, reason: str
) -> None:
    # The providers' bidders see these executors; the requester's own check does not.
    monkeypatch.setattr("dms.provider.bidder.EXECUTORS", executors)
    requester, peers = network(net, 2)
    dep = deploy(requester, spec(count=2, params={"seconds": 0.5}, deadline_s=120))
    done = wait_state(requester, dep, TERMINAL, 30)  # not 120: no retry can change it
    assert done["state"] == "failed"
    summary = done["events"][-1]["what"]
    assert summary.startswith("every peer that fits declined for good")
    for p in peers:
        assert f"{p.peer_id[-8:]}: declined: {reason}" in summary
    assert {s["status"] for s in done["slots"]} == {"failed"}
    assert all(reason in s["error"] for s in done["slots"])
    rounds = [e for e in done["events"] if e["what"].startswith("round ")]
    assert len(rounds) <= 2, rounds  # not one a second until the deadline
    assert live_leases(peers) == 0


def test_the_requester_refuses_a_job_whose_executor_or_params_are_wrong(
    net: LocalCluster,
) -> None:
    requester = net.add()
    typo = spec(params={"secnds": 1})
    with pytest.raises(RemoteError) as refused:
        deploy(requester, typo)
    assert refused.value.code == "bad_payload"
    assert refused.value.reason.startswith(
        "allocations.0.params.secnds: allocation 'w': compute params: secnds: Extra inputs"
    )
    unknown = spec()
    unknown["allocations"][0]["executor"] = "comptue"
    with pytest.raises(RemoteError) as refused:
        deploy(requester, unknown)
    reason = refused.value.reason
    assert reason.startswith("allocations.0.executor: allocation 'w': unknown executor 'comptue'")
    assert "compute" in reason.partition("(known: ")[2]  # and the ones that are
    assert owner(requester, "/dms/node/deployment/list") == []


def test_a_deployment_whose_start_raises_fails_saying_so_and_holds_nothing(
    net: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a deployment's start (here its first round's scheduling) stopped its
    actor silently: the deployment read 'bidding' for ever, was resumed at every
    restart, and its node still answered that it held its slots' leases."""

    def broken(self: BidRounds, delay_s: float) -> None:
        raise RuntimeError("a bug in the first round")

    monkeypatch.setattr(BidRounds, "schedule", broken)
    requester, _ = network(net, 1)
    dep = deploy(requester, spec())
    done = wait_state(requester, dep, TERMINAL, 30)
    assert done["state"] == "failed", done["events"]
    assert any(
        "could not start: RuntimeError: a bug in the first round" in e["what"]
        for e in done["events"]
    ), done["events"]
    assert requester.node is not None
    live = requester.node.pykka_ref.proxy().requester.get(timeout=5).orchestration().live
    assert dep not in live
