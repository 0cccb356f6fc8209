"""Only providers hear bid requests (issue 24; specs/security.md, "Only providers
hear bid requests").

Every node joined the deployment topic at start, so a flood of bid requests
published there cost every node its validation and delivery, those that take no
work included: in ``bench/adversary.py`` ``bid_request_flood`` the honest
requester (not a provider) spent seconds of its network thread on the hostile's
requests that the victim forwarded it. Now a node is on the topic only while it
is onboarded.
"""

from __future__ import annotations

from dms.node.node import BROADCAST_TOPIC
from dms.orchestrator.messages import BID, DEPLOYMENT_TOPIC, REQUEST, BidRequest
from dms.resources import Resources
from dms.sim.adversary import BarePeer
from dms.sim.cluster import LocalCluster
from tests.conftest import wait_for


def bid_request(peer: BarePeer, deployment: str) -> bytes:
    slot = {"slot": "w.0", "executor": "compute", "resources": {"cpu": "100m", "ram": "16MiB"}}
    request = BidRequest.model_validate(
        {"deployment_id": deployment, "lease_s": 60, "slots": [slot], "reply_to": peer.me()}
    )
    env = peer.envelope(None, REQUEST, request.model_dump(), topic=DEPLOYMENT_TOPIC)
    return peer.seal(env)


def test_a_node_is_on_the_deployment_topic_only_while_it_is_onboarded(
    cluster: LocalCluster, bare_peers: list[BarePeer]
) -> None:
    (node,) = cluster.start(1)
    assert node.ledger is not None
    peer = BarePeer(node.addrs()[0], actor=True, gossip=True)
    bare_peers.append(peer)
    # The node's subscriptions reached the peer (it is on the broadcast topic) ...
    wait_for(
        lambda: node.peer_id in peer.mesh_peers(BROADCAST_TOPIC),
        timeout=30,
        what="the node's subscriptions at the peer",
    )
    # ... and, taking no work, it is not on the deployment topic (before: it was).
    assert node.peer_id not in peer.mesh_peers(DEPLOYMENT_TOPIC)

    node.ledger.onboard(Resources(cpu=1, ram=1, disk=1))
    wait_for(
        lambda: node.peer_id in peer.mesh_peers(DEPLOYMENT_TOPIC),
        timeout=30,
        what="the onboarded node on the deployment topic",
    )
    # Onboarded after its start, it hears a request published there and bids.
    sent = [0]

    def bid_heard() -> bool:
        if peer.received[BID]:
            return True
        sent[0] += 1  # again until the topic's mesh holds the node
        peer.publish(DEPLOYMENT_TOPIC, bid_request(peer, f"late-{sent[0]}"))
        return False

    wait_for(bid_heard, timeout=30, what="a bid for a request heard on the topic")

    node.ledger.offboard(force=True)
    wait_for(
        lambda: node.peer_id not in peer.mesh_peers(DEPLOYMENT_TOPIC),
        timeout=30,
        what="the offboarded node off the deployment topic",
    )
