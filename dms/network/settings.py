"""What a libp2p host is configured with (filled from ``dms.config.Settings`` and flags)."""

from __future__ import annotations

from typing import Literal

from multiaddr import Multiaddr
from pydantic import BaseModel, Field, field_validator, model_validator

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/9000"


class GossipSettings(BaseModel):
    """gossipsub knobs; py-libp2p's defaults suit neither our latency nor our rates.

    See ``specs/network.md`` for why each value was chosen.
    """

    heartbeat_s: float = Field(default=1.0, gt=0)
    degree: int = Field(default=4, ge=1)
    degree_low: int = Field(default=3, ge=1)
    degree_high: int = Field(default=6, ge=1)
    max_messages_per_topic_per_s: float = Field(default=1000.0, gt=0)
    # IHAVE emissions that name a message id to non-mesh peers after it arrived (one
    # every ihave_every_heartbeats heartbeats): the mcache window is gossip_heartbeats x
    # ihave_every_heartbeats heartbeats (gossipsub's history_gossip, 3 in go-libp2p and
    # py-libp2p, is that window).
    gossip_heartbeats: int = Field(default=1, ge=1, le=5)
    # IHAVE is emitted at every ihave_every_heartbeats-th heartbeat only, naming the ids
    # that arrived since the one before (py-libp2p: at every heartbeat).
    ihave_every_heartbeats: int = Field(default=3, ge=1, le=10)
    # Messages a second (and at once) that one publishing host may have a node handle,
    # whoever forwards them; the rest are dropped before validation (rate_limited).
    max_messages_per_peer_per_s: float = Field(default=50.0, gt=0)
    message_burst_per_peer: int = Field(default=200, ge=1)
    # A publisher without a stake found over that (specs/security.md, "Flooders"): its
    # messages a second until flooder_cooldown_s (NetworkSettings) after its last drop.
    flooder_messages_per_s: float = Field(default=2.0, gt=0)
    subscription_queue: int = Field(default=4096, ge=32)

    @model_validator(mode="after")
    def _window_replays_three_heartbeats(self) -> GossipSettings:
        # The window is also what py-libp2p sends again to a peer newly writable or newly
        # subscribed (send_recent_messages): shorter than 3 heartbeats (as py-libp2p
        # ships) and a peer that joins just after a message misses it.
        window = self.gossip_heartbeats * self.ihave_every_heartbeats
        if window < 3:
            raise ValueError(
                f"gossip_heartbeats x ihave_every_heartbeats is {window} heartbeats; the"
                " gossip window (what a new peer is sent again) must be at least 3"
            )
        return self


# The budgets' settings, named alike here and in ``dms.config.Settings``.
BUDGET_SETTINGS = (
    "max_inbound_connections",
    "max_connections_per_ip",
    "max_connections_per_subnet",
    "max_handshakes",
    "max_handshakes_per_ip",
    "handshake_timeout_s",
    "max_streams_per_peer",
    "max_streams",
    "stream_idle_s",
    "max_protocol_streams_per_peer",
    "protocol_idle_s",
    "max_buffered_bytes",
    "max_transfers_per_peer",
    "max_transfers",
    "chunk_idle_s",
    "chunk_min_bytes_per_s",
    "max_inbound_bytes_per_peer_per_s",
    "inbound_byte_burst_per_peer",
    "max_inbound_bytes_per_s",
    "inbound_byte_burst",
    "max_new_streams_per_peer_per_s",
    "new_stream_burst_per_peer",
    "max_unknown_new_streams_per_s",
    "unknown_new_stream_burst",
    "max_outbound_connections",
    "max_waiting_bytes",
    "max_waiting_peers",
    "max_new_dials_per_s",
    "new_dial_burst",
    "max_peerstore_peers",
    "max_peerstore_heard_peers",
    "revocations_per_peer_per_s",
    "revocation_burst_per_peer",
)


# ``dms.config.Settings`` names of RelaySettings' fields (with the ``relay_`` prefix).
RELAY_SETTINGS = (
    "relay_reservations",
    "relay_max_reservations",
    "relay_max_circuits_per_peer",
    "relay_max_circuits",
    "relay_max_circuit_bytes",
    "relay_max_circuit_s",
    "relay_max_peer_bytes_per_h",
    "relay_max_bytes_per_h",
)


class RelaySettings(BaseModel):
    """Circuit relay v2 (``dms.network.relay``; specs/network.md, "Relays").

    ``serve``: None serves when this node is publicly reachable. Every limit has a
    per-peer and a total part (DESIGN.md decision 12)."""

    serve: bool | None = None
    # Relays a private node keeps a reservation on.
    reservations: int = Field(default=2, ge=0, le=8)
    max_reservations: int = Field(default=64, ge=1)
    max_circuits_per_peer: int = Field(default=8, ge=1)
    max_circuits: int = Field(default=128, ge=1)
    max_circuit_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    max_circuit_s: int = Field(default=3600, ge=1)
    # Bytes one peer, and all peers, may have relayed in a rolling hour.
    max_peer_bytes_per_h: int = Field(default=1024 * 1024 * 1024, ge=1024)
    max_bytes_per_h: int = Field(default=8 * 1024 * 1024 * 1024, ge=1024)


class NetworkSettings(BaseModel):
    listen: list[str] = Field(default_factory=lambda: [DEFAULT_LISTEN])
    bootstrap: list[str] = Field(default_factory=list)
    mdns: bool = False
    dht: bool = True
    dial_timeout_s: float = Field(default=5.0, gt=0)
    max_frame_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    reconnect_interval_s: float = Field(default=10.0, gt=0)
    # py-libp2p's connection manager (its auto-connector) dials the peers it holds
    # addresses of until the node holds its aim of connections, inbound ones counted:
    # midway between its low and high watermarks, min_connections and max_connections,
    # so 175 with its defaults (50, at most 300), kept for a node of its own: bid
    # requests then find a connection open, where dialing on demand costs a Noise
    # handshake (measured in bench/placement.py: 12 placements/s at 20 nodes with them,
    # 5 with 8). connection_aim, when set, is the aim instead (connection_watermarks):
    # nodes sharing one process's trio loop aim at a dozen (dms.sim.cluster), since
    # below aim + 1 nodes every node dials every other at start, each dial a handshake
    # on that one loop (specs/sim.md, "Threads mode at tens of nodes").
    min_connections: int = Field(default=50, ge=1)
    max_connections: int = Field(default=300, ge=2)
    connection_aim: int | None = Field(default=None, ge=1)
    # Frames a second each peer may send on its streams, and at once (specs/network.md,
    # "Limits per peer"); and the most frames and bytes queued for one peer.
    max_frames_per_s: float = Field(default=2000.0, gt=0)
    frame_burst: int = Field(default=4000, ge=1)
    # The same for all peers without a stake here together (specs/security.md,
    # "Frames of peers without a stake"): one key's budget, shared by every key.
    max_unknown_frames_per_s: float = Field(default=1000.0, gt=0)
    unknown_frame_burst: int = Field(default=2000, ge=1)
    # A peer without a stake found flooding (specs/security.md, "Flooders"): its frames
    # a second (and gossip.flooder_messages_per_s) until flooder_cooldown_s after the
    # last one refused.
    flooder_frames_per_s: float = Field(default=20.0, gt=0)
    flooder_cooldown_s: float = Field(default=10.0, ge=0)
    max_outbound_frames: int = Field(default=10_000, ge=16)
    max_outbound_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024)
    # Bytes of frames waiting for streams to peers being dialed, all peers together.
    max_waiting_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    # Peers with frames waiting for a stream, all together: each is a task and a dial (a
    # DHT lookup for an unknown key) for up to dial_timeout_s, whatever its bytes. A
    # peer's frames wait only while its stream opens, and a node dials at most
    # max_outbound_connections (256) and holds max_connections (300): 4 x 256 leaves
    # every peer it can reach room at once.
    max_waiting_peers: int = Field(default=1024, ge=1)
    # Budgets of what remote parties can make this node hold (dms.network.budgets;
    # specs/security.md, "Budgets and priority"). Connections accepted from others:
    max_inbound_connections: int = Field(default=250, ge=1)
    max_connections_per_ip: int = Field(default=128, ge=1)
    max_connections_per_subnet: int = Field(default=192, ge=1)  # /24, IPv6 /64
    # Raw sockets in their Noise/Yamux handshake, and how long one may take.
    max_handshakes: int = Field(default=64, ge=1)
    max_handshakes_per_ip: int = Field(default=16, ge=1)
    handshake_timeout_s: float = Field(default=5.0, gt=0)
    # Inbound streams open at once, and how long one may go without a frame.
    max_streams_per_peer: int = Field(default=64, ge=4)
    max_streams: int = Field(default=4096, ge=16)
    stream_idle_s: float = Field(default=120.0, gt=0)
    # py-libp2p's own protocols (identify, ping, the DHT, ...): streams of one protocol
    # from one peer at once, and how long one may go with no byte either way.
    max_protocol_streams_per_peer: int = Field(default=8, ge=2)
    protocol_idle_s: float = Field(default=30.0, gt=0)
    # Bytes Yamux holds unread, all streams of the process (each stream: its window).
    max_buffered_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    # Chunk requests served at once, and how slow or idle a chunk stream may be.
    max_transfers_per_peer: int = Field(default=8, ge=1)
    max_transfers: int = Field(default=64, ge=1)
    chunk_idle_s: float = Field(default=10.0, gt=0)
    chunk_min_bytes_per_s: int = Field(default=256 * 1024, ge=1024)
    # Connections this host dials for a frame, a ping or a chunk fetch, in all.
    max_outbound_connections: int = Field(default=256, ge=1)
    # Dials a second, and at once, of peers neither staked nor reached before; past it,
    # while every dial slot is taken (a relayed dial in flight counted as one), such a
    # dial is refused (dms.network.dialslots).
    max_new_dials_per_s: float = Field(default=16.0, gt=0)
    new_dial_burst: int = Field(default=64, ge=1)
    # Peers py-libp2p's peerstore keeps (addresses, key, protocols); past it those
    # without a connection or a stake go (dms.network.peerstore).
    max_peerstore_peers: int = Field(default=1000, ge=10)
    # Of those, peers heard lately through their signed heartbeats (those known the
    # longest first) that go only after every fresh key's entry, and stay when they
    # leave: a bound, so a flood of heartbeats from many keys cannot pin the store.
    max_peerstore_heard_peers: int = Field(default=500, ge=0)
    # Bytes a second of frames on actor streams, per peer and for all peers without a
    # stake together, and at once; over it a peer's streams are read more slowly.
    max_inbound_bytes_per_peer_per_s: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    inbound_byte_burst_per_peer: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    max_inbound_bytes_per_s: int = Field(default=16 * 1024 * 1024, ge=64 * 1024)
    inbound_byte_burst: int = Field(default=16 * 1024 * 1024, ge=64 * 1024)
    # New inbound streams a second, per peer and for all peers without a stake
    # together, and at once; over it a connection's next stream is taken later.
    max_new_streams_per_peer_per_s: float = Field(default=32.0, gt=0)
    new_stream_burst_per_peer: int = Field(default=64, ge=1)
    max_unknown_new_streams_per_s: float = Field(default=100.0, gt=0)
    unknown_new_stream_burst: int = Field(default=200, ge=1)
    # Gossip messages on the revocation topic (dms.network.gossip.REVOCATION_TOPIC) one
    # publishing host may have this node handle, a second and at once, besides the
    # general budget; this node's own revocations are published no faster.
    revocations_per_peer_per_s: float = Field(default=2.0, gt=0)
    revocation_burst_per_peer: int = Field(default=20, ge=1)
    gossip: GossipSettings = Field(default_factory=GossipSettings)
    # "public" / "private" skip the AutoNAT check (dms.network.reachability).
    reachability: Literal["auto", "public", "private"] = "auto"
    # DCUtR over relayed connections (specs/network.md, "Hole punching").
    hole_punching: bool = True
    relay: RelaySettings = Field(default_factory=RelaySettings)

    def aimed_connections(self) -> int:
        """The connections py-libp2p's auto-connector dials peers until the node holds."""
        _, low, high = self.connection_watermarks()
        return (low + high) // 2 if high > low else low

    def connection_watermarks(self) -> tuple[int, int, int]:
        """py-libp2p's ``ConnectionConfig`` ``min_connections``, ``low_watermark`` and
        ``high_watermark``. Its auto-connector aims midway between the watermarks, or at
        the low one when they are equal: both at ``connection_aim`` when it is set (its
        pruner, past the high one, closes only connections with no stream open, past
        their first 20 s; every dms connection carries gossipsub's streams)."""
        if self.connection_aim is None:
            return self.min_connections, self.min_connections, self.max_connections
        aim = min(self.connection_aim, self.max_connections)
        return min(self.min_connections, aim), aim, aim

    @field_validator("listen", "bootstrap")
    @classmethod
    def _multiaddrs(cls, values: list[str]) -> list[str]:
        for value in values:
            parse_multiaddr(value)
        return values

    @field_validator("bootstrap")
    @classmethod
    def _peer_addrs(cls, values: list[str]) -> list[str]:
        """A bootstrap address names the peer it reaches: one without was ignored at
        every redial (a warning every ``reconnect_interval_s``) and the node, started
        fine, never joined."""
        for value in values:
            protocols = parse_multiaddr(value).protocols()
            # '' and '/' parse, to no protocol at all (``--bootstrap "$UNSET"``)
            if not protocols or protocols[-1].name != "p2p":
                raise ValueError(no_peer_named(repr(value)))
        return values


def no_peer_named(address: str) -> str:
    """What is said of an address to dial that names no peer (``dms run --bootstrap``,
    ``dms peers connect``)."""
    return (
        f"{address} does not end in /p2p/<peer id>: give a whole line "
        "'dms peers self' prints on that node"
    )


def parse_multiaddr(text: str) -> Multiaddr:
    """A multiaddr, or a ``ValueError`` that says which text was wrong."""
    try:
        return Multiaddr(text)
    except Exception as exc:
        raise ValueError(f"not a multiaddr: {text!r} ({exc})") from None
