"""The libp2p transport: one py-libp2p host per node, on a trio thread of its own.

The host runs TCP + Noise + Yamux with the node's Ed25519 key, so the node's
DID and its peer id are one key. Actor threads cross into trio with
``trio.from_thread``; inbound frames are handed to the actor system's receiver
on the trio thread (the receiver only verifies and ``tell``s, it never blocks).

- Unicast: protocol ``/dms/actor/1.0.0``, length-prefixed frames (see
  ``dms.network.frames``), one reused outbound stream per peer.
- Broadcast: gossipsub, with a topic validator that drops bad signatures and
  expired envelopes before they propagate.
- Discovery: bootstrap addresses, known peers from the store, optional mDNS,
  and a Kademlia DHT to find a peer's addresses by its id.
- ping and identify answer as in every libp2p implementation (host defaults).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import PingService
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from dms.actor.codes import Refusal, Unreachable
from dms.actor.envelope import check_time, now_ns, unseal, verify
from dms.actor.transport import Receiver, Undeliverable
from dms.network.checked import CheckedFrames
from dms.network.frames import PREFIX, FrameError, FrameReader, encode_frame
from dms.network.outbox import Outbox
from dms.network.settings import NetworkSettings, parse_multiaddr
from dms.network.transfer import CHUNK_PROTOCOL, Offers, read_chunks, serve_chunks
from dms.network.tuning import apply_libp2p_tuning
from dms.security.identity import Identity

log = logging.getLogger("dms.network")

ACTOR_PROTOCOL = TProtocol("/dms/actor/1.0.0")
# How long addresses learnt from a heartbeat stay in the peerstore.
LEARNED_ADDR_TTL_S = 600
START_TIMEOUT_S = 30.0
# Where the hard limit is "unlimited" (macOS), a soft limit past this may be refused.
FD_LIMIT_WITHOUT_HARD_LIMIT = 10240

T = TypeVar("T")


class NetworkError(Exception):
    """The host could not start or an operation on it failed; the message says why."""


@dataclass
class _Outbound:
    """One reused stream to a peer and the frames its writer task drains.

    The writer coalesces whatever frames are queued into one stream write, so
    a burst of sends costs one Yamux frame and one Noise message, not one each.
    """

    peer_id: str
    stream: INetStream
    outbox: Outbox

    @property
    def closed(self) -> bool:
        return self.outbox.closed

    @property
    def usable(self) -> bool:
        """Open, and its connection not closed under it (the peer stopped or restarted)."""
        conn = self.stream.muxed_conn
        return not self.closed and not getattr(conn, "is_closed", False)


class _ConnectionEvents(INotifee):
    """Forget a peer's outbound stream once its last connection closes; put new
    peers (inbound ones too) in the DHT routing table."""

    def __init__(self, transport: Libp2pTransport) -> None:
        self._transport = transport

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._transport._forget_if_disconnected(conn.muxed_conn.peer_id)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._transport._on_connected(conn.muxed_conn.peer_id)

    async def listen(self, network: INetwork, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Any) -> None:
        pass


@dataclass(frozen=True)
class PeerInfoView:
    """A connected peer as the node shows it."""

    peer_id: str
    addrs: list[str]


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


class SharedLoop:
    """One trio event loop, on one thread, that several transports' hosts run in.

    A process normally runs one node, and its host has a trio thread of its own.
    A simulation runs N nodes in one process; with a thread each, every frame
    between two of them crosses threads and waits for the GIL, a cost no real
    deployment pays. ``LocalCluster`` therefore runs its hosts as tasks of one
    loop: still N hosts with their own keys, sockets, Noise and Yamux sessions.
    """

    def __init__(self, name: str = "dms-libp2p-shared") -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise NetworkError("the shared trio loop did not start")
        self.ident = self._thread.ident

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        assert self._token is not None and self._nursery is not None
        self._token.run_sync_soon(self._nursery.start_soon, fn)

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._stop.set)
        self._thread.join(10.0)


class Libp2pTransport:
    """A :class:`dms.actor.Transport` over py-libp2p, plus the peer operations a node offers."""

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
        self._outbound: dict[str, _Outbound] = {}
        self._dialing: dict[str, trio.Lock] = {}
        self._topics: dict[str, trio.CancelScope] = {}
        self._checked = CheckedFrames()  # gossip frames the topic validator verified
        self._stopped = False
        # The manifests this node serves on the chunk protocol (set by the node's courier).
        self.offers: Offers | None = None
        # Sees every inbound frame and chunk as it arrives: (peer id, bytes). For tests
        # that check what a node is sent (specs/mining.md, "What each party learns").
        self.tap: Callable[[str, bytes], None] | None = None
        self.frames_in = 0
        self.frames_refused = 0

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

    def send(self, peer_id: str, frame: bytes) -> None:
        """Queue a frame for ``peer_id`` without waiting: never blocks the calling actor.

        With no stream open yet, the stream is opened (dialing if needed, bounded
        by ``dial_timeout_s``) on the trio thread; if that fails, or a write on an
        open stream fails twice, the frame is reported through the
        ``undeliverable`` callback given to :meth:`start`, which fails a pending
        invoke at once with ``unreachable`` and the reason. Raises ``Unreachable``
        only when the network is stopped.
        """
        data = encode_frame(frame)
        outbound = self._outbound.get(peer_id)
        if self._on_trio_thread():
            # Refusals are sent from the receive path, which runs on the trio thread.
            if outbound is not None and outbound.usable:
                self._enqueue(outbound, data)
            else:
                self._send_soon(peer_id, data)
            return
        # The common case needs no trip through trio's entry queue: the writer task
        # wakes on the outbox's descriptor.
        if outbound is not None and outbound.usable and outbound.outbox.put(data):
            return
        if self._token is None or self._stopped:
            raise Unreachable("the network is stopped")
        try:
            self._token.run_sync_soon(self._start_send, peer_id, data)
        except trio.RunFinishedError:
            raise Unreachable("the network is stopped") from None

    def _start_send(self, peer_id: str, data: bytes) -> None:
        outbound = self._outbound.get(peer_id)
        if outbound is not None and outbound.usable:
            self._enqueue(outbound, data)
        else:
            self._send_soon(peer_id, data)

    def _start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Start a task of this host; False once it has stopped.

        Callbacks queued with ``run_sync_soon`` may run after this host's nursery
        closed (in a shared loop the trio token outlives it), and an exception
        there would end the whole loop, every other host in it included.
        """
        nursery = self._nursery
        if nursery is None:
            return False
        try:
            nursery.start_soon(fn, *args)
        except RuntimeError:  # "Nursery is closed to new arrivals": stopping
            return False
        return True

    def _send_soon(self, peer_id: str, data: bytes) -> None:
        if not self._start_soon(self._send_or_report, peer_id, data):
            self._report([data], "the network is stopped")

    def publish(self, topic: str, frame: bytes) -> None:
        if self._on_trio_thread():
            self._start_soon(self._publish, topic, frame)
            return
        self._call(self._publish, topic, frame)

    def subscribe(self, topic: str) -> None:
        self._call(self._subscribe, topic)

    def unsubscribe(self, topic: str) -> None:
        self._call(self._unsubscribe, topic)

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

    # ---- peer operations (any thread) -------------------------------------------

    def addrs(self) -> list[str]:
        """Full listen multiaddrs, each ending in ``/p2p/<peer id>``."""
        assert self._host is not None
        suffix = f"/p2p/{self.peer_id}"
        out = []
        for addr in self._host.get_addrs():
            text = str(addr)
            out.append(text if text.endswith(suffix) else text + suffix)
        return out

    def learn_addrs(self, peer_id: str, addrs: list[str]) -> None:
        """Remember where ``peer_id`` listens (from its signed heartbeat), so a request
        to a peer known only through gossip can dial it; never blocks. Addresses that
        name another peer, or do not parse, are ignored."""
        if self._token is None or self._stopped or peer_id == self.peer_id:
            return
        suffix = f"/p2p/{peer_id}"
        parsed = []
        for text in addrs:
            if "/p2p/" in text and not text.endswith(suffix):
                continue
            try:
                parsed.append(parse_multiaddr(text.removesuffix(suffix)))
            except ValueError:
                continue
        if parsed:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._add_addrs, peer_id, parsed)

    def _add_addrs(self, peer_id: str, addrs: list[Any]) -> None:
        # Runs as a trio callback: an exception here would end the host.
        try:
            if self._host is None:
                return
            pid = _peer(peer_id)
            if not _has_addrs(self._host, pid):
                self._host.get_peerstore().add_addrs(pid, addrs, LEARNED_ADDR_TTL_S)
        except Exception as exc:
            log.debug("addresses of %s not kept: %s", peer_id, _why(exc))

    def connect(self, multiaddr: str) -> str:
        """Dial a ``.../p2p/<peer id>`` address; return the peer id."""
        try:
            info = info_from_p2p_addr(parse_multiaddr(multiaddr))
        except ValueError as exc:
            raise NetworkError(str(exc)) from None
        except Exception:
            raise NetworkError(f"{multiaddr} has no /p2p/<peer id> part") from None
        self._call(self._connect, info)
        return info.peer_id.to_base58()

    def ping(self, peer_id: str) -> float:
        """Round trip of the standard libp2p ping, in milliseconds."""
        return self._call(self._ping_peer, peer_id)

    def peers(self) -> list[PeerInfoView]:
        return self._call(self._peers)

    def dht_peers(self) -> list[str]:
        if self._dht is None:
            return []
        return [p.to_base58() for p in self._dht.routing_table.get_peer_ids()]

    def scores(self) -> dict[str, float]:
        """gossipsub's score of each connected peer over the topics we are in."""
        return self._call(self._scores)

    def mesh_peers(self, topic: str) -> list[str]:
        """Peers in this node's gossipsub mesh for ``topic`` (full-message relays)."""
        mesh = self._router.mesh.get(topic, set()) if self._router else set()
        return sorted(p.to_base58() for p in list(mesh))

    def is_connected(self, peer_id: str) -> bool:
        return any(p.peer_id == peer_id for p in self.peers())

    # ---- bridging ------------------------------------------------------------------

    def _on_trio_thread(self) -> bool:
        return threading.get_ident() == self._thread_ident

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._token is None or self._stopped:
            raise NetworkError("the network is stopped")
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise NetworkError("the network is stopped") from None

    def _run(self) -> None:
        self._thread_ident = threading.get_ident()
        trio.run(self._run_in_loop)

    async def _run_in_loop(self) -> None:
        """``_main`` in its loop (its own, or a shared one): a failure ends this host
        only, and is kept for ``start`` to report."""
        try:
            await self._main()
        except trio.Cancelled:
            raise
        except BaseException as exc:
            log.debug("libp2p host ended", exc_info=True)
            self._error = _root_cause(exc)
        finally:
            self._ready.set()
            self._done.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        gossip = self.settings.gossip
        apply_libp2p_tuning()
        # py-libp2p reads this module constant when a subscription is made; 32 drops
        # messages silently under any burst, so it is raised for the whole process.
        pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = max(
            pubsub_module.SUBSCRIPTION_CHANNEL_SIZE, gossip.subscription_queue
        )
        key_pair = create_new_key_pair(self.identity.private_bytes())
        listen = [parse_multiaddr(a) for a in self.settings.listen]
        host = new_host(
            key_pair=key_pair,
            sec_opt={
                NOISE_PROTOCOL_ID: NoiseTransport(
                    key_pair, noise_privkey=create_x25519_key_pair().private_key
                )
            },
            muxer_opt=create_yamux_muxer_option(),
            listen_addrs=listen,
            enable_mDNS=self.settings.mdns,
            connection_config=ConnectionConfig(
                min_connections=self.settings.min_connections,
                low_watermark=self.settings.min_connections,
                high_watermark=self.settings.max_connections,
                max_connections=self.settings.max_connections,
            ),
        )
        self._host = host
        self._ping = PingService(host)
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
        self._pubsub = pubsub
        self._router = router
        async with host.run(listen_addrs=listen):
            host.set_stream_handler(ACTOR_PROTOCOL, self._on_stream)
            host.set_stream_handler(CHUNK_PROTOCOL, self._on_chunk_stream)
            host.get_network().register_notifee(_ConnectionEvents(self))
            async with (
                background_trio_service(pubsub),
                background_trio_service(router),
                self._maybe_dht(host),
            ):
                await pubsub.wait_until_ready()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._keep_connected)
                    self._ready.set()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
                for outbound in list(self._outbound.values()):
                    self._close(outbound)
                    with contextlib.suppress(Exception):
                        await outbound.stream.close()
            # Close every connection now, so peers see this node leave at once.
            with contextlib.suppress(Exception), trio.move_on_after(5):
                await host.close()
                self._outbound.clear()

    @contextlib.asynccontextmanager
    async def _maybe_dht(self, host: IHost) -> AsyncIterator[None]:
        if not self.settings.dht:
            yield
            return
        dht = KadDHT(host, DHTMode.SERVER)
        self._dht = dht
        async with background_trio_service(dht):
            yield

    # ---- unicast -------------------------------------------------------------------

    async def _on_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        reader = FrameReader(stream, self.settings.max_frame_bytes)
        try:
            while True:
                frame = await reader.next()
                self.frames_in += 1
                self._deliver(frame, peer)
        except FrameError as err:
            self.frames_refused += 1
            log.warning("dropped stream from %s: %s", peer, err)
            with contextlib.suppress(Exception):
                await stream.reset()
        except EOFError:
            with contextlib.suppress(Exception):
                await stream.close()
        except Exception as exc:  # a reset or a closed connection ends the stream
            log.debug("stream from %s ended: %s", peer, exc)

    # ---- bulk transfer (dms.network.transfer) ----------------------------------------

    async def _on_chunk_stream(self, stream: INetStream) -> None:
        if self.offers is None:
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        await serve_chunks(stream, self.offers)

    def fetch_chunks(
        self, peer_id: str, manifest_id: str, hashes: list[str], max_chunk_bytes: int
    ) -> list[tuple[str, bytes]]:
        """Pull chunks of a manifest from ``peer_id`` on a stream of their own (blocking;
        not from an actor's mailbox). Returns what arrived, in order, possibly fewer."""
        return self._call(self._fetch_chunks, peer_id, manifest_id, hashes, max_chunk_bytes)

    async def _fetch_chunks(
        self, peer_id: str, manifest_id: str, hashes: list[str], max_chunk_bytes: int
    ) -> list[tuple[str, bytes]]:
        pid = _peer(peer_id)
        assert self._host is not None
        try:
            with trio.fail_after(self.settings.dial_timeout_s):
                await self._ensure_connected(pid)
                stream = await self._host.new_stream(pid, [CHUNK_PROTOCOL])
        except trio.TooSlowError:
            raise NetworkError(f"peer {peer_id} is unreachable for chunks") from None
        except NetworkError:
            raise
        except Exception as exc:
            raise NetworkError(f"peer {peer_id} is unreachable: {_why(exc)}") from None
        try:
            arrived = await read_chunks(stream, manifest_id, hashes, max_chunk_bytes)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()
        if self.tap is not None:
            for _, data in arrived:
                self.tap(peer_id, data)
        return arrived

    def _deliver(self, frame: bytes, peer: str | None, *, signature_checked: bool = False) -> None:
        assert self._receiver is not None
        if self.tap is not None:
            self.tap(peer or "", frame)
        try:
            self._receiver(frame, peer, signature_checked=signature_checked)
        except Exception:
            log.exception("receiver failed on a frame from %s", peer)

    def _on_connected(self, pid: ID) -> None:
        if self._dht is not None:
            # A connection can complete while the host shuts down (nursery closed).
            self._start_soon(self._add_to_dht, pid)

    async def _add_to_dht(self, pid: ID) -> None:
        await trio.sleep(0.5)  # after identify, so the peer's listen addresses are known
        if self._dht is not None:
            with contextlib.suppress(Exception):
                await self._dht.add_peer(pid, skip_server_mode_check=True)

    def _forget_if_disconnected(self, pid: ID) -> None:
        outbound = self._outbound.get(pid.to_base58())
        if outbound is None or self._host is None:
            return
        if not self._host.get_network().get_connections(pid):
            self._close(outbound)

    def _enqueue(self, outbound: _Outbound, data: bytes) -> None:
        if not outbound.usable:
            if not outbound.closed:
                self._close(outbound)
            self._send_soon(outbound.peer_id, data)
        elif not outbound.outbox.put(data):
            self._send_soon(outbound.peer_id, data)

    async def _send(self, peer_id: str, data: bytes) -> None:
        outbound = await self._outbound_to(peer_id)
        self._enqueue(outbound, data)

    async def _send_or_report(self, peer_id: str, data: bytes) -> None:
        try:
            await self._send(peer_id, data)
        except NetworkError as err:
            self._report([data], str(err))

    def _report(self, batch: list[bytes], reason: str) -> None:
        log.info("%d frame(s) undeliverable: %s", len(batch), reason)
        if self._undeliverable is None:
            return
        for data in batch:
            try:
                self._undeliverable(data[PREFIX.size :], reason)
            except Exception:
                log.exception("undeliverable callback failed")

    async def _outbound_to(self, peer_id: str) -> _Outbound:
        outbound = self._outbound.get(peer_id)
        if outbound is not None and outbound.usable:
            return outbound
        lock = self._dialing.setdefault(peer_id, trio.Lock())
        try:
            async with lock:
                outbound = self._outbound.get(peer_id)
                if outbound is not None and outbound.usable:
                    return outbound
                if outbound is not None:
                    self._close(outbound)
                pid = _peer(peer_id)
                assert self._host is not None and self._nursery is not None
                try:
                    with trio.fail_after(self.settings.dial_timeout_s):
                        await self._ensure_connected(pid)
                        stream = await self._host.new_stream(pid, [ACTOR_PROTOCOL])
                except trio.TooSlowError:
                    raise NetworkError(
                        f"peer {peer_id} is unreachable: no connection within "
                        f"{self.settings.dial_timeout_s:g} s"
                    ) from None
                except NetworkError:
                    raise
                except Exception as exc:
                    raise NetworkError(f"peer {peer_id} is unreachable: {_why(exc)}") from None
                outbound = _Outbound(peer_id, stream, Outbox())
                self._outbound[peer_id] = outbound
                self._nursery.start_soon(self._write_loop, outbound)
                return outbound
        finally:
            # One lock per peer being dialed, not per peer id ever seen (users type ids).
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._dialing.pop(peer_id, None)

    async def _write_loop(self, outbound: _Outbound) -> None:
        try:
            while batch := await outbound.outbox.take():
                try:
                    await outbound.stream.write(b"".join(batch))
                except Exception as exc:
                    # The peer restarted or the connection dropped: retry once on a fresh
                    # stream.
                    self._close(outbound)
                    batch += outbound.outbox.take_nowait()
                    log.info("stream to %s broke (%s); redialing", outbound.peer_id, _why(exc))
                    try:
                        fresh = await self._outbound_to(outbound.peer_id)
                    except NetworkError as err:
                        self._report(batch, str(err))
                        return
                    for item in batch:
                        self._enqueue(fresh, item)
                    return
        finally:
            outbound.outbox.release()

    def _close(self, outbound: _Outbound) -> None:
        outbound.outbox.close()
        if self._outbound.get(outbound.peer_id) is outbound:
            del self._outbound[outbound.peer_id]

    async def _ensure_connected(self, pid: ID) -> None:
        assert self._host is not None
        if self._host.get_network().get_connections(pid):
            return
        addrs = self._host.get_peerstore().addrs(pid) if _has_addrs(self._host, pid) else []
        if not addrs and self._dht is not None:
            found = await self._dht.find_peer(pid)
            addrs = list(found.addrs) if found is not None else []
        if not addrs:
            raise NetworkError(f"peer {pid.to_base58()} is unreachable: no known address")
        await self._host.connect(PeerInfo(pid, addrs))

    # ---- gossip --------------------------------------------------------------------

    async def _publish(self, topic: str, frame: bytes) -> None:
        assert self._pubsub is not None
        try:
            await self._pubsub.publish(topic, frame)
        except Exception as exc:
            log.warning("publish on %s failed: %s", topic, _why(exc))

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

    # ---- discovery -----------------------------------------------------------------

    async def _connect(self, info: PeerInfo) -> None:
        assert self._host is not None
        try:
            with trio.fail_after(self.settings.dial_timeout_s):
                await self._host.connect(info)
        except trio.TooSlowError:
            raise NetworkError(
                f"no connection to {info.peer_id} within {self.settings.dial_timeout_s:g} s"
            ) from None
        except Exception as exc:
            raise NetworkError(f"cannot connect to {info.peer_id}: {_why(exc)}") from None
        if self._dht is not None:
            with contextlib.suppress(Exception):
                await self._dht.add_peer(info.peer_id, skip_server_mode_check=True)

    async def _keep_connected(self) -> None:
        """Dial bootstrap and remembered peers now, and again whenever they drop."""
        while True:
            targets = []
            for text in [*self.settings.bootstrap, *self._known_addrs]:
                try:
                    info = info_from_p2p_addr(parse_multiaddr(text))
                except Exception:
                    log.warning("ignoring peer address without /p2p/: %s", text)
                    continue
                if info.peer_id.to_base58() == self.peer_id:
                    continue
                assert self._host is not None
                if not self._host.get_network().get_connections(info.peer_id):
                    targets.append(info)
            async with trio.open_nursery() as nursery:
                for info in targets:
                    nursery.start_soon(self._connect_quietly, info)
            await trio.sleep(self.settings.reconnect_interval_s)

    async def _connect_quietly(self, info: PeerInfo) -> None:
        try:
            await self._connect(info)
        except NetworkError as err:
            log.info("%s", err)

    async def _ping_peer(self, peer_id: str) -> float:
        pid = _peer(peer_id)
        assert self._ping is not None
        try:
            with trio.fail_after(self.settings.dial_timeout_s):
                await self._ensure_connected(pid)
                start = time.perf_counter()
                await self._ping.ping(pid, 1)
                return (time.perf_counter() - start) * 1000.0
        except trio.TooSlowError:
            raise NetworkError(
                f"peer {peer_id} did not answer ping within {self.settings.dial_timeout_s:g} s"
            ) from None
        except NetworkError:
            raise
        except Exception as exc:
            raise NetworkError(f"ping to {peer_id} failed: {_why(exc)}") from None

    async def _scores(self) -> dict[str, float]:
        assert self._host is not None
        router = self._router
        topics = list(self._topics)
        out = {}
        for pid in self._host.get_network().get_connections_map():
            scorer = getattr(router, "scorer", None)
            out[pid.to_base58()] = float(scorer.score(pid, topics)) if scorer else 0.0
        return out

    async def _peers(self) -> list[PeerInfoView]:
        assert self._host is not None
        network = self._host.get_network()
        out = []
        for pid, conns in network.get_connections_map().items():
            if not conns:
                continue
            addrs = self._host.get_peerstore().addrs(pid) if _has_addrs(self._host, pid) else []
            out.append(PeerInfoView(pid.to_base58(), [str(a) for a in addrs]))
        return sorted(out, key=lambda p: p.peer_id)


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


def _peer(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception:
        raise NetworkError(f"{peer_id!r} is not a peer id") from None


def _has_addrs(host: IHost, pid: ID) -> bool:
    try:
        return bool(host.get_peerstore().addrs(pid))
    except Exception:
        return False


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
