"""An offer for one slot of an allocation places any of its twins (``name.0``, ``name.1``...).

A provider that fits one slot of several leases the one it drew; two providers that
drew the same left the other slot without an offer: it was placed a round later, or,
while asked peers still owed answers (a partition's far side), after 2 s of grace.
Real nodes on loopback; the providers' draw is made the same on purpose.
"""

from __future__ import annotations

import pytest

from dms.provider import bidder
from dms.sim.cluster import LocalCluster
from tests.test_orchestrator import (
    HEARTBEAT,
    TERMINAL,
    deploy,
    network,
    owner,
    spec,
    wait_state,
)


@pytest.fixture
def net(cluster: LocalCluster) -> LocalCluster:
    cluster.settings.update(heartbeat_s=HEARTBEAT, orphan_s=3.0)
    return cluster


@pytest.mark.parametrize("strategy", ["score", "first-offer"])
def test_two_providers_that_lease_the_same_slot_place_both_in_one_round(
    net: LocalCluster, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    requester, peers = network(net, 2, cpu=1)
    # Each provider fits one of the two slots and draws the first: both offer w.0.
    monkeypatch.setattr(bidder.random, "randrange", lambda n: 0)
    dep = deploy(requester, spec(count=2, cpu="1", strategy=strategy, params={"seconds": 1.0}))
    done = wait_state(requester, dep, TERMINAL, 60)
    assert done["state"] == "completed", done["events"]
    events = [e["what"] for e in done["events"]]
    assert not any("queued" in e or e.startswith("round 2") for e in events), events
    slots = done["slots"]
    assert {s["peer_id"] for s in slots} == {p.peer_id for p in peers}, slots
    assert all(s["attempts"] == 1 for s in slots), slots
    # The offer made for w.0 that placed w.1 is recorded as won, under w.1.
    bids = owner(requester, "/dms/node/deployment/manifest", {"id": dep})["bids"]
    won = sorted(b["slot"] for b in bids if b["outcome"] == "won")
    assert won == ["w.0", "w.1"], bids
