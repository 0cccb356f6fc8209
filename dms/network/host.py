"""The libp2p transport: one py-libp2p host per node, on a trio thread of its own.

The host runs TCP + Noise + Yamux with the node's Ed25519 key, so the node's
DID and its peer id are one key. This module builds and runs the host; each of
its other ideas has a module of its own:

- ``dms.network.loop``: the trio loop it runs in (its own thread, or a
  ``SharedLoop``) and how actor threads cross into it.
- ``dms.network.unicast``: protocol ``/dms/actor/1.0.0``, length-prefixed
  frames, one reused outbound stream per peer; chunk streams.
- ``dms.network.gossip``: gossipsub topics, with a validator that drops bad
  signatures and expired envelopes before they propagate.
- ``dms.network.discovery``: bootstrap addresses, known peers from the store,
  optional mDNS, a Kademlia DHT to find a peer's addresses by its id, ping.

ping and identify answer as in every libp2p implementation (host defaults).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.host.ping import PingService
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from dms.actor.ratelimit import PeerRates
from dms.actor.transport import Receiver, Undeliverable
from dms.network import dialslots
from dms.network.admission import NotDialed
from dms.network.budgets import Budget, Stake
from dms.network.checked import CheckedFrames
from dms.network.closing import close_host
from dms.network.discovery import LEARNED_ADDR_TTL_S, PeerInfoView
from dms.network.gossip import Gossip, Pacer, envelope_is_valid, new_pubsub, topic_budgets
from dms.network.idlewatch import IdleWatch
from dms.network.inboundgate import InboundGate
from dms.network.interfaces import advertised
from dms.network.libp2p_patches import BUFFERS, apply_libp2p_patches, set_buffer_budget
from dms.network.libp2p_patches import quic as quic_patches
from dms.network.loop import START_TIMEOUT_S, NetworkError, SharedLoop, root_cause, run_loop
from dms.network.outbound import ACTOR_PROTOCOL, _Outbound, _Waiting
from dms.network.outboundbudget import OutboundBudget
from dms.network.paced import ByteBudget, StreamOpens
from dms.network.peerstore import CLEANUP_S as PEERSTORE_CLEANUP_S
from dms.network.peerstore import BoundedPeerStore
from dms.network.protocolstreams import ProtocolStreams
from dms.network.reachability import DialBack, Reachability
from dms.network.relay import (
    HOP_PROTOCOL,
    BudgetedRelay,
    Circuits,
    RelayClient,
    is_relayed,
    relayed_conn,
)
from dms.network.settings import NetworkSettings, parse_multiaddr
from dms.network.streambudget import StreamBudget
from dms.network.transfer import CHUNK_PROTOCOL, Offers, TransferBudget
from dms.network.unicast import Unicast
from dms.security.identity import Identity

__all__ = [
    "ACTOR_PROTOCOL",
    "LEARNED_ADDR_TTL_S",
    "Libp2pTransport",
    "NetworkError",
    "PeerInfoView",
    "SharedLoop",
    "envelope_is_valid",
    "raise_open_file_limit",
]

log = logging.getLogger("dms.network")

# Where the hard limit is "unlimited" (macOS), a soft limit past this may be refused.
FD_LIMIT_WITHOUT_HARD_LIMIT = 10240
# A peer that dials again: its older direct connection is closed this long after the
# new one is up (dms.network.host, Libp2pTransport._supersede).
SUPERSEDE_AFTER_S = 1.0
SUPERSEDE_CLOSE_S = 5.0


class _ConnectionEvents(INotifee):
    """Forget a peer's outbound stream once its last connection closes, and end the
    relay reservation made on a connection that closed; put new peers (inbound ones
    too) in the DHT routing table."""

    def __init__(self, transport: Libp2pTransport) -> None:
        self._transport = transport

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._transport._forget_if_disconnected(conn.muxed_conn.peer_id)
        self._transport._departed(conn.muxed_conn.peer_id)
        self._transport._relay_connection_closed(conn)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._transport._supersede(network, conn)
        self._transport._on_connected(conn.muxed_conn.peer_id)

    async def listen(self, network: INetwork, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Any) -> None:
        pass


class Libp2pTransport(Unicast, Gossip):
    """A :class:`dms.actor.Transport` over py-libp2p, plus the peer operations a node offers.

    Its parts: :class:`~dms.network.unicast.Unicast` (over
    :class:`~dms.network.outbound.Sending` and :class:`~dms.network.discovery.Discovery`)
    and :class:`~dms.network.gossip.Gossip`, over :class:`~dms.network.loop.LoopBridge`;
    this class owns the host's life.
    """

    def __init__(
        self,
        identity: Identity,
        settings: NetworkSettings | None = None,
        *,
        known_addrs: list[str] | None = None,
        max_ttl_s: float = 3600.0,
        clock_skew_s: float = 60.0,
        loop: SharedLoop | None = None,
    ) -> None:
        self.identity = identity
        self.settings = settings or NetworkSettings()
        self._known_addrs = list(known_addrs or [])
        self._dialed_at_start = {
            text.rsplit("/p2p/", 1)[1]
            for text in [*self.settings.bootstrap, *self._known_addrs]
            if "/p2p/" in text
        }
        self._max_ttl_s = max_ttl_s
        self._clock_skew_s = clock_skew_s
        self._receiver: Receiver | None = None
        self._undeliverable: Undeliverable | None = None
        self._loop = loop
        self._thread: threading.Thread | None = None
        self._thread_ident: int | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._host: IHost | None = None
        self._pubsub: Pubsub | None = None
        self._router: GossipSub | None = None
        self._dht: KadDHT | None = None
        self._ping: PingService | None = None
        self._relay: BudgetedRelay | None = None
        self._relays: RelayClient | None = None
        self._dialback: DialBack | None = None
        self._outbound: dict[str, _Outbound] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._queued: dict[str, int] = {}
        self._queued_lock = threading.Lock()
        self._waiting_bytes = 0
        self._topics: dict[str, trio.CancelScope] = {}
        self._pacers: dict[str, Pacer] = {}  # this node's own gossip on budgeted topics
        self._checked = CheckedFrames()  # gossip frames the topic validator verified
        self._stopped = False
        # The manifests this node serves on the chunk protocol (set by the node's courier).
        self.offers: Offers | None = None
        # Sees every inbound frame and chunk as it arrives: (peer id, bytes). For tests
        # that check what a node is sent (specs/mining.md, "What each party learns").
        self.tap: Callable[[str, bytes], None] | None = None
        self.frames_in = 0
        self.frames_refused = 0
        # What this transport refused before the actor system saw it, by code.
        self.refusals: Counter[str] = Counter()
        self._rates = PeerRates(
            self.settings.max_frames_per_s,
            self.settings.frame_burst,
            shared_rate=self.settings.max_unknown_frames_per_s,
            shared_burst=self.settings.unknown_frame_burst,
            flood_rate=self.settings.flooder_frames_per_s,
            flood_cooldown_s=self.settings.flooder_cooldown_s,
        )
        # Budgets of what remote parties can make this host hold (dms.network.budgets).
        # ``stake(peer id)``: the node has a stake in that peer (set by the node); such
        # peers, and those this host dials at start, keep their connection slots.
        self.stake: Stake | None = None
        # ``heard()``: peers heard lately through their signed heartbeats, those known
        # the longest first (set by the node: ``PeerTable.heard``); the peerstore keeps
        # their addresses ahead of fresh keys' and does not forget them when they leave.
        self.heard: Callable[[], list[str]] | None = None
        s = self.settings
        self._gate: InboundGate | None = None
        self._peerstore: BoundedPeerStore | None = None
        self._streams = StreamBudget(s, self.refusals, self._has_stake)
        self._idle = IdleWatch(s.stream_idle_s, self.refusals)
        self._protocols = ProtocolStreams(
            s,
            self.refusals,
            IdleWatch(s.protocol_idle_s, self.refusals, what="byte"),
            self._has_stake,
        )
        self._bytes = ByteBudget(s, self.refusals, self._has_stake)
        self._opens = StreamOpens(s, self.refusals, self._has_stake)
        self._dials = OutboundBudget(s, self.refusals, self._has_stake, self._rates.last_active)
        self._transfers = TransferBudget(
            max_per_peer=s.max_transfers_per_peer,
            max_total=s.max_transfers,
            idle_s=s.chunk_idle_s,
            min_bytes_per_s=s.chunk_min_bytes_per_s,
            refusals=self.refusals,
        )

    # ---- Transport ---------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def start(self, receiver: Receiver, undeliverable: Undeliverable | None = None) -> None:
        """Start the host and return once it listens; ``NetworkError`` if it cannot."""
        self._receiver = receiver
        self._undeliverable = undeliverable
        raise_open_file_limit()
        if self._loop is not None:
            self._thread_ident = self._loop.ident
            self._loop.spawn(self._run_in_loop)
        else:
            self._thread = threading.Thread(
                target=self._run, name=f"dms-libp2p-{self.peer_id[-6:]}", daemon=True
            )
            self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise NetworkError("the libp2p host did not start within 30 s")
        if self._error is not None:
            raise NetworkError(f"the libp2p host could not start: {self._error}") from None

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._stop.set)
        if self._thread is not None:
            self._thread.join(10.0)
        elif self._loop is not None:
            self._done.wait(10.0)

    # ---- the host's life ------------------------------------------------------------

    def _run(self) -> None:
        self._thread_ident = threading.get_ident()
        run_loop(self._run_in_loop)

    async def _run_in_loop(self) -> None:
        """``_main`` in its loop (its own, or a shared one): a failure ends this host
        only, and is kept for ``start`` to report."""
        try:
            await self._main()
        except trio.Cancelled:
            raise
        except BaseException as exc:
            log.debug("libp2p host ended", exc_info=True)
            self._error = root_cause(exc)
        finally:
            self._ready.set()
            self._done.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        apply_libp2p_patches()
        key_pair = create_new_key_pair(self.identity.private_bytes())
        listen = [parse_multiaddr(a) for a in self.settings.listen]
        peerstore = BoundedPeerStore(
            max_peers=self.settings.max_peerstore_peers,
            max_heard=self.settings.max_peerstore_heard_peers,
        )
        peerstore.local = ID.from_pubkey(key_pair.public_key)
        peerstore.heard = lambda: self.heard() if self.heard is not None else []
        self._peerstore = peerstore
        floor, low, high = self.settings.connection_watermarks()  # its aim: between low, high
        host = new_host(
            key_pair=key_pair,
            peerstore_opt=peerstore,
            sec_opt={
                NOISE_PROTOCOL_ID: NoiseTransport(
                    key_pair, noise_privkey=create_x25519_key_pair().private_key
                )
            },
            muxer_opt=create_yamux_muxer_option(),
            listen_addrs=listen,
            # A wildcard listen address advertised as this host's interface addresses
            # (identify, the signed peer record, heartbeats): bound, 0.0.0.0 reached
            # whoever dialed it, never this node.
            addrs_factory=advertised,
            enable_mDNS=self.settings.mdns,
            connection_config=ConnectionConfig(
                min_connections=floor,
                low_watermark=low,
                high_watermark=high,
                # Inbound connections are admitted by the gate below (its budgets, with
                # eviction): py-libp2p's own check of the total must not refuse first.
                max_connections=self.settings.max_connections + self.settings.max_handshakes,
                inbound_upgrade_timeout=self.settings.handshake_timeout_s,
                inbound_stream_protocol_negotiation_timeout=self.settings.handshake_timeout_s,
            ),
        )
        self._host = host
        s = self.settings
        swarm = host.get_network()
        quic_patches.streams_wait_as_over_yamux(swarm)
        peerstore.keep = lambda pid: (
            bool(swarm.get_connections(pid)) or self._has_stake(pid.to_base58())
        )
        self._gate = InboundGate(
            swarm, self.settings, self.refusals, self._has_stake, self._rates.last_active
        )
        self._gate.install()
        self._streams.install(swarm)
        # Before the connection starts: paced from ``connected`` on, its first stream or
        # two were taken unpaced (StreamOpens.install).
        self._opens.install(swarm)
        # Inside the outbound budget: a dial it refuses (this node's own limit, no
        # failure of the peer) forgets nothing.
        self._forget_when_unreached(swarm)
        self._dials.install(swarm)
        # Dial slots go first to peers the node has a stake in (and those reached before).
        dialslots.configure(
            swarm,
            lambda pid: self._has_stake(pid.to_base58()),
            self.refusals,
            s.max_new_dials_per_s,
            s.new_dial_burst,
        )
        set_buffer_budget(self.settings.max_buffered_bytes, swarm, self._window_exceeded)
        self._ping = PingService(host)
        pubsub, router = new_pubsub(
            host,
            self.settings.gossip,
            self._gossip_refused,
            topic_budgets(self.settings),
            flooder_cooldown_s=self.settings.flooder_cooldown_s,
            stake=self._has_stake,
        )
        self._pubsub = pubsub
        self._router = router
        self._relay = BudgetedRelay(
            host,
            s.relay,
            self.refusals,
            self.serves_relay,
            Circuits(),
            self._gate.hold,
            lambda relay: self._relays is not None and self._relays.holds(relay),
        )
        self._relays = RelayClient(
            host, self._relay, s.relay, lambda pid: self._dials.slot(swarm, pid)
        )
        self._dialback = DialBack(host, s.reachability)
        async with (
            host.run(listen_addrs=listen),
            background_trio_service(self._relay),
            self._maybe_hole_punching(host),
        ):
            host.set_stream_handler(ACTOR_PROTOCOL, self._on_stream)
            host.set_stream_handler(CHUNK_PROTOCOL, self._on_chunk_stream)
            host.get_network().register_notifee(_ConnectionEvents(self))
            async with (
                background_trio_service(pubsub),
                background_trio_service(router),
                self._maybe_dht(host),
            ):
                await pubsub.wait_until_ready()
                # Every protocol is served now: py-libp2p's own come under the budgets.
                self._protocols.install(
                    host, {ACTOR_PROTOCOL, CHUNK_PROTOCOL, HOP_PROTOCOL, STOP_PROTOCOL_ID}
                )
                # Its writers' sends held by a peer are cut a grace into the stop.
                async with trio.open_nursery() as stopping:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        nursery.start_soon(self._keep_connected)
                        # Entries whose addresses expired go (py-libp2p never starts it).
                        nursery.start_soon(peerstore.start_cleanup_task, PEERSTORE_CLEANUP_S)
                        nursery.start_soon(self._idle.run)
                        nursery.start_soon(self._protocols.idle.run)
                        nursery.start_soon(self._dialback.run, lambda: list(swarm.connections))
                        nursery.start_soon(
                            self._relays.keep_reservations,
                            lambda: self.reachability() is Reachability.PRIVATE,
                        )
                        self._ready.set()
                        await self._stop.wait()
                        stopping.start_soon(
                            self._cut_held,
                            list(self._outbound.values()),
                            lambda outbound: outbound.writing,
                        )
                        nursery.cancel_scope.cancel()
                    stopping.cancel_scope.cancel()
                await self._close_streams()
            # Close every connection now, so peers see this node leave at once.
            await close_host(host)
            self._outbound.clear()

    @contextlib.asynccontextmanager
    async def _maybe_hole_punching(self, host: IHost) -> AsyncIterator[None]:
        """DCUtR over relayed connections, unless ``hole_punching`` is off."""
        if not self.settings.hole_punching:
            yield
            return
        async with background_trio_service(DCUtRProtocol(host)):
            yield

    # ---- reachability and relays (dms.network.reachability, dms.network.relay) ------

    def _relay_connection_closed(self, conn: INetConn) -> None:
        if self._relay is not None:
            self._relay.connection_closed(conn)

    def _supersede(self, network: INetwork, conn: INetConn) -> None:
        """A peer that dials this node again while it holds a direct connection from
        that peer: the older one is closed. A peer redials when its own side of the old
        connection died, as behind a NAT that dropped its mapping (the router's new
        mapping takes another port); this side would otherwise keep the dead connection
        until TCP gives up (many minutes) and, as it holds more streams, py-libp2p
        would open new streams on it. A simultaneous dial gives each side one inbound
        and one outbound connection: neither is closed."""
        if not conn.muxed_conn.is_initiator:
            self._start_soon(self._close_older, network, conn)

    async def _close_older(self, network: INetwork, conn: INetConn) -> None:
        # A relayed connection is tagged as one after its upgrade (after this event).
        await trio.sleep(SUPERSEDE_AFTER_S)
        if conn.is_closed or relayed_conn(conn):
            return
        pid = conn.muxed_conn.peer_id
        for other in list(network.get_connections(pid)):
            if other is conn or other.muxed_conn.is_initiator or relayed_conn(other):
                continue
            log.info("peer %s dialed again: its older connection is closed", pid)
            # Its socket first: closing Yamux alone writes a GO_AWAY to a dead peer,
            # which waits as long as TCP does, and the connection stays listed (and
            # chosen) meanwhile. With the socket shut, every read and write on it ends
            # at once and its streams are reset here.
            with contextlib.suppress(Exception), trio.move_on_after(SUPERSEDE_CLOSE_S):
                await other.muxed_conn.secured_conn.close()  # type: ignore[attr-defined]
            with contextlib.suppress(Exception), trio.move_on_after(SUPERSEDE_CLOSE_S):
                await other.close()

    def reachability(self) -> Reachability:
        return Reachability.UNKNOWN if self._dialback is None else self._dialback.reachability

    def serves_relay(self) -> bool:
        """Relays for others: ``relay.serve``, or when publicly reachable."""
        serve = self.settings.relay.serve
        return self.reachability() is Reachability.PUBLIC if serve is None else serve

    def addrs(self) -> list[str]:
        """Where others should dial this node: its listen addresses and its relayed
        addresses (while it holds reservations), those that work first."""
        relayed = self._relays.addrs(self.peer_id) if self._relays is not None else []
        if self.reachability() is Reachability.PRIVATE:
            return [*relayed, *super().addrs()]
        return [*super().addrs(), *relayed]

    def path_to(self, peer_id: str) -> str:
        """How this node reaches ``peer_id`` now: "direct", "relayed" (only through a
        circuit relay) or "none" (no connection)."""
        if self._host is None:
            return "none"
        try:
            conns = list(self._host.get_network().get_connections(ID.from_base58(peer_id)))
        except Exception:
            return "none"
        if not conns:
            return "none"
        for conn in conns:
            addrs = [str(a) for a in conn.get_transport_addresses()]
            if not any(is_relayed(a) for a in addrs):
                return "direct"
        return "relayed"

    def relay_room(self, peer_id: str) -> tuple[int, int] | None:
        """When this node reaches ``peer_id`` only through a relay that limits the bytes
        of a circuit: (that limit, the bytes the circuit may still carry); else None."""
        if self._relays is None or self.path_to(peer_id) != "relayed":
            return None
        return self._relays.room(ID.from_base58(peer_id))

    def relay_usage(self) -> dict[str, tuple[int, int]]:
        return self._relay.usage() if self._relay is not None else {}

    # ---- budgets -------------------------------------------------------------------

    def _has_stake(self, peer_id: str) -> bool:
        """A peer this node dials at start (bootstrap, remembered), a relay it holds
        (or renews) a reservation on, or one the node says it has a stake in
        (``stake``): it keeps its connection slot and its addresses."""
        if peer_id in self._dialed_at_start:
            return True
        if self._relays is not None and self._relays.keeps(peer_id):
            return True
        return self.stake is not None and self.stake(peer_id)

    def unheard(self, peer_id: str) -> None:
        """The node no longer hears ``peer_id`` (past its heartbeat deadline, or it
        left): it is as a fresh key, and its entry goes as :meth:`_departed` says,
        unless a connection or a stake keeps it. Its last connection may have closed
        while it was still heard (a node that crashed is heard until its deadline), and
        nothing forgot it then: py-libp2p's auto-connector dialed it for identify's 2 h.
        Never blocks."""
        if self._token is None or self._stopped or peer_id == self.peer_id:
            return
        try:
            pid = ID.from_base58(peer_id)
        except Exception:  # not a peer id: nothing of it is kept
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._departed, pid)

    def _forget_when_unreached(self, swarm: Any) -> None:
        """A dial of the swarm that fails forgets the peer as :meth:`_departed` does
        (unless a connection, a stake, a dial at start or a heartbeat heard lately keeps
        it). Addresses of keys this node never met come with a DHT answer (kept 1 h) or
        gossipsub's peer exchange (2 h), and nothing forgot them: py-libp2p's
        auto-connector dialed each again and again until they expired (5 dials a key in
        70 s, a failed dial and an ERROR line each). Now one dial; a DHT answer that
        names the key again brings it back. Installed under the outbound budget: a dial
        that budget refuses never reached the peer, and forgets nothing."""
        dial: Callable[[ID], Any] = swarm.dial_peer

        async def dial_or_forget(peer_id: ID) -> Any:
            try:
                return await dial(peer_id)
            except NotDialed:  # this node's own dial budget: the peer was not tried
                raise
            except BaseException:  # failed, refused, or cut short by its deadline
                self._departed(peer_id)
                raise

        swarm.dial_peer = dial_or_forget

    def _departed(self, pid: ID) -> None:
        """A peer's last connection closed, or the node stopped hearing it: unless it
        is connected, the node has a stake in it, dials it at start or hears it lately,
        its peerstore entry and its place in the DHT's routing table go, so nothing
        dials it again (py-libp2p's auto-connector dials every peer it has addresses
        of). Runs on the trio thread (a notifee, or a callback: nothing may raise)."""
        try:
            if self._peerstore is None or not self._peerstore.forget(pid):  # kept
                return
        except Exception:
            log.warning("the peerstore entry of %s not forgotten", pid, exc_info=True)
            return
        if self._dht is not None:
            with contextlib.suppress(Exception):
                self._dht.routing_table.remove_peer(pid)
        log.debug("peer %s left, unknown to this node: its addresses are forgotten", pid)

    def _window_exceeded(self, peer_id: str, reason: str) -> None:
        self.refusals[Budget.WINDOW_EXCEEDED] += 1

    def budget_usage(self) -> dict[str, tuple[int, int]]:
        """Each network budget's (used, limit), for ``/metrics``."""
        s = self.settings
        usage = {
            **(self._gate.usage() if self._gate is not None else {}),
            **self._streams.usage(),
            **self._protocols.usage(),
            **self._bytes.usage(),
            **self._opens.usage(),
            **(self._dials.usage(self._host.get_network()) if self._host is not None else {}),
            **(
                dialslots.slots_for(self._host.get_network()).usage()
                if self._host is not None
                else {}
            ),
            "idle_watched_streams": (len(self._idle), s.max_streams),
            "buffered_bytes": (BUFFERS.held, BUFFERS.limit),
            "peerstore_peers": (
                self._peerstore.size() if self._peerstore is not None else 0,
                s.max_peerstore_peers,
            ),
            "transfers": (self._transfers.serving, s.max_transfers),
            "transfers_per_peer": (
                max(self._transfers.by_peer.values(), default=0),
                s.max_transfers_per_peer,
            ),
            **self.relay_usage(),
        }
        return usage


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard limit (no-op where there is none).

    Each connection holds a socket and each outbound stream a wake-up descriptor
    (``Outbox``), so a node near ``max_connections``, or a simulation of many nodes
    in one process, needs more than 1024, a common soft default.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, FD_LIMIT_WITHOUT_HARD_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
