"""Broadcast: gossipsub topics whose messages are our signed envelopes.

Each topic has a validator that runs before a message is delivered or
forwarded: the envelope must decode, be in time, carry a valid signature and
name the publishing host as its sender's host. A subscription's messages are
pumped to the actor system. See specs/network.md, "Broadcast".
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub

from dms.actor.codes import Refusal
from dms.actor.envelope import check_time, now_ns, unseal, verify
from dms.network.checked import CheckedFrames
from dms.network.loop import LoopBridge, why
from dms.network.settings import GossipSettings, NetworkSettings

log = logging.getLogger("dms.network")


def new_pubsub(host: IHost, gossip: GossipSettings) -> tuple[Pubsub, GossipSub]:
    """gossipsub for ``host``, with our settings (specs/network.md has why each)."""
    # py-libp2p reads this module constant when a subscription is made; 32 drops
    # messages silently under any burst, so it is raised for the whole process.
    pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = max(
        pubsub_module.SUBSCRIPTION_CHANNEL_SIZE, gossip.subscription_queue
    )
    router = GossipSub(
        protocols=[PROTOCOL_ID_V11],
        degree=gossip.degree,
        degree_low=gossip.degree_low,
        degree_high=gossip.degree_high,
        heartbeat_interval=gossip.heartbeat_s,  # type: ignore[arg-type]
        heartbeat_initial_delay=0.1,
        max_messages_per_topic_per_second=gossip.max_messages_per_topic_per_s,
        adaptive_gossip_enabled=False,
    )
    # Our envelopes are signed and the validator checks them (and that the sender is
    # the publishing host): a second libp2p signature per message only costs CPU.
    pubsub = Pubsub(host, router, strict_signing=False)
    return pubsub, router


def envelope_is_valid(
    frame: bytes,
    publisher: str,
    max_bytes: int,
    max_ttl_s: float,
    skew_s: float,
    *,
    signature_checked: bool = False,
) -> bool:
    """The gossip validator: signed, in time, and published by the host it names."""
    try:
        sealed = unseal(frame, max_bytes)
        check_time(sealed.envelope, now_ns(), max_ttl_s, skew_s)
        verify(sealed, signature_checked=signature_checked)
    except Refusal as refusal:
        log.info("gossip from %s rejected: %s: %s", publisher, refusal.code, refusal.reason)
        return False
    if sealed.envelope.sender.address.host != publisher:
        log.info("gossip from %s rejected: sender names another host", publisher)
        return False
    return True


class Gossip(LoopBridge):
    """Publishing on topics, subscribing to them, and the mesh (a transport part)."""

    settings: NetworkSettings
    _host: IHost | None
    _pubsub: Pubsub | None
    _router: GossipSub | None
    _topics: dict[str, trio.CancelScope]
    _checked: CheckedFrames
    _max_ttl_s: float
    _clock_skew_s: float

    _deliver: Callable[..., None]  # dms.network.unicast.Unicast._deliver

    def publish(self, topic: str, frame: bytes) -> None:
        if self._on_trio_thread():
            self._start_soon(self._publish, topic, frame)
            return
        self._call(self._publish, topic, frame)

    def subscribe(self, topic: str) -> None:
        self._call(self._subscribe, topic)

    def unsubscribe(self, topic: str) -> None:
        self._call(self._unsubscribe, topic)

    def scores(self) -> dict[str, float]:
        """gossipsub's score of each connected peer over the topics we are in."""
        return self._call(self._scores)

    def mesh_peers(self, topic: str) -> list[str]:
        """Peers in this node's gossipsub mesh for ``topic`` (full-message relays)."""
        mesh = self._router.mesh.get(topic, set()) if self._router else set()
        return sorted(p.to_base58() for p in list(mesh))

    async def _publish(self, topic: str, frame: bytes) -> None:
        assert self._pubsub is not None
        try:
            await self._pubsub.publish(topic, frame)
        except Exception as exc:
            log.warning("publish on %s failed: %s", topic, why(exc))

    async def _subscribe(self, topic: str) -> None:
        if topic in self._topics:
            return
        assert self._pubsub is not None and self._nursery is not None
        limits = (self.settings.max_frame_bytes, self._max_ttl_s, self._clock_skew_s)
        assert self._host is not None
        my_id = self._host.get_id()

        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            # Our own publication was sealed by our actor system (or verified by the
            # local API that relayed it): all but its signature is checked.
            own = forwarder == my_id
            publisher = ID(msg.from_id).to_base58()
            if not envelope_is_valid(msg.data, publisher, *limits, signature_checked=own):
                return False
            if not own:
                self._checked.remember(msg.data)
            return True

        self._pubsub.set_topic_validator(topic, validate, False)
        subscription = await self._pubsub.subscribe(topic)
        scope = trio.CancelScope()
        self._topics[topic] = scope
        me = my_id.to_bytes()

        async def pump() -> None:
            with scope:
                while True:
                    msg = await subscription.get()
                    if msg.from_id == me:
                        continue  # the actor system delivered our own message already
                    checked = self._checked.take(msg.data)
                    self._deliver(msg.data, ID(msg.from_id).to_base58(), signature_checked=checked)

        self._nursery.start_soon(pump)

    async def _unsubscribe(self, topic: str) -> None:
        scope = self._topics.pop(topic, None)
        if scope is None:
            return
        scope.cancel()
        assert self._pubsub is not None
        await self._pubsub.unsubscribe(topic)
        self._pubsub.remove_topic_validator(topic)

    async def _scores(self) -> dict[str, float]:
        assert self._host is not None
        router = self._router
        topics = list(self._topics)
        out = {}
        for pid in self._host.get_network().get_connections_map():
            scorer = getattr(router, "scorer", None)
            out[pid.to_base58()] = float(scorer.score(pid, topics)) if scorer else 0.0
        return out
