"""``GET /metrics``: scraped from real nodes (libp2p on loopback) after a placement."""

from __future__ import annotations

import http.client
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dms.actor import RemoteError
from dms.node.daemon import Node
from dms.node.metrics import MAX_BEHAVIOURS, NodeMetrics
from dms.sim.cluster import LocalCluster
from tests.conftest import wait_for
from tests.test_orchestrator import TERMINAL, deploy, network, owner, spec, wait_state
from tests.test_store_failures import let_go, locked_by_another_process

IRIS = Path("examples/iris-features.csv").resolve()


def get(node: Node, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    assert node.api is not None
    conn = http.client.HTTPConnection("127.0.0.1", node.api.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def scrape(node: Node) -> dict[str, list[Any]]:
    """Every sample, by sample name (``_total``, ``_bucket`` ... included)."""
    assert node.api is not None
    status, content_type, text = get(node, "/metrics", {"X-Dms-Token": node.api.token})
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if labels.items() <= s.labels.items()]
    return sum(found)


@pytest.fixture
def net(cluster: LocalCluster) -> LocalCluster:
    cluster.serve_api = True
    cluster.settings.update(heartbeat_s=1.0, orphan_s=3.0)
    return cluster


def test_metrics_after_a_placement_and_a_mining_session(net: LocalCluster) -> None:
    requester, peers = network(net, 2)
    dep = deploy(requester, spec(count=2))
    assert wait_state(requester, dep, TERMINAL, 30)["state"] == "completed"
    session = owner(
        requester,
        "/dms/node/mining/new",
        {"settings": {"algorithm": "skmeans", "scheme": "ckks", "k": 3}, "data": str(IRIS)},
    )["id"]

    def mined() -> bool:
        phase = owner(requester, "/dms/node/mining/status", {"id": session})["phase"]
        assert phase != "failed"
        return phase == "completed"

    wait_for(mined, 120, "the mining session to complete")
    with pytest.raises(RemoteError):
        owner(requester, "/dms/node/no/such/behaviour")

    mine = scrape(requester)
    # invokes by behaviour and outcome; refusals by code
    assert value(mine, "dms_invokes_total", behaviour="/dms/node/deployment/new", outcome="ok") == 1
    assert value(mine, "dms_invokes_total", behaviour="(unknown)", outcome="unknown_behaviour")
    assert value(mine, "dms_refusals_total", code="unknown_behaviour", layer="actor") >= 1
    # placement latency: the deployment and the mining session's deployment
    assert value(mine, "dms_placement_seconds_count") == 2
    assert value(mine, "dms_placement_seconds_bucket", le="+Inf") == 2
    assert 0 < value(mine, "dms_placement_seconds_sum") < 60
    assert value(mine, "dms_deployments", state="completed") >= 1
    # mining rounds and time per round
    rounds = value(mine, "dms_mining_rounds_total")
    assert rounds >= 2  # blind k-means: two steps an iteration
    assert value(mine, "dms_mining_round_seconds_count") == rounds
    assert value(mine, "dms_mining_sessions", phase="completed") == 1
    # peers by status, bytes in and out
    assert value(mine, "dms_peers", status="alive") == 2
    assert value(mine, "dms_network_bytes_total", direction="out") > 0
    assert value(mine, "dms_network_bytes_total", direction="in") > 0
    assert value(mine, "dms_chunk_served_bytes_total") > 1e6  # the shard's ciphertexts
    assert value(mine, "dms_node_info", peer_id=requester.peer_id) == 1
    # the losing offers' leases went back, each revert acknowledged by its provider
    acknowledged = lambda: value(scrape(requester), "dms_reverts_total", outcome="acknowledged")  # noqa: E731
    wait_for(lambda: acknowledged() >= 1, 30, "a revert acknowledged")
    mine = scrape(requester)
    assert value(mine, "dms_reverts_total", outcome="abandoned") == 0
    assert value(mine, "dms_reverts_pending") >= 0

    worked = [scrape(p) for p in peers]
    # each commit travels with its allocate (one exchange)
    commits = sum(
        value(s, "dms_invokes_total", behaviour="/dms/deployment/allocate") for s in worked
    )
    assert commits >= 3  # two compute allocations and one mining shard
    # leases by state: every allocation has ended and given its lease back
    wait_for(lambda: all(len(p.ledger.live()) == 0 for p in peers if p.ledger), 30, "releases")
    worked = [scrape(p) for p in peers]
    assert sum(value(s, "dms_leases", state="released") for s in worked) >= 3
    assert sum(value(s, "dms_leases", state="allocated") for s in worked) == 0
    for samples in worked:
        assert value(samples, "dms_resources", pool="onboarded", resource="cpu") == 2
        assert value(samples, "dms_network_bytes_total", direction="in") > 0


def test_metrics_need_the_token_and_accept_it_as_a_bearer(net: LocalCluster) -> None:
    node = net.add()
    assert node.api is not None
    status, _, _ = get(node, "/metrics")
    assert status == 401
    status, _, _ = get(node, "/metrics", {"X-Dms-Token": "wrong"})
    assert status == 401
    status, _, text = get(node, "/metrics", {"Authorization": f"Bearer {node.api.token}"})
    assert status == 200 and "dms_uptime_seconds" in text
    assert get(node, "/health")[0] == 200  # the one endpoint without a token
    # the refusals above are counted, each node in its own registry
    other = net.add()
    assert value(scrape(node), "dms_refusals_total", code="unauthorized") == 2
    assert value(scrape(other), "dms_refusals_total", code="unauthorized") == 0


def test_behaviour_labels_are_bounded() -> None:
    metrics = NodeMetrics.__new__(NodeMetrics)
    NodeMetrics.__init__(metrics, node=None)  # type: ignore[arg-type]
    for i in range(MAX_BEHAVIOURS + 50):
        metrics.answered(f"/made/up/{i}", "ok")
    metrics.answered("/x", "unknown_behaviour")
    counts = metrics.invokes()
    assert len({b for b, _ in counts}) == MAX_BEHAVIOURS + 2  # + "other" + "(unknown)"
    assert counts[("other", "ok")] == 50 and counts[("(unknown)", "unknown_behaviour")] == 1


def test_a_scrape_while_another_process_locks_the_store_answers_without_its_figures(
    net: LocalCluster,
) -> None:
    """A scrape read the store (the ledger's pools and leases, deployments, mining sessions)
    waiting SQLite's 30 s busy timeout on a file another process holds locked: no answer
    within 10 s, then a failed scrape. It waits the node's ``store_wait_s`` at most now and
    answers without the store's figures, saying so (``dms_store_read`` 0), the busy
    refusal counted; once let go, they are back."""
    [node] = net.start(1)
    with locked_by_another_process(node.settings.home / "dms.db", 600) as holder:
        samples = scrape(node)
        assert value(samples, "dms_store_read") == 0
        assert "dms_leases" not in samples and "dms_deployments" not in samples
        assert value(samples, "dms_store_busy_total") >= 1
        assert value(samples, "dms_uptime_seconds") > 0  # the rest is there
        assert holder.poll() is None
        let_go(holder)
    wait_for(lambda: value(scrape(node), "dms_store_read") == 1, 30, "the store's figures")
    assert "dms_leases" in scrape(node)
