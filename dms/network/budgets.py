"""What a remote party can make this host hold, bounded per peer and in total.

Identities, connections and streams cost an attacker nothing (DESIGN.md decision
12), so each budget here is global as well as per peer (or per IP), has a
setting (``NetworkSettings``), a refusal reason counted in the transport's
``refusals`` (``dms_refusals{layer="network"}``) and logged, and a gauge of its
use (:meth:`InboundGate.usage`, :meth:`StreamBudget.usage`). The priority when a
budget is full is written in specs/security.md, "Budgets and priority":

- **Connections** (:class:`InboundGate`, in place of py-libp2p's inbound limiter,
  which kept each inbound slot until the host stopped, so 250 connections over
  a node's life, however short, locked every newcomer out; connections that
  arrive through a relay too, under the relay's IP). Raw sockets still in
  their handshake are bounded per IP and in total and have a deadline; the
  oldest handshake goes first when full. Established inbound connections are
  bounded in total, per IP and per /24 (IPv6: /64) subnet; when one of these is
  full, the unknown peer idle the longest in that scope is evicted for the
  newcomer, and a peer the node has a stake in (``stake``) is never evicted.
- **Streams** (:class:`StreamBudget`): inbound streams open at once, per peer and
  in total; one over its peer's cap is reset at once; with the total full, the
  unstaked peer holding the most loses its oldest stream to the newcomer.
- **Idle streams** (:class:`IdleWatch`): an inbound stream with no frame for
  ``stream_idle_s`` is reset.
- **py-libp2p's own protocols** (:class:`ProtocolStreams`: identify, ping, the
  DHT, DCUtR, ...): the same stream budgets, plus at most
  ``max_protocol_streams_per_peer`` streams of one protocol from one peer, and a
  stream with no byte either way for ``protocol_idle_s`` is reset. Their handlers
  set no deadline of their own on every wait (the DHT's reads none at all, and its
  12 handler slots, for all peers, were held for ever by idle streams).
- **Outbound connections** (:class:`OutboundBudget`): connections this host
  dials, in all (py-libp2p bounded them only by its pruner, past its high
  watermark): a remote party makes a node dial by asking for an answer it must
  send elsewhere (a bid for a gossip request). A dial for a peer without a stake
  is refused when full; one for a staked peer closes the unknown outbound
  connection idle the longest first.
- **Bytes read** (:class:`ByteBudget`): the bytes of frames a peer sends on its
  actor streams, a second, per peer and for all peers without a stake together.
  A peer over either is read more slowly (its streams pause, so Yamux grants it
  no window and it cannot send more), not refused: no frame is lost, and the
  node's work on one peer's bytes, which cross Noise and Yamux whatever they
  hold, is bounded.
- **Stream openings** (:class:`StreamOpens`): new inbound streams a second, per
  peer and for all peers without a stake together, paced the same way on the
  connection (its next stream is taken later): every stream opened costs the
  node's network thread its Yamux, multistream-select and Noise work whatever its
  handler then does, so a few keys opening thousands of streams (held, refused or
  reset) no longer keep it busy.

Buffered bytes (the Yamux receive window, enforced) are in
``dms.network.libp2p_patches``; chunk transfers in ``dms.network.transfer``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import trio
from libp2p.abc import IMuxedConn, INetStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID

from dms.actor.ratelimit import ShareMeter
from dms.network.admission import refused_here
from dms.network.loop import NetworkError, why
from dms.network.settings import NetworkSettings

log = logging.getLogger("dms.network")


class Budget(StrEnum):
    """Why the network layer refused or ended something (``refusals`` keys)."""

    # A connection established while its scope (total, IP, subnet) was full of peers
    # the node has a stake in, or busy ones: the newcomer is closed.
    CONNECTIONS_FULL = "connections_full"
    # An unknown, idle peer's connection closed to make room for a newcomer.
    CONNECTION_EVICTED = "connection_evicted"
    # A raw socket that did not finish its handshake within handshake_timeout_s.
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    # A handshake in progress dropped for a newer one (per IP or in total full).
    HANDSHAKE_EVICTED = "handshake_evicted"
    # An inbound stream over max_streams_per_peer or max_streams: reset.
    STREAMS_FULL = "streams_full"
    # An inbound stream with no frame for stream_idle_s: reset.
    STREAM_IDLE = "stream_idle"
    # The oldest stream of an unknown peer, reset for a newcomer (PROTOCOL_SLOTS full).
    STREAM_EVICTED = "stream_evicted"
    # A frame for a peer being dialed while max_waiting_bytes wait for streams to all
    # peers together: it fails at once.
    WAITING_FULL = "waiting_full"
    # A write to a peer that granted no window for stream_idle_s: the stream is broken.
    WRITE_STALLED = "write_stalled"
    # A peer sent more than a stream's receive window (or the total buffer): reset.
    WINDOW_EXCEEDED = "window_exceeded"
    # A chunk request over max_transfers_per_peer or max_transfers: refused.
    TRANSFERS_FULL = "transfers_full"
    # A chunk stream idle, or slower than chunk_min_bytes_per_s: ended.
    TRANSFER_STALLED = "transfer_stalled"
    # A chunk stream from a peer no manifest offered here is for: refused at once,
    # before it takes a transfer slot or is waited on.
    CHUNKS_UNOFFERED = "chunks_unoffered"
    # A peer's actor streams paused: it sent more bytes than its share (ByteBudget).
    BYTES_THROTTLED = "bytes_throttled"
    # A connection's next stream taken later: its peer opened more than its share of
    # new streams a second (StreamOpens).
    STREAMS_THROTTLED = "streams_throttled"
    # A dial refused: max_outbound_connections open (OutboundBudget).
    OUTBOUND_FULL = "outbound_full"
    # An unknown peer's outbound connection closed to dial a peer with a stake.
    OUTBOUND_EVICTED = "outbound_evicted"


Stake = Callable[[str], bool]


def subnet_of(ip: str, v4_prefix: int = 24, v6_prefix: int = 64) -> str:
    """The /24 (IPv4) or /64 (IPv6) network of ``ip`` (other prefixes if given);
    ``ip`` itself if it is none."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    prefix = v4_prefix if addr.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@dataclass
class _Handshake:
    ip: str
    began: float
    scope: trio.CancelScope
    evicted: bool = False


@dataclass
class _Inbound:
    ip: str
    subnet: str
    peer: ID
    muxed: IMuxedConn
    since: float
    # Evicted: closing. Not a candidate again (a close that takes time, or that fails,
    # would have the same connection evicted for ever, the network thread spinning).
    evicted: bool = False


@dataclass
class InboundGate:
    """Admission of inbound connections for one host (``swarm._handle_inbound_connection``).

    ``stake(peer_id)`` says whether the node has a stake in a peer (an allocation, a
    lease, a token or anchor, a remembered peer); ``last_active(peer_id)`` when the
    peer last sent a frame (None: never). Both run on the trio thread, only when a
    budget is full.
    """

    swarm: Any
    settings: NetworkSettings
    refusals: Counter[str]
    stake: Stake
    last_active: Callable[[str], float | None]
    _handshakes: dict[int, _Handshake] = field(default_factory=dict)
    _inbound: dict[int, _Inbound] = field(default_factory=dict)
    _by_ip: Counter[str] = field(default_factory=Counter)
    _by_subnet: Counter[str] = field(default_factory=Counter)

    def install(self) -> None:
        self.swarm._handle_inbound_connection = self.handle

    def usage(self) -> dict[str, tuple[int, int]]:
        """Each budget's (used, limit)."""
        s = self.settings
        return {
            "handshakes": (len(self._handshakes), s.max_handshakes),
            "inbound_connections": (len(self._inbound), s.max_inbound_connections),
            "connections_per_ip": (max(self._by_ip.values(), default=0), s.max_connections_per_ip),
            "connections_per_subnet": (
                max(self._by_subnet.values(), default=0),
                s.max_connections_per_subnet,
            ),
        }

    async def handle(self, socket: Any, maddr: Any) -> None:
        """One inbound socket, for as long as it lives."""
        address = socket.get_remote_address() if hasattr(socket, "get_remote_address") else None
        ip = address[0] if address else "?"
        if isinstance(socket, IMuxedConn):  # QUIC: secured and multiplexed by its transport
            await self._multiplexed(socket, ip)
            return
        muxed: IMuxedConn | None = None
        key = id(socket)
        with trio.CancelScope() as scope:
            self._admit_handshake(key, _Handshake(ip, time.monotonic(), scope))
            try:
                muxed = await self._upgrade(socket, maddr, ip)
            finally:
                self._handshakes.pop(key, None)
        if muxed is None:
            if scope.cancelled_caught:
                with contextlib.suppress(Exception):
                    await socket.close()
            return
        await self.hold(muxed, ip)

    async def _multiplexed(self, muxed: IMuxedConn, ip: str) -> None:
        """An inbound connection its transport secured and multiplexed itself (QUIC: TLS
        1.3 with the peer's libp2p key, its own streams), handed over complete: into the
        swarm as py-libp2p puts one (no Noise and Yamux upgrade: taken for a raw socket,
        its upgrade failed and the connection was never the swarm's, so every stream the
        peer opened on it went unanswered), then under the budgets as any other. Within
        ``handshake_timeout_s``, as an upgrade is (``add_conn`` waits for the connection
        to start, its muxer and then the swarm's, which a peer may stall): past it the
        connection is closed."""
        conn: Any = None
        try:
            with trio.move_on_after(self.settings.handshake_timeout_s):
                conn = await self.swarm.add_conn(muxed, direction="inbound")
            if conn is None:
                raise TimeoutError(f"not added within {self.settings.handshake_timeout_s:g} s")
        except Exception as exc:
            log.debug("inbound connection from %s failed: %s", ip, exc)
            with contextlib.suppress(Exception):
                await muxed.close()
            return
        await self.hold(muxed, ip, getattr(conn, "event_closed", None))

    async def hold(self, muxed: IMuxedConn, ip: str, closed: trio.Event | None = None) -> None:
        """Admit an inbound connection that finished its upgrade (here, or through a
        relay: ``ip`` is then the relay's) under the budgets, and hold its slot until it
        closes (``closed``, else the connection's own event); closed at once if there is
        no room."""
        entry = _Inbound(ip, subnet_of(ip), muxed.peer_id, muxed, time.monotonic())
        if not await self._make_room(entry):
            self.refusals[Budget.CONNECTIONS_FULL] += 1
            log.warning(
                "inbound connection from %s (%s) refused: connections_full: every inbound "
                "slot of its scope is held by a peer this node has a stake in",
                muxed.peer_id,
                ip,
            )
            await self._close(muxed)
            return
        key = id(muxed)
        self._inbound[key] = entry
        self._by_ip[entry.ip] += 1
        self._by_subnet[entry.subnet] += 1
        try:
            if closed is None:
                closed = getattr(muxed, "event_closed", None)
            if closed is not None:
                await closed.wait()
            else:  # no event to wait on: hold the slot until the host stops, as py-libp2p does
                await self.swarm.manager.wait_finished()
        finally:
            del self._inbound[key]
            for counter, name in ((self._by_ip, entry.ip), (self._by_subnet, entry.subnet)):
                counter[name] -= 1
                if counter[name] <= 0:
                    del counter[name]

    def _admit_handshake(self, key: int, handshake: _Handshake) -> None:
        """Room for one more handshake: the oldest of its IP (or of all) goes if full."""
        s = self.settings
        same_ip = [h for h in self._handshakes.values() if h.ip == handshake.ip and not h.evicted]
        if len(same_ip) >= s.max_handshakes_per_ip:
            self._evict_handshake(min(same_ip, key=lambda h: h.began))
        live = [h for h in self._handshakes.values() if not h.evicted]
        if len(live) >= s.max_handshakes:
            self._evict_handshake(min(live, key=lambda h: h.began))
        self._handshakes[key] = handshake

    def _evict_handshake(self, handshake: _Handshake) -> None:
        handshake.evicted = True
        handshake.scope.cancel()
        self.refusals[Budget.HANDSHAKE_EVICTED] += 1
        log.info(
            "handshake from %s dropped after %.1f s: handshake_evicted (at most %d per IP, "
            "%d in all; the oldest goes first)",
            handshake.ip,
            time.monotonic() - handshake.began,
            self.settings.max_handshakes_per_ip,
            self.settings.max_handshakes,
        )

    async def _upgrade(self, socket: Any, maddr: Any, ip: str) -> IMuxedConn | None:
        """Noise and Yamux within ``handshake_timeout_s`` (py-libp2p's upgrade timeout,
        set from it); None if the socket failed, timed out or was evicted."""
        began = time.monotonic()
        try:
            return await self.swarm.upgrade_inbound_raw_conn(RawConnection(socket, False), maddr)
        except trio.Cancelled:
            raise
        except Exception as exc:
            if time.monotonic() - began >= self.settings.handshake_timeout_s:
                self.refusals[Budget.HANDSHAKE_TIMEOUT] += 1
                log.info(
                    "socket from %s closed: handshake_timeout: no Noise/Yamux handshake "
                    "within %g s",
                    ip,
                    self.settings.handshake_timeout_s,
                )
            else:
                log.debug("inbound connection from %s failed: %s", ip, exc)
            with contextlib.suppress(Exception):
                await socket.close()
            return None

    async def _make_room(self, new: _Inbound) -> bool:
        """True once ``new`` fits every scope, evicting unknown idle peers as needed."""
        s = self.settings
        scopes: list[tuple[Callable[[_Inbound], bool], int, str]] = [
            (lambda e: e.ip == new.ip, s.max_connections_per_ip, f"IP {new.ip}"),
            (
                lambda e: e.subnet == new.subnet,
                s.max_connections_per_subnet,
                f"subnet {new.subnet}",
            ),
            (lambda e: True, s.max_inbound_connections, "all inbound"),
        ]
        # After an eviction (awaited: others arrive meanwhile) every scope is checked
        # again from the first: the caller counts ``new`` with no await after the last
        # check, so no scope can be passed by connections admitted at once.
        while True:
            for member, limit, name in scopes:
                held = [
                    e
                    for e in self._inbound.values()
                    if member(e) and not e.evicted and not e.muxed.is_closed
                ]
                if len(held) < limit:
                    continue
                victim = self._least_needed(held)
                if victim is None:
                    return False
                victim.evicted = True
                self.refusals[Budget.CONNECTION_EVICTED] += 1
                log.info(
                    "evicted %s (%s), idle %.0f s, for a new peer: connections of %s full "
                    "(%d); it is unknown to this node",
                    victim.peer,
                    victim.ip,
                    self._idle_s(victim),
                    name,
                    limit,
                )
                await self._close(victim.muxed)
                break
            else:
                return True

    def _least_needed(self, held: list[_Inbound]) -> _Inbound | None:
        """The connection idle the longest among peers the node has no stake in."""
        candidates = []
        for entry in held:
            peer = entry.peer.to_base58()
            if self.swarm.is_protected(entry.peer) or self.stake(peer):
                continue
            candidates.append(entry)
        if not candidates:
            return None
        return max(candidates, key=self._idle_s)

    def _idle_s(self, entry: _Inbound) -> float:
        last = self.last_active(entry.peer.to_base58())
        return time.monotonic() - max(entry.since, last or 0.0)

    async def _close(self, muxed: IMuxedConn) -> None:
        for conn in list(self.swarm.connections.get(muxed.peer_id, [])):
            if conn.muxed_conn is muxed:
                with contextlib.suppress(Exception):
                    await conn.close()
                return
        with contextlib.suppress(Exception):
            await muxed.close()


@dataclass
class StreamBudget:
    """Inbound streams open at once, per peer and in total (wraps the host's stream
    handler: a stream counts from its arrival until its handler returns).

    When the total is full, a newcomer is not simply refused (keys and connections
    are cheap, so a few hundred keys would keep every honest stream out): the
    oldest stream of the peer without a ``stake`` that holds the most is reset for
    it (``stream_evicted``). One over its own per-peer cap is reset (``streams_full``),
    and so is a newcomer when every stream open is a staked peer's."""

    settings: NetworkSettings
    refusals: Counter[str]
    stake: Stake = lambda peer: False
    _by_peer: Counter[ID] = field(default_factory=Counter)
    _streams: dict[ID, dict[int, tuple[float, INetStream]]] = field(default_factory=dict)
    _open: int = 0

    def install(self, swarm: Any) -> None:
        handler: Callable[[INetStream], Awaitable[None]] = swarm.common_stream_handler

        async def counted(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
            s = self.settings
            over = self._by_peer[peer] >= s.max_streams_per_peer
            # Decided and counted with no await between: the eviction's reset is awaited
            # only once this stream holds its place (else a peer's streams arriving
            # meanwhile all passed its cap before any was counted).
            evicted = None if over or self._open < s.max_streams else self._evict_for(peer)
            if over or (self._open >= s.max_streams and evicted is None):
                self.refusals[Budget.STREAMS_FULL] += 1
                log.info(
                    "stream from %s reset: streams_full (%d open from it, %d in all; at most "
                    "%d and %d%s)",
                    peer,
                    self._by_peer[peer],
                    self._open,
                    s.max_streams_per_peer,
                    s.max_streams,
                    "" if over else ", all of peers this node has a stake in",
                )
                with contextlib.suppress(Exception):
                    await stream.reset()
                return
            self._by_peer[peer] += 1
            self._open += 1
            mine = self._streams.setdefault(peer, {})
            mine[id(stream)] = (time.monotonic(), stream)
            try:
                if evicted is not None:
                    with contextlib.suppress(Exception):
                        await evicted.reset()
                await handler(stream)
            finally:
                self._open -= 1
                mine.pop(id(stream), None)
                self._by_peer[peer] -= 1
                if self._by_peer[peer] <= 0:
                    del self._by_peer[peer]
                    self._streams.pop(peer, None)

        swarm.common_stream_handler = counted

    def _evict_for(self, newcomer: ID) -> INetStream | None:
        """The oldest stream of the unstaked peer holding the most, to reset for
        ``newcomer``; None if every stream is a staked peer's. The newcomer is admitted
        at once: the evicted stream's handler gives its count back as it ends."""
        holders = [
            peer
            for peer, streams in self._streams.items()
            if streams and peer != newcomer and not self.stake(peer.to_base58())
        ]
        if not holders:
            return None
        heaviest = max(holders, key=lambda peer: len(self._streams[peer]))
        key, (since, oldest) = min(self._streams[heaviest].items(), key=lambda kv: kv[1][0])
        del self._streams[heaviest][key]  # not chosen twice while it ends
        self.refusals[Budget.STREAM_EVICTED] += 1
        log.info(
            "stream of %s (it holds %d), open %.0f s, reset for one of %s: stream_evicted "
            "(max_streams %d full; the peer without a stake that holds the most goes first)",
            heaviest,
            self._by_peer[heaviest],
            time.monotonic() - since,
            newcomer,
            self.settings.max_streams,
        )
        return oldest

    def usage(self) -> dict[str, tuple[int, int]]:
        s = self.settings
        return {
            "streams": (self._open, s.max_streams),
            "streams_per_peer": (max(self._by_peer.values(), default=0), s.max_streams_per_peer),
        }


class Watched:
    """One watched stream: ``touch()`` on every frame (an attribute store, nothing more)."""

    __slots__ = ("active", "quiet", "reset")

    def __init__(self, reset: Callable[[], Awaitable[None]]) -> None:
        self.active = True
        self.quiet = 0
        self.reset = reset

    def touch(self) -> None:
        self.active = True


@dataclass
class IdleWatch:
    """Resets streams that went ``idle_s`` without a frame (checked every ``idle_s / 2``;
    ``what``: what a stream must carry to be active, for the log)."""

    idle_s: float
    refusals: Counter[str]
    what: str = "frame"
    _watched: set[Watched] = field(default_factory=set)

    def watch(self, reset: Callable[[], Awaitable[None]]) -> Watched:
        handle = Watched(reset)
        self._watched.add(handle)
        return handle

    def forget(self, handle: Watched) -> None:
        self._watched.discard(handle)

    def __len__(self) -> int:
        return len(self._watched)

    async def run(self) -> None:
        while True:
            await trio.sleep(self.idle_s / 2)
            for handle in list(self._watched):
                if handle.active:
                    handle.active, handle.quiet = False, 0
                    continue
                handle.quiet += 1
                if handle.quiet >= 2:
                    self._watched.discard(handle)
                    self.refusals[Budget.STREAM_IDLE] += 1
                    log.info(
                        "an inbound stream reset: stream_idle (no %s for %g s)",
                        self.what,
                        self.idle_s,
                    )
                    with contextlib.suppress(Exception):
                        await handle.reset()


class _Touching:
    """A stream whose reads and writes mark it active (``Watched.touch``); the rest is
    the stream's own."""

    def __init__(self, stream: INetStream, watched: Watched) -> None:
        self._stream = stream
        self._watched = watched

    async def read(self, n: int | None = None) -> bytes:
        data = await self._stream.read(n)
        self._watched.touch()
        return data

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)
        self._watched.touch()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# py-libp2p protocols whose streams live as long as the connection by design (a quiet
# topic sends nothing): not reset when idle; bounded per peer, and by connections.
LONG_LIVED_PREFIXES = ("/meshsub/", "/floodsub/")
# Protocols py-libp2p serves only so many streams of at once, for all peers, resetting
# the rest: the DHT's 12 (KadDHT's inbound limiter). Full, the oldest stream of a peer
# the node has no stake in is reset for the newcomer, as connections are evicted.
PROTOCOL_SLOTS = {"/ipfs/kad/1.0.0": 12}
# How long a newcomer waits for the stream reset for it to give back its slot.
EVICTED_WAIT_S = 2.0


@dataclass
class _Serving:
    peer: ID
    stream: INetStream
    since: float
    ended: trio.Event = field(default_factory=trio.Event)
    evicted: bool = False  # chosen to make room: not chosen again while it ends


@dataclass
class ProtocolStreams:
    """The streams of py-libp2p's own protocols (identify, ping, the DHT, DCUtR, ...):
    at most ``max_protocol_streams_per_peer`` of one protocol from one peer at once
    (one more is reset, ``streams_full``), and one with no byte read or written for
    ``protocol_idle_s`` is reset (``stream_idle``), a long-lived one excepted
    (``LONG_LIVED_PREFIXES``). A protocol py-libp2p serves only so many streams of
    at once (``PROTOCOL_SLOTS``) evicts, when full, the oldest stream of a peer
    without a ``stake`` for a newcomer (``stream_evicted``), so idle or trickling
    streams cannot keep honest ones out. ``install`` wraps the handler of every
    protocol the host serves then, but those in ``own`` (protocols with budgets of
    their own: dms's actor and chunk streams, the relay's circuits). Streams in all
    are :class:`StreamBudget`'s."""

    settings: NetworkSettings
    refusals: Counter[str]
    idle: IdleWatch
    stake: Stake
    _by_peer: Counter[tuple[ID, str]] = field(default_factory=Counter)
    _serving: dict[str, dict[int, _Serving]] = field(default_factory=dict)
    watched: set[str] = field(default_factory=set)

    def install(self, host: Any, own: set[str]) -> None:
        for protocol, handler in list(host.get_mux().handlers.items()):
            if protocol in own or handler is None:
                continue
            host.set_stream_handler(protocol, self._wrap(str(protocol), handler))
            self.watched.add(str(protocol))

    def _wrap(
        self, protocol: str, handler: Callable[[INetStream], Awaitable[None]]
    ) -> Callable[[INetStream], Awaitable[None]]:
        long_lived = protocol.startswith(LONG_LIVED_PREFIXES)

        async def budgeted(stream: INetStream) -> None:
            key = (stream.muxed_conn.peer_id, protocol)
            limit = self.settings.max_protocol_streams_per_peer
            if self._by_peer[key] >= limit:
                self.refusals[Budget.STREAMS_FULL] += 1
                log.info(
                    "%s stream from %s reset: streams_full (%d of this protocol open from "
                    "it; at most %d, max_protocol_streams_per_peer)",
                    protocol,
                    key[0],
                    self._by_peer[key],
                    limit,
                )
                with contextlib.suppress(Exception):
                    await stream.reset()
                return
            serving = self._serving.setdefault(protocol, {})
            slots = PROTOCOL_SLOTS.get(protocol)
            # Decided and counted with no await between (see StreamBudget.install); the
            # evicted stream is waited for once this one holds its place.
            evicted = None
            if slots is not None and len(serving) >= slots:
                evicted = self._evict(protocol, serving, key[0])
                if evicted is None:
                    with contextlib.suppress(Exception):
                        await stream.reset()
                    return
            self._by_peer[key] += 1
            entry = serving[id(stream)] = _Serving(key[0], stream, time.monotonic())
            watched = None
            try:
                if evicted is not None:
                    with contextlib.suppress(Exception):
                        await evicted.stream.reset()
                    with trio.move_on_after(EVICTED_WAIT_S):
                        await evicted.ended.wait()
                watched = None if long_lived else self.idle.watch(stream.reset)
                await handler(stream if watched is None else _Touching(stream, watched))  # type: ignore[arg-type]
            finally:
                if watched is not None:
                    self.idle.forget(watched)
                serving.pop(id(stream), None)
                entry.ended.set()
                self._by_peer[key] -= 1
                if self._by_peer[key] <= 0:
                    del self._by_peer[key]

        return budgeted

    def _evict(self, protocol: str, serving: dict[int, _Serving], newcomer: ID) -> _Serving | None:
        """Room among ``serving`` for ``newcomer``: the oldest stream of a peer without a
        stake, not already chosen, to reset (and wait a little for its handler to give
        its slot back); None if there is none."""
        others = [
            e for e in serving.values() if not e.evicted and not self.stake(e.peer.to_base58())
        ]
        if not others:
            self.refusals[Budget.STREAMS_FULL] += 1
            log.info(
                "%s stream from %s reset: streams_full (the %d served at once are all of "
                "peers this node has a stake in)",
                protocol,
                newcomer,
                len(serving),
            )
            return None
        oldest = min(others, key=lambda e: e.since)
        oldest.evicted = True
        self.refusals[Budget.STREAM_EVICTED] += 1
        log.info(
            "%s stream of %s, open %.1f s, reset for one of %s: stream_evicted (at most %d "
            "served at once; the oldest of a peer this node has no stake in goes)",
            protocol,
            oldest.peer,
            time.monotonic() - oldest.since,
            newcomer,
            len(serving),
        )
        return oldest

    def usage(self) -> dict[str, tuple[int, int]]:
        return {
            "protocol_streams_per_peer": (
                max(self._by_peer.values(), default=0),
                self.settings.max_protocol_streams_per_peer,
            ),
            "protocol_streams_idle_watched": (len(self.idle), self.settings.max_streams),
        }


@dataclass
class _Bucket:
    """A token bucket that may go below zero: what overdraws it (a frame, a stream) is
    never split or refused, and the next one waits until it is paid back."""

    tokens: float
    stamp: float

    def refill(self, rate: float, burst: float, now: float) -> None:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now

    def wait_s(self, rate: float, floor: float = 0.0) -> float:
        """Seconds until the bucket is back at ``floor`` (0: it is there)."""
        return (floor - self.tokens) / rate if self.tokens < floor else 0.0


@dataclass(frozen=True)
class Rates:
    """What a :class:`PacedBudget` allows: units a second and at once for each peer, and
    for all peers without a stake together."""

    per_peer: float
    peer_burst: float
    unknown: float
    unknown_burst: float


@dataclass
class PacedBudget:
    """Units a second (bytes, new streams) each peer may make the node take, and all
    peers the node has no stake in together (``stake``), enforced by backpressure:
    after a unit that overdraws a bucket, the next waits until it is paid back
    (:meth:`charge` says how long). Subclasses name the units (``rates``, ``code``,
    ``gauge``, ``what``, ``settings_named``).

    One trio thread uses it (no lock). ``forget`` a peer when its last connection
    closes; its entry goes once its bucket is full again (no fresh burst by
    reconnecting).
    """

    settings: NetworkSettings
    refusals: Counter[str]
    stake: Stake
    clock: Callable[[], float] = time.monotonic
    _peers: dict[str, _Bucket] = field(default_factory=dict)
    _unknown: _Bucket | None = None
    _meter: ShareMeter | None = None  # who draws on _unknown, and whether over its share
    _logged: dict[str, float] = field(default_factory=dict)
    _staked: dict[str, tuple[bool, float]] = field(default_factory=dict)

    code = Budget.BYTES_THROTTLED
    gauge = "inbound_bytes"  # usage(): f"{gauge}_per_peer", f"{gauge}_unknown"
    what = "bytes"
    settings_named = ""

    def rates(self) -> Rates:
        raise NotImplementedError

    def has_stake(self, peer: str) -> bool:
        """Whether this node has a stake in ``peer`` (asked again at most once a second:
        the frame budgets ask it for every frame too)."""
        return self._has_stake(peer, self.clock())

    def _has_stake(self, peer: str, now: float) -> bool:
        """``stake(peer)``, asked again at most once a second per peer (a frame is read
        far more often than a stake changes)."""
        known = self._staked.get(peer)
        if known is None or now - known[1] >= 1.0:
            known = self._staked[peer] = (self.stake(peer), now)
        return known[0]

    def charge(self, peer: str, size: float) -> float:
        """Take ``size`` units from ``peer``'s budgets; the seconds before it may be read
        from again (0: none). Counted and logged (once a second per peer) when it must
        wait."""
        r = self.rates()
        now = self.clock()
        mine = self._peers.get(peer)
        if mine is None:
            mine = self._peers[peer] = _Bucket(float(r.peer_burst), now)
        mine.refill(r.per_peer, r.peer_burst, now)
        mine.tokens -= size
        wait = mine.wait_s(r.per_peer)
        scope = "its own"
        if not self._has_stake(peer, now):
            if self._unknown is None or self._meter is None:
                self._unknown = _Bucket(float(r.unknown_burst), now)
                self._meter = ShareMeter(r.unknown)
            self._unknown.refill(r.unknown, r.unknown_burst, now)
            self._unknown.tokens -= size
            # Fair inside, as the frames' shared budget: a peer over its share of the last
            # second waits until the bucket is half full again, one within its share only
            # until it is out of debt. Keys that flood it keep it half full for the others,
            # and an honest newcomer's few streams or bytes are taken at once beside them.
            over = self._meter.draw(peer, size, now)
            floor = r.unknown_burst / 2 if over else 0.0
            shared = self._unknown.wait_s(r.unknown, floor)
            if shared > wait:
                wait, scope = shared, "that of all peers this node has no stake in"
        if wait > 0:
            self.refusals[self.code] += 1
            if now - self._logged.get(peer, float("-inf")) >= 1.0:
                self._logged[peer] = now
                log.info(
                    "%s of %s paused %.2f s: %s: over %s budget of %s a second (%s)",
                    "streams" if self.what == "bytes" else "connection",
                    peer,
                    wait,
                    self.code,
                    scope,
                    self.what,
                    self.settings_named,
                )
        return wait

    def forget(self) -> None:
        """Drop the peers whose buckets are full again (called when a peer leaves)."""
        r = self.rates()
        now = self.clock()
        for peer, bucket in list(self._peers.items()):
            if bucket.tokens + (now - bucket.stamp) * r.per_peer >= r.peer_burst:
                del self._peers[peer]
                self._logged.pop(peer, None)
                self._staked.pop(peer, None)

    def usage(self) -> dict[str, tuple[int, int]]:
        """Units owed now (below zero, a peer waits), per peer (the most) and unknown."""
        r = self.rates()
        now = self.clock()

        def used(bucket: _Bucket | None, rate: float, burst: float) -> int:
            if bucket is None:
                return 0
            tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
            return int(burst - tokens)

        most = max((used(b, r.per_peer, r.peer_burst) for b in self._peers.values()), default=0)
        return {
            f"{self.gauge}_per_peer": (most, int(r.peer_burst)),
            f"{self.gauge}_unknown": (
                used(self._unknown, r.unknown, r.unknown_burst),
                int(r.unknown_burst),
            ),
        }


@dataclass
class ByteBudget(PacedBudget):
    """Bytes a second each peer may send on its actor streams, and all peers the node
    has no stake in together: after a frame that overdraws a bucket, the stream's
    next read waits until it is paid back."""

    settings_named = (
        "max_inbound_bytes_per_peer_per_s, inbound_byte_burst_per_peer; "
        "max_inbound_bytes_per_s, inbound_byte_burst"
    )

    def rates(self) -> Rates:
        s = self.settings
        return Rates(
            s.max_inbound_bytes_per_peer_per_s,
            s.inbound_byte_burst_per_peer,
            s.max_inbound_bytes_per_s,
            s.inbound_byte_burst,
        )

    async def pace(self, peer: str, size: int) -> None:
        """Charge ``size`` bytes read from ``peer`` and wait until its budget allows them;
        with nothing to wait, still let the other tasks run (one read can return many
        frames, which would otherwise keep every other peer's frames waiting)."""
        wait = self.charge(peer, size)
        if wait > 0:
            await trio.sleep(wait)
        else:
            await trio.lowlevel.checkpoint()


@dataclass
class StreamOpens(PacedBudget):
    """New inbound streams a second each peer may open, and all peers the node has no
    stake in together, enforced on the connection: after a stream that overdraws a
    bucket, the connection's next stream is taken only once it is paid back.
    Meanwhile Yamux's queue of streams not yet taken (10) fills, its reader stops, so
    the peer's further stream openings wait in its own socket, read by no one.

    Each stream opened costs the node ~1.4 ms of CPU on its network thread before any
    handler of ours sees it (Yamux, multistream-select, Noise, trio's tasks, py-libp2p's
    notifications; measured, specs/security.md, "Stream openings"), whatever the
    handler then does; so the rate, not only the number held, is budgeted."""

    code = Budget.STREAMS_THROTTLED
    gauge = "new_streams"
    what = "new streams"
    settings_named = (
        "max_new_streams_per_peer_per_s, new_stream_burst_per_peer; "
        "max_unknown_new_streams_per_s, unknown_new_stream_burst"
    )

    def rates(self) -> Rates:
        s = self.settings
        return Rates(
            s.max_new_streams_per_peer_per_s,
            s.new_stream_burst_per_peer,
            s.max_unknown_new_streams_per_s,
            s.unknown_new_stream_burst,
        )

    def install(self, swarm: Any) -> None:
        """Pace every connection of ``swarm`` from its first inbound stream: through
        ``swarm.add_conn`` py-libp2p registers every connection (dialed, accepted,
        relayed), and there it starts the muxer's reader and the ``SwarmConn`` loop
        that calls ``accept_stream``, then notifies ``connected``. Paced only from that
        notification, the loop's first call, already waiting on the unpaced
        ``accept_stream``, took the connection's first stream uncharged, and at times
        the next too: a peer got one or two streams free with each new connection.
        Paced here, before the original runs, every stream is charged from the first
        (the first is taken at once, as on any new connection: its wait is for what it
        overdraws). A connection this cannot pace is closed, and refused as py-libp2p
        refuses one (``SwarmException``), its resource scope given back: it would run
        unpaced otherwise."""
        add_conn: Callable[..., Awaitable[Any]] = swarm.add_conn

        async def paced_from_the_first(muxed: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                self.pace(muxed)
            except Exception as exc:
                scope = getattr(muxed, "_resource_scope", None)
                with contextlib.suppress(Exception):
                    if scope is not None:
                        scope.close()
                with contextlib.suppress(Exception):
                    await muxed.close()
                raise SwarmException(f"connection not paced: {why(exc)}") from exc
            return await add_conn(muxed, *args, **kwargs)

        swarm.add_conn = paced_from_the_first

    def pace(self, muxed: Any) -> None:
        """Pace the streams the peer of ``muxed`` (a connection) opens on it: its
        ``accept_stream`` (called in a loop by py-libp2p's ``SwarmConn``, looked up
        anew each time) waits, before taking the next stream, for what the last one
        overdrew. Once per connection, before its ``SwarmConn`` starts (``install``)."""
        if getattr(muxed, "_dms_paced", False) or not hasattr(muxed, "accept_stream"):
            return
        muxed._dms_paced = True
        accept: Callable[[], Awaitable[Any]] = muxed.accept_stream
        peer = muxed.peer_id.to_base58()
        owed = 0.0

        async def paced() -> Any:
            nonlocal owed
            if owed > 0:
                await trio.sleep(owed)
            stream = await accept()
            owed = self.charge(peer, 1)
            return stream

        muxed.accept_stream = paced


@dataclass
class OutboundBudget:
    """Connections this host dialed, at most ``max_outbound_connections``: checked
    before every dial of the swarm (``install``), this node's own for a frame, a
    ping or a chunk fetch, and py-libp2p's (its auto-connector dials the peers it
    has addresses of, which the DHT and identify fill), and before every dial
    through a relay (``slot``, held from the dial on, as the swarm's).

    Full, a dial for a peer the node has a stake in closes the outbound connection
    of an unknown peer idle the longest (``outbound_evicted``); a dial for an
    unknown peer, or when every outbound connection is staked, is refused
    (``outbound_full``, a ``NetworkError`` with the reason: the frame's invoke fails
    with ``unreachable``). Runs on the trio thread.
    """

    settings: NetworkSettings
    refusals: Counter[str]
    stake: Stake
    last_active: Callable[[str], float | None]

    _dialing: Counter[ID] = field(default_factory=Counter)

    def install(self, swarm: Any) -> None:
        dial: Callable[[ID], Awaitable[Any]] = swarm.dial_peer

        async def budgeted(peer_id: ID) -> Any:
            async with self.slot(swarm, peer_id):
                return await dial(peer_id)

        swarm.dial_peer = budgeted

    @contextlib.asynccontextmanager
    async def slot(self, swarm: Any, peer_id: ID) -> AsyncIterator[None]:
        """Hold a slot for a dial to ``peer_id`` while it runs (the swarm's dials, and
        dials through a relay, which open their connection by another way): raises
        ``NetworkError`` (outbound_full) when there is none. A peer connected or being
        dialed holds one already."""
        evict = None
        if not swarm.get_connections(peer_id) and peer_id not in self._dialing:
            # Decided and reserved at once (no await between), so two dials cannot
            # both take the last slot.
            evict = self.room_for(swarm, peer_id)
        self._dialing[peer_id] += 1
        try:
            if evict is not None:
                with contextlib.suppress(Exception):
                    await evict.close()
            yield
        finally:
            self._dialing[peer_id] -= 1
            if self._dialing[peer_id] <= 0:
                del self._dialing[peer_id]

    @staticmethod
    def dialed(swarm: Any) -> list[tuple[ID, Any]]:
        """(peer, connection) of every open connection this host initiated (told by
        ``is_initiator``, which Yamux's and QUIC's connections both have)."""
        return [
            (pid, conn)
            for pid, conns in list(swarm.connections.items())
            for conn in conns
            if getattr(conn.muxed_conn, "is_initiator", False)
            and not getattr(conn.muxed_conn, "is_closed", False)
        ]

    def room_for(self, swarm: Any, peer: ID) -> Any:
        """None if a dial to ``peer`` fits; the connection to close first if it fits
        only so; raises ``NetworkError`` (outbound_full) if it does not."""
        limit = self.settings.max_outbound_connections
        dialed = self.dialed(swarm)
        held = {pid for pid, _ in dialed}
        in_flight = sum(1 for pid in self._dialing if pid not in held)
        if len(dialed) + in_flight < limit:
            return None
        name = peer.to_base58()
        staked = self.stake(name)
        if staked:
            unknown = [
                (pid, conn)
                for pid, conn in dialed
                if not swarm.is_protected(pid) and not self.stake(pid.to_base58())
            ]
            if unknown:
                pid, conn = min(
                    unknown, key=lambda item: self.last_active(item[0].to_base58()) or 0.0
                )
                self.refusals[Budget.OUTBOUND_EVICTED] += 1
                log.info(
                    "closing the connection this node dialed to %s, unknown to it and idle "
                    "the longest, to dial %s: outbound_evicted (max_outbound_connections %d)",
                    pid,
                    name,
                    limit,
                )
                return conn
        self.refusals[Budget.OUTBOUND_FULL] += 1
        refused_here(peer)
        raise NetworkError(
            f"peer {name} is not dialed: outbound_full: this node holds {len(dialed)} "
            f"connections it dialed and {in_flight} dials in progress, the most it may "
            f"(max_outbound_connections {limit})"
            + ("" if staked else ", and it has no stake in this peer")
        )

    def usage(self, swarm: Any) -> dict[str, tuple[int, int]]:
        used = len(self.dialed(swarm))
        return {"outbound_connections": (used, self.settings.max_outbound_connections)}
