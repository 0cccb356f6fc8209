"""Real nodes on libp2p over loopback: invoke, broadcast, restart, unreachable peers."""

from __future__ import annotations

from typing import Any

import pytest

from dms.actor import ActorRef, RemoteError
from dms.node.client import root_handle
from dms.node.daemon import Node
from dms.node.node import BROADCAST_TOPIC
from dms.sim.adversary import ManyKeys
from dms.sim.cluster import LocalCluster
from tests.conftest import raised_by, wait_for


def root(node: Node) -> ActorRef:
    assert node.node is not None
    return node.node


def connected(a: Node, b: Node) -> bool:
    assert a.transport is not None
    return a.transport.is_connected(b.peer_id)


def test_invoke_across_the_network(cluster: LocalCluster) -> None:
    a, b, c = cluster.start(3)
    for other in (a, b):
        wait_for(lambda o=other: connected(c, o), what="bootstrap connections")
    reply = root(a).ask(root_handle(c.peer_id), "/public/hello", timeout=10)
    assert reply == {"message": "hello", "did": c.identity.did, "peer_id": c.peer_id}
    status = root(c).ask(root_handle(a.peer_id), "/public/status", timeout=10)
    assert status["peer_id"] == a.peer_id and status["status"] == "running"


def test_a_reply_over_the_noise_session_of_the_invoked_host_is_not_verified_again(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over real libp2p sessions an invoke's request is checked and its reply, which
    came over the Noise session of the host invoked, is not (specs/security.md,
    "Signatures and sessions"); the answer is the same."""
    import dms.actor.envelope as envelope_module

    a, c = cluster.start(2)
    wait_for(lambda: connected(c, a), what="bootstrap connection")
    real = envelope_module.verify_signature
    verified: list[str] = []

    def recording(public_key: bytes, signature: bytes, data: Any) -> bool:
        env = envelope_module.peek(bytes(data) + signature)
        verified.append(env.behaviour if env is not None else "?")
        return real(public_key, signature, data)

    monkeypatch.setattr(envelope_module, "verify_signature", recording)
    for _ in range(3):
        reply = root(a).ask(root_handle(c.peer_id), "/public/hello", timeout=10)
        assert reply["peer_id"] == c.peer_id
    assert verified.count("/public/hello") == 3
    assert not [b for b in verified if b.startswith("/dms/actor/replyto/")]


def test_a_node_whose_host_died_cannot_take_the_others_down(cluster: LocalCluster) -> None:
    """Simulated nodes share one trio loop. A node whose host stopped under its actors
    (a crash) gets a clear ``unreachable`` when they send; before, the send reached
    the loop after the host's nursery had closed and ended the loop, every other
    node's network with it."""
    a, b, c = cluster.start(3)
    cluster.wait_linked()
    assert root(a).ask(root_handle(b.peer_id), "/public/hello", timeout=10)["peer_id"] == b.peer_id
    assert c.transport is not None
    c.transport.stop()
    with pytest.raises(RemoteError) as refused:
        root(c).send(root_handle(a.peer_id), "/public/hello")
    assert refused.value.code == "unreachable"
    assert root(a).ask(root_handle(b.peer_id), "/public/hello", timeout=10)["peer_id"] == b.peer_id


def test_a_node_holding_many_connections_closes_every_one_when_it_stops(
    cluster: LocalCluster,
) -> None:
    """py-libp2p closed a host's connections one after another, each with 0.2 s of
    sleeps: a node holding over 25 used up the 5 s its stop gives the goodbye, and
    the rest were left (a daemon's process ended under them; a simulated node's loop
    kept them). Here 40 peers each hold a connection it accepted, two more one it
    dialed (its bootstrap nodes), and each sees it closed."""
    dialed = cluster.start(2)
    node = cluster.add("node")
    assert node.transport is not None
    for other in dialed:
        wait_for(lambda o=other: connected(o, node), what="its bootstrap connections")
    many = ManyKeys(node.addrs()[0], 40)
    try:
        assert many.dialed == 40
        wait_for(lambda: many.connected() == 40, timeout=30, what="40 connections")
        node.transport.stop()
        swarm: Any = node.transport._host.get_network()  # type: ignore[union-attr]
        assert not swarm.connections
        wait_for(lambda: many.connected() == 0, timeout=30, what="every peer told")
        for other in dialed:
            wait_for(lambda o=other: not connected(o, node), what="its bootstrap nodes told")
    finally:
        many.close()


def test_owner_behaviours_are_refused_to_other_nodes(cluster: LocalCluster) -> None:
    a, b = cluster.start(2)
    wait_for(lambda: connected(b, a), what="bootstrap connection")
    with pytest.raises(RemoteError) as caught:
        root(a).ask(root_handle(b.peer_id), "/dms/node/peers/list", timeout=10)
    assert caught.value.code == "forbidden"


def test_broadcast_reaches_every_subscriber(cluster: LocalCluster) -> None:
    nodes = cluster.start(5)

    def meshed() -> bool:
        """Every node's gossip mesh holds the peers it is connected to, all at once."""
        for n in nodes:
            if n.transport is None:
                return False
            mesh = n.transport.mesh_peers(BROADCAST_TOPIC)
            if not mesh or len(mesh) != len(n.transport.peers()):
                return False
        return True

    wait_for(meshed, 30, "gossip mesh")
    sender = nodes[0]
    # A broadcast lives its ttl at each hop; on a loaded machine the default (an
    # invoke's 10 s) can pass before a late subscriber hears it through gossip.
    root(sender).publish(BROADCAST_TOPIC, "/broadcast/hello", {"message": "hi all"}, ttl_s=60)

    def heard(node: Node) -> list[dict[str, object]]:
        return root(node).ask(root(node).handle, "/public/hellos", timeout=30)

    for node in nodes[1:]:
        wait_for(lambda n=node: heard(n), timeout=30, what=f"hello at {node.peer_id}")
        (hello,) = heard(node)
        assert hello["from"] == sender.identity.did and hello["message"] == "hi all"
    # The publisher hears its own broadcast once, through its local subscription.
    assert len(heard(sender)) == 1


def test_restarted_node_reconnects_and_is_reachable(cluster: LocalCluster) -> None:
    a, b = cluster.start(2)
    wait_for(lambda: connected(b, a), what="bootstrap connection")
    assert root(a).ask(root_handle(b.peer_id), "/public/hello", timeout=10)["peer_id"] == b.peer_id
    b = cluster.restart(b)  # same home and key, a new port, no bootstrap flag
    wait_for(lambda: connected(b, a), what="the restarted node dialing its known peers")
    assert root(a).ask(root_handle(b.peer_id), "/public/hello", timeout=10)["peer_id"] == b.peer_id


def test_unknown_peer_is_a_clear_error_before_the_timeout(cluster: LocalCluster) -> None:
    """An invoke to a peer nobody knows fails as soon as the network says so, with why:
    not when its own deadline (120 s here) runs out."""
    (a,) = cluster.start(1)
    stranger = "12D3KooWPFKFJf9NhYrEDsrqM231jX1rszkZD59mazCQymVR7w7A"
    caught = raised_by(
        lambda: root(a).ask(root_handle(stranger), "/public/hello", timeout=120),
        60,
        "the invoke to an unknown peer to fail",
    )
    assert isinstance(caught, RemoteError)
    assert caught.code == "unreachable"  # its deadline would say "timeout"
    assert stranger in caught.reason


def test_stopped_peer_is_a_clear_error_before_the_timeout(cluster: LocalCluster) -> None:
    """A peer that left: the invoke fails with "unreachable", not at its deadline."""
    a, b = cluster.start(2)
    wait_for(lambda: connected(b, a), what="bootstrap connection")
    root(a).ask(root_handle(b.peer_id), "/public/hello", timeout=10)
    b.stop()
    caught = raised_by(
        lambda: root(a).ask(root_handle(b.peer_id), "/public/hello", timeout=120),
        60,
        "the invoke to a stopped peer to fail",
    )
    assert isinstance(caught, RemoteError)
    assert caught.code == "unreachable"  # its deadline would say "timeout"


def test_peer_without_a_known_address_is_found_through_the_dht(cluster: LocalCluster) -> None:
    a = cluster.add()
    b = cluster.add(bootstrap=[a.addrs()[0]])
    c = cluster.add(bootstrap=[b.addrs()[0]])  # a and c share no connection and no address
    wait_for(lambda: connected(a, b) and connected(c, b), what="the chain a - b - c")
    assert not connected(a, c)
    wait_for(
        lambda: b.peer_id in root(a).ask(root(a).handle, "/dms/node/peers/dht")["peers"],
        60,  # identify, then the routing table: slow on a loaded machine
        "b in a's DHT routing table",
    )
    reply = root(a).ask(root_handle(c.peer_id), "/public/hello", timeout=10)
    assert reply["peer_id"] == c.peer_id
    scores = root(a).ask(root(a).handle, "/dms/node/peers/score")
    assert {s["peer_id"] for s in scores} >= {b.peer_id, c.peer_id}


def test_a_peer_known_only_by_its_heartbeat_addresses_can_be_dialed(
    cluster: LocalCluster,
) -> None:
    a = cluster.add(bootstrap=[])
    b = cluster.add(bootstrap=[])
    assert a.transport is not None and b.transport is not None
    with pytest.raises(RemoteError) as caught:  # no connection, no address, no DHT peer
        root(a).ask(root_handle(b.peer_id), "/public/hello", timeout=10)
    assert caught.value.code == "unreachable"
    # What a heartbeat carries: b's own addresses, plus one naming another peer,
    # which must not be filed under b.
    a.transport.learn_addrs(b.peer_id, [*b.addrs(), f"/ip4/10.9.9.9/tcp/1/p2p/{a.peer_id}"])
    reply = root(a).ask(root_handle(b.peer_id), "/public/hello", timeout=10)
    assert reply["peer_id"] == b.peer_id
