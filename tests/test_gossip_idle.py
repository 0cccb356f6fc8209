"""What an idle node's gossipsub heartbeat sends and does: a message id is advertised
(IHAVE) once, not at every heartbeat its mcache window holds it, and the peer-score
upkeep that cannot change anything without score parameters is not done
(specs/network.md, "Broadcast: gossipsub")."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2

from dms.sim.cluster import LocalCluster
from tests.conftest import wait_for
from tests.test_libp2p_patches import TOPIC, listening_nodes


@pytest.fixture
def ihaves(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, str, bytes]]:
    """The message ids on TOPIC the IHAVEs this process sends name, counted by (sender,
    receiver, id); the real method runs."""
    sent: Counter[tuple[str, str, bytes]] = Counter()
    original = GossipSub.emit_control_message

    async def counted(self: GossipSub, control: rpc_pb2.ControlMessage, to_peer: Any) -> None:
        for ihave in control.ihave:
            if ihave.topicID == TOPIC and self.pubsub is not None:
                sender = self.pubsub.my_id.to_base58()
                sent.update((sender, to_peer.to_base58(), mid) for mid in ihave.messageIDs)
        await original(self, control, to_peer)

    monkeypatch.setattr(GossipSub, "emit_control_message", counted)
    return sent


def test_messages_are_advertised_together_every_third_heartbeat_then_no_ihave(
    cluster: LocalCluster, ihaves: Counter[tuple[str, str, bytes]]
) -> None:
    """Eight nodes: each has non-mesh peers (the mesh holds at most 6 of its 7), to which
    gossipsub advertises what it got. Each message id is named to a peer once, in the
    IHAVE of the next third heartbeat with those that came since (py-libp2p as
    configured before: one IHAVE a heartbeat naming the last 3 heartbeats' ids, each id
    to a peer up to 3 times), every node that advertises names all four, and once they
    are out of the window the heartbeats say nothing on the topic."""
    # Each node dials every node started before it: all connected to all (through the
    # addresses heartbeats carry, the connection manager's waves took ~10 s more).
    nodes, seen = listening_nodes(cluster, 8, dial_all=True)
    wait_for(
        lambda: all(n.transport is not None and len(n.transport.peers()) == 7 for n in nodes),
        timeout=90,
        what="every node connected to every other",
    )
    time.sleep(2.0)  # the meshes' heartbeats after the connections
    assert nodes[0].node is not None
    heartbeat_s = nodes[0].network_settings.gossip.heartbeat_s
    # Four messages within less than 3 heartbeats, each in a heartbeat of its own or
    # nearly (0.9 apart): a window shorter than the 3 heartbeats between IHAVEs loses
    # some of them, a longer one names some twice.
    for i in range(4):
        nodes[0].node.publish(TOPIC, "/test/tuning", {"i": i})
        time.sleep(0.9 * heartbeat_s)
    wait_for(lambda: all(len(s) == 4 for s in seen), what="the messages everywhere")
    # Past every window the messages were in (3 heartbeats as py-libp2p ships), and more.
    time.sleep(7 * heartbeat_s)
    advertised = Counter(ihaves)
    assert advertised, "no node advertised the messages to a non-mesh peer (repair is gone)"
    # Each id named to a peer once.
    assert max(advertised.values()) == 1, advertised.most_common(3)
    ids = {mid for _, _, mid in advertised}
    assert len(ids) == 4, ids
    named: dict[str, set[bytes]] = {}
    for sender, _, mid in advertised:
        named.setdefault(sender, set()).add(mid)
    # Every node that advertised named all four (each node had all four).
    assert all(got == ids for got in named.values()), named
    time.sleep(3 * heartbeat_s)  # idle heartbeats: nothing new on the topic
    assert ihaves == advertised


def test_a_gossip_window_shorter_than_three_heartbeats_is_refused() -> None:
    """The mcache window (``gossip_heartbeats`` x ``ihave_every_heartbeats``) is also
    what a peer newly writable or subscribed is sent again: below py-libp2p's 3
    heartbeats the settings are refused, saying why."""
    from pydantic import ValidationError

    from dms.network.settings import GossipSettings

    for heartbeats, every in ((1, 1), (1, 2), (2, 1)):
        with pytest.raises(ValidationError, match=r"gossip window .* must be at least 3"):
            GossipSettings(gossip_heartbeats=heartbeats, ihave_every_heartbeats=every)
    assert GossipSettings(gossip_heartbeats=3, ihave_every_heartbeats=1)
    assert GossipSettings().gossip_heartbeats * GossipSettings().ihave_every_heartbeats == 3
