"""Broadcast: gossipsub topics whose messages are our signed envelopes.

Every message is signed by the host that publishes it (libp2p's StrictSign, the
default of go- and js-libp2p), and a message from any other peer is refused
unless its signature is valid, before anything is remembered under its id:
so its ``from`` is the host that published it, and no peer can take another's
message ids (``from`` + seqno) ahead of it. Each topic then has a validator
that runs before a message is delivered or forwarded: the envelope's header
must decode, be in time, name the publishing host as its sender's host (a
root sender must be that host's key) and carry a valid signature. A sender,
root or not, is bound to its host as on a unicast stream, where Noise
authenticates the host. A subscription's messages are pumped to the actor
system. See specs/network.md, "Broadcast", and specs/security.md.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX, signature_validator

from dms.actor.codes import ErrorCode, Refusal
from dms.actor.envelope import check_signature, check_signer, check_time, now_ns, open_frame
from dms.actor.handle import ROOT_INBOX
from dms.actor.ratelimit import Bucket, PeerRates
from dms.network.checked import CheckedFrames
from dms.network.loop import LoopBridge, why
from dms.network.peertable import HEARTBEAT_TOPIC
from dms.network.settings import GossipSettings, NetworkSettings
from dms.security.identity import IdentityError, public_key_from_peer_id

log = logging.getLogger("dms.network")

# Called with the forwarding peer, the message's claimed origin and the refusal
# (``quiet``: count it, do not log it; ``late``: count it, log it at DEBUG).
GossipRefused = Callable[..., None]
# An envelope expired no longer ago than this is a late copy an honest peer may send:
# one forwards only what it validated (so in time), and holds it a few heartbeats in
# its message cache (what it sends a peer that joins or asks: IWANT), or up to 30 s
# in py-libp2p's queue for a peer it is still identifying; a busy receiver adds its
# own delay. Older, some peer forwarded what it never validated: logged at INFO.
LATE_COPY_S = 60.0
# Publishers whose gossip budgets are kept before the full ones are forgotten.
MAX_PUBLISHERS = 4096
# Where capability revocations are published (``dms.node.caps`` publishes there): a
# topic with a budget of its own per publisher, far below the general one (a node
# revokes rarely; 300 junk revocations from one member, forwarded by every node that
# passed them, kept the network's nodes busy: specs/security.md, "Revocations").
REVOCATION_TOPIC = "/dms/revocation"
# This node's own messages waiting for their topic's budget; more are dropped.
MAX_PACED = 10_000
# The share of a topic's budget this node's own messages use (rate and burst).
PACE_SHARE = 0.5
# This node's own messages that go before the others its pacer holds: a heartbeat
# late past its deadline has the node gone at its peers, its running jobs placed again.
URGENT_TOPICS = frozenset({HEARTBEAT_TOPIC})


class SignedPubsub(Pubsub):
    """py-libp2p's pubsub under libp2p's StrictSign policy, with refusals that say why.

    Our messages carry ``from``, ``seqno`` and a signature by the host key, as
    StrictSign peers (go- and js-libp2p by default) require. A message from
    another peer is refused unless its signature is valid, before py-libp2p
    looks at its id (``from`` + seqno) in any cache: py-libp2p remembers a
    failed validation under the id, so a forged message under another host's
    next id would have made that host's real message fail unseen. py-libp2p's
    own ``strict_signing`` does the same check without telling us; it stays
    off, and each message is verified once, here.
    """

    def __init__(
        self,
        host: IHost,
        router: GossipSub,
        refused: GossipRefused,
        rate: float = 50.0,
        burst: int = 200,
        topic_budgets: dict[str, tuple[float, int]] | None = None,
        *,
        flooder_rate: float = float("inf"),
        flooder_cooldown_s: float = 0.0,
        stake: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__(host, router, strict_signing=False)
        self._key = host.get_private_key()
        self._refused = refused
        # Messages a second each publishing host may have us handle (and forward); a
        # publisher without a stake found over it, only ``flooder_rate`` for a while.
        self._origins = PeerRates(
            rate, burst, flood_rate=flooder_rate, flood_cooldown_s=flooder_cooldown_s
        )
        self._stake = stake
        self._rate, self._burst = rate, burst
        # Topics with a smaller budget of their own, per publishing host, besides.
        self._topic_rates = {
            topic: PeerRates(r, b) for topic, (r, b) in (topic_budgets or {}).items()
        }
        # The same budget, for the messages each host sent us itself: only over this one
        # is it found flooding (``_within_budget``).
        self._direct = PeerRates(rate, burst)
        self._swept = float("-inf")

    async def publish(self, topic_id: str | list[str], data: bytes) -> None:
        topics = [topic_id] if isinstance(topic_id, str) else list(topic_id)
        msg = rpc_pb2.Message(
            data=data, topicIDs=topics, from_id=self.my_id.to_bytes(), seqno=self._next_seqno()
        )
        # No ``key``: an Ed25519 key is in the peer id (as go-libp2p does).
        msg.signature = self._key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
        await self.push_msg(self.my_id, msg)

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        if msg_forwarder != self.my_id and not self._is_msg_seen(msg):
            # The signature says who published it: its budget pays, whoever forwarded it.
            # A message its own publisher sent us is paid before its signature is
            # checked (the connection authenticates that peer: a forged one costs only
            # its own budget), so a flood over the budget costs no verification.
            direct = msg.from_id == msg_forwarder.to_bytes()
            if direct and not self._within_budget(msg_forwarder, msg, direct):
                return
            if not _signed(msg):
                reason = "the gossip message has no valid libp2p signature by the host it names"
                self._refused(msg_forwarder, msg.from_id, Refusal(ErrorCode.BAD_SIGNATURE, reason))
                return
            if not direct and not self._within_budget(msg_forwarder, msg, direct):
                return
        await super().push_msg(msg_forwarder, msg)

    def _within_budget(self, forwarder: ID, msg: rpc_pb2.Message, direct: bool = True) -> bool:
        """Take one message from the publishing host's budget, and from its budget on
        each of the message's topics that has one. Over either, the message is dropped
        before anything else is done with it (validated, delivered, forwarded);
        counted each time, logged once a second per publisher. A publisher is found
        flooding only when what it sent itself (``direct``) is over the budget: any
        peer can replay a host's old signed messages (gone from the seen cache after
        2 min, and one dropped here is never marked seen), and that had the host
        found flooding, heard at ``flooder_rate`` for a while, by whoever the replayer
        reached: for the replays themselves, or for its own message dropped as they
        spent its budget."""
        origin = msg.from_id
        key = origin.hex()
        if len(self._origins) > MAX_PUBLISHERS and time.monotonic() > self._swept + 1.0:
            # every publisher whose budget is full again goes
            for rates in (self._origins, self._direct, *self._topic_rates.values()):
                rates.forget("")
            self._swept = time.monotonic()
        own_over = direct and not self._direct.allow(key)
        budgets = [(self._origins, self._rate, self._burst, "gossip messages")]
        for topic in msg.topicIDs:
            rates = self._topic_rates.get(topic)
            if rates is not None:
                budgets.append((rates, rates.rate, int(rates.burst), f"messages on {topic}"))
        for rates, rate, burst, what in budgets:
            flooding = rates.is_flooding(key)
            if flooding and not self._publisher_has_no_stake(origin):
                rates.pardon(key)  # a stake since it was found flooding: its budget only
                flooding = False
            if rates.allow(key):
                continue
            if own_over and not flooding and self._publisher_has_no_stake(origin):
                rates.flooding(key)
            if flooding:
                rate = min(rates.flood_rate, rate)
                burst = max(1, int(rate))
                what += f" (found flooding: for {rates.flood_cooldown_s:g} s after the last drop)"
            count = rates.refused(key)
            reason = f"more than {rate:g} {what} a second (burst {burst}) published by this host"
            if count:
                reason += f" ({count} dropped since the last report)"
            refusal = Refusal(ErrorCode.RATE_LIMITED, reason)
            self._refused(forwarder, origin, refusal, quiet=not count)
            return False
        return True

    def _publisher_has_no_stake(self, origin: bytes) -> bool:
        try:
            return self._stake is None or not self._stake(ID(origin).to_base58())
        except Exception:  # not a peer id: no stake
            return True


class Pacer:
    """This node's own messages on a topic with a budget, or on all the others together
    (the budget each receiver gives a publisher), published no faster than it (every
    receiver gives each publisher that budget: faster, they would be dropped).
    One trio thread uses it."""

    def __init__(self, rate: float, burst: int) -> None:
        # Below the budget, with room to spare: messages bunch on the way (a relay
        # forwards what it got late together), and a receiver's bucket starts when
        # it hears the first one.
        self.rate, self.burst = rate * PACE_SHARE, max(1.0, burst * PACE_SHARE)
        self.bucket = Bucket(self.burst, time.monotonic())
        self.waiting: deque[tuple[str, bytes]] = deque()  # (topic, frame)
        # Messages of ``URGENT_TOPICS`` (heartbeats): sent before any of ``waiting``.
        self.urgent: deque[tuple[str, bytes]] = deque()
        self.draining = False

    def now_or_queue(self, topic: str, frame: bytes, urgent: bool = False) -> bool:
        """True: publish ``frame`` on ``topic`` now. False: it waits its turn (``drain``
        sends it), or is dropped if ``MAX_PACED`` wait already (logged). An ``urgent``
        one waits behind the urgent ones only: a heartbeat behind a burst of bid
        requests went out after them, past its deadline (its peers had the node gone)."""
        first = not self.urgent and (urgent or not self.waiting)
        if first and self.bucket.take(self.rate, self.burst, time.monotonic()):
            return True
        queue = self.urgent if urgent else self.waiting
        if len(queue) >= MAX_PACED:
            log.warning("own gossip message dropped: %d wait for the topic's budget", MAX_PACED)
            return False
        queue.append((topic, frame))
        return False

    @property
    def pending(self) -> bool:
        return bool(self.urgent or self.waiting)

    async def drain(self, publish: Callable[[str, bytes], Awaitable[None]]) -> None:
        self.draining = True
        try:
            while self.urgent or self.waiting:
                if not self.bucket.take(self.rate, self.burst, time.monotonic()):
                    await trio.sleep(max(0.0, (1.0 - self.bucket.tokens) / self.rate))
                    continue
                await publish(*(self.urgent or self.waiting).popleft())
        finally:
            self.draining = False


def _signed(msg: rpc_pb2.Message) -> bool:
    try:
        return bool(signature_validator(msg))
    except Exception:  # a key that does not parse
        return False


def new_router(gossip: GossipSettings) -> GossipSub:
    """The gossipsub router ``new_pubsub`` uses, with our settings."""
    window = gossip.gossip_heartbeats * gossip.ihave_every_heartbeats
    router = GossipSub(
        protocols=[PROTOCOL_ID_V11],
        degree=gossip.degree,
        degree_low=gossip.degree_low,
        degree_high=gossip.degree_high,
        heartbeat_interval=gossip.heartbeat_s,  # type: ignore[arg-type]
        heartbeat_initial_delay=0.1,
        # Message ids are advertised at gossip.gossip_heartbeats emissions of IHAVE after
        # they arrive, one every ihave_every_heartbeats (libp2p_patches); IWANTs are
        # answered for 2 heartbeats after the last (5 as py-libp2p ships, at least). The
        # window is also what a newly writable or subscribed peer is sent again
        # (py-libp2p's send_recent_messages): GossipSettings requires it >= 3.
        gossip_window=window,
        gossip_history=max(5, window + 2),
        max_messages_per_topic_per_second=gossip.max_messages_per_topic_per_s,
        adaptive_gossip_enabled=False,
    )
    router.ihave_every_heartbeats = gossip.ihave_every_heartbeats  # type: ignore[attr-defined]
    return router


def new_pubsub(
    host: IHost,
    gossip: GossipSettings,
    refused: GossipRefused,
    budgets: dict[str, tuple[float, int]] | None = None,
    *,
    flooder_cooldown_s: float = 0.0,
    stake: Callable[[str], bool] | None = None,
) -> tuple[Pubsub, GossipSub]:
    """gossipsub for ``host``, with our settings (specs/network.md has why each)."""
    # py-libp2p reads this module constant when a subscription is made; 32 drops
    # messages silently under any burst, so it is raised for the whole process.
    pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = max(
        pubsub_module.SUBSCRIPTION_CHANNEL_SIZE, gossip.subscription_queue
    )
    router = new_router(gossip)
    pubsub = SignedPubsub(
        host,
        router,
        refused,
        gossip.max_messages_per_peer_per_s,
        gossip.message_burst_per_peer,
        budgets,
        flooder_rate=gossip.flooder_messages_per_s,
        flooder_cooldown_s=flooder_cooldown_s,
        stake=stake,
    )
    return pubsub, router


def topic_budgets(settings: NetworkSettings) -> dict[str, tuple[float, int]]:
    """Topics with a budget of their own per publishing host: (a second, at once)."""
    return {
        REVOCATION_TOPIC: (settings.revocations_per_peer_per_s, settings.revocation_burst_per_peer)
    }


def check_gossip(
    frame: bytes,
    publisher: str,
    topics: list[str],
    max_bytes: int,
    max_ttl_s: float,
    skew_s: float,
    *,
    signature_checked: bool = False,
) -> None:
    """The topic validator's checks, on the header alone; raises ``Refusal``.

    ``publisher``: the host that signed the gossip message. The envelope's sender
    must name it as its host, and a root sender must be its key, as on a unicast
    stream. The payload is left to the receive pipeline.
    """
    opened = open_frame(frame, max_bytes)
    env = opened.envelope
    check_time(env, now_ns(), max_ttl_s, skew_s)
    if env.to is not None or env.topic not in topics:
        raise Refusal(ErrorCode.MALFORMED, "a gossip envelope names the topic it is published on")
    if env.sender.address.host != publisher:
        raise Refusal(
            ErrorCode.WRONG_SIGNER, "the sender names another host than the one that published it"
        )
    if env.sender.address.inbox == ROOT_INBOX:
        try:
            host_key = public_key_from_peer_id(publisher)
        except IdentityError:
            host_key = None
        if host_key != env.signer:
            raise Refusal(ErrorCode.WRONG_SIGNER, "root actor is not signed by its host's key")
    if not signature_checked:
        check_signature(opened)
    check_signer(env)


def late_copy(frame: bytes, max_bytes: int, now: int | None = None) -> bool:
    """Whether ``frame``, refused as expired, expired within :data:`LATE_COPY_S`: a late
    copy, as gossip brings at a join (the message cache's last heartbeats, sent to a
    peer that joins), not a replay of what no honest peer still forwards."""
    try:
        expiry = open_frame(frame, max_bytes).envelope.expiry
    except Refusal:
        return False
    return (now_ns() if now is None else now) - expiry <= LATE_COPY_S * 1e9


def envelope_is_valid(
    frame: bytes,
    publisher: str,
    max_bytes: int,
    max_ttl_s: float,
    skew_s: float,
    *,
    signature_checked: bool = False,
) -> bool:
    """The gossip validator's checks as a yes or no (the envelope's own topic assumed)."""
    try:
        topic = open_frame(frame, max_bytes).envelope.topic
        topics = [topic] if topic is not None else []
        check_gossip(
            frame, publisher, topics, max_bytes, max_ttl_s, skew_s,
            signature_checked=signature_checked,
        )  # fmt: skip
    except Refusal as refusal:
        log.info("gossip from %s rejected: %s: %s", publisher, refusal.code, refusal.reason)
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
    _pacers: dict[str, Pacer]

    # What the transport refused before the actor system saw it, by code.
    refusals: Counter[str]

    _deliver: Callable[..., None]  # dms.network.unicast.Unicast._deliver

    def _gossip_refused(
        self,
        forwarder: ID,
        origin: bytes,
        refusal: Refusal,
        *,
        quiet: bool = False,
        late: bool = False,
    ) -> None:
        """Count and log a gossip message refused here (it goes no further): at DEBUG
        a ``late`` copy (:func:`late_copy`: every join brought a few, each an INFO
        line), at INFO anything else."""
        self.refusals[refusal.code] += 1
        if quiet:
            return
        try:
            publisher = ID(origin).to_base58()
        except Exception:
            publisher = origin.hex()
        log.log(
            logging.DEBUG if late else logging.INFO,
            "gossip from %s (via %s) refused: %s: %s",
            publisher,
            forwarder.to_base58(),
            refusal.code,
            refusal.reason,
        )

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
        # Every own message is paced: a topic with a budget of its own by that one; all
        # the others together by the budget each receiver gives a publisher, or past it
        # a burst (a requester gossiping many rounds) would have this node found flooding
        # and heard at a small rate, its heartbeats with it (specs/security.md, Flooders).
        budget = topic_budgets(self.settings).get(topic)
        key = topic if budget is not None else ""
        if budget is None:
            gossip = self.settings.gossip
            budget = (gossip.max_messages_per_peer_per_s, gossip.message_burst_per_peer)
        pacer = self._pacers.get(key)
        if pacer is None:
            pacer = self._pacers[key] = Pacer(*budget)
        if pacer.now_or_queue(topic, frame, urgent=topic in URGENT_TOPICS):
            await self._publish_now(topic, frame)
        elif pacer.pending and not pacer.draining and self._nursery is not None:
            pacer.draining = True
            self._nursery.start_soon(pacer.drain, self._publish_now)

    async def _publish_now(self, topic: str, frame: bytes) -> None:
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
            # Who signed the message (SignedPubsub checked it before this runs).
            publisher = ID(msg.from_id).to_base58()
            try:
                check_gossip(
                    msg.data, publisher, list(msg.topicIDs), *limits, signature_checked=own
                )
            except Refusal as refusal:
                late = refusal.code == ErrorCode.EXPIRED and late_copy(msg.data, limits[0])
                self._gossip_refused(forwarder, msg.from_id, refusal, late=late)
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
