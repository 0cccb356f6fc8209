"""Patches to py-libp2p's gossipsub mesh upkeep and gossip emission.

**A pruner backs off too** (gossipsub v1.1 spec, go-libp2p). When a mesh is
over ``degree_high`` the heartbeat PRUNEs peers but, unlike go-libp2p, records
no backoff for them, so a later heartbeat may GRAFT the same peer again; the
pruned peer (which did record one) calls that a GRAFT flood, penalises the
pruner and PRUNEs it back. On a well-connected node this churned every mesh
(hundreds of "GRAFT flood" warnings a minute in a 20-node cluster, broadcast
p95 tripled). The heartbeat's prunes now record the backoff, as the spec says.

**No opportunistic grafting without peer scoring** (go-libp2p semantics).
It exists to replace poorly scoring mesh peers; go-libp2p runs it only with
score parameters set, every 60th heartbeat, when the mesh's median score is
under a threshold. py-libp2p runs it on every heartbeat of every topic and,
with no score parameters (ours: envelopes are signed and checked, which is
our defence), grafts peers whenever scores differ at all. Every heartbeat
then pushed meshes past ``degree_high``; the prunes that followed put, within
a minute, nearly every pair of a 20-node cluster in backoff, and meshes fell
apart (nodes with no mesh peer, heartbeats not reaching whole groups).

**IHAVE every few heartbeats.** py-libp2p emits gossip (IHAVE to up to 6 non-mesh
peers a topic) at every heartbeat whose window holds an id; a router with
``ihave_every_heartbeats`` (ours: 3) emits it at every third heartbeat only, its mcache
window as many heartbeats long, so each id is still named once, with those that came
since the last emission: an idle node's IHAVEs come in one RPC a peer per 3 s
instead of one a second. Unpatched, the window of 3 is emitted at every heartbeat
(py-libp2p's behaviour: each id named three times).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from typing import Any

log = logging.getLogger("dms.network")


def back_off_pruned_peers() -> bool:
    from libp2p.pubsub.gossipsub import GossipSub

    if not all(hasattr(GossipSub, n) for n in ("mesh_heartbeat", "_add_back_off")):
        log.info("py-libp2p's gossipsub changed shape; its heartbeat prunes are left as they are")
        return False
    mesh_heartbeat = GossipSub.mesh_heartbeat

    def mesh_heartbeat_with_backoff(self: Any) -> Any:
        to_graft, to_prune = mesh_heartbeat(self)
        for peer, topics in to_prune.items():
            for topic in topics:
                self._add_back_off(peer, topic, False)
        return to_graft, to_prune

    GossipSub.mesh_heartbeat = mesh_heartbeat_with_backoff
    return True


def no_opportunistic_grafting() -> bool:
    from libp2p.pubsub.gossipsub import GossipSub

    if not hasattr(GossipSub, "_perform_opportunistic_grafting"):
        log.info("py-libp2p's gossipsub changed shape; opportunistic grafting left as it is")
        return False

    def no_grafting(self: Any, topic: str, peers_to_graft: Any) -> int:
        return 0

    GossipSub._perform_opportunistic_grafting = no_grafting
    return True


def gossip_heartbeat_is_shaped() -> bool:
    """Whether py-libp2p's heartbeat calls ``gossip_heartbeat`` once a heartbeat and
    before the mcache shifts its window, and the window it emits is the history's
    first ``window_size`` heartbeats: what ``ihave_every_few_heartbeats`` counts on
    (each id named once if IHAVE is emitted every ``window_size`` heartbeats)."""
    import inspect

    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.mcache import MessageCache

    try:
        beat = inspect.getsource(GossipSub.heartbeat)
        window = inspect.getsource(MessageCache.window)
    except (AttributeError, OSError, TypeError):
        return False
    gossips = [m.start() for m in re.finditer(r"self\.gossip_heartbeat\(\)", beat)]
    shifts = [m.start() for m in re.finditer(r"self\.mcache\.shift\(\)", beat)]
    return (
        len(gossips) == 1
        and len(shifts) == 1
        and gossips[0] < shifts[0]
        and "self.history[: self.window_size]" in window
    )


def ihave_every_few_heartbeats() -> bool:
    from libp2p.pubsub.gossipsub import GossipSub

    if not hasattr(GossipSub, "gossip_heartbeat") or not gossip_heartbeat_is_shaped():
        log.info("py-libp2p's gossipsub changed shape; IHAVE is emitted at every heartbeat")
        return False
    gossip = GossipSub.gossip_heartbeat

    def gossip_every_few(router: Any) -> Any:
        # A function patched in as GossipSub.gossip_heartbeat: ``router`` is py-libp2p's;
        # ``ihave_every_heartbeats`` is set on ours (dms.network.gossip).
        every = getattr(router, "ihave_every_heartbeats", 1)
        beats = router.__dict__.get("_dms_gossip_beats", 0) + 1
        router.__dict__["_dms_gossip_beats"] = beats
        if every > 1 and beats % every:
            return defaultdict(dict)  # no IHAVE at this heartbeat: its ids wait in the window
        return gossip(router)

    GossipSub.gossip_heartbeat = gossip_every_few
    return True
