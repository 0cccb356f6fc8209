"""Circuit relay v2: serving as a relay within budgets, reserving on relays, dialing through them.

py-libp2p 0.8.1's ``libp2p.relay.circuit_v2`` carries the protocol; this module
adds what a dms node needs around it (specs/network.md, "Relays"):

- :class:`BudgetedRelay` serves ``/libp2p/circuit/relay/0.2.0/hop`` when the node
  relays (``RelaySettings.serve``, or publicly reachable): reservations in total,
  circuits per peer and in total, bytes per circuit, per peer and in total over a
  rolling hour, and a duration per circuit. A request over a budget gets
  ``RESOURCE_LIMIT_EXCEEDED`` and the refusal is counted (``refusals``) and logged
  with the reason. py-libp2p's own checks (one reservation per peer, circuits per
  reserved destination) still run after ours.
- :class:`RelayClient` keeps reservations on a few relays a private node learns
  from its peers (those whose identify lists the hop protocol), gives the relayed
  addresses to advertise (``<relay addr>/p2p-circuit/p2p/<self>``), and dials a peer
  through a relay when only relayed addresses are known or the direct dial failed.
- :class:`Circuits` keeps, for each relayed connection of this node, dialed or
  accepted, the limit its relay announced (bytes and seconds, in CONNECT's status
  and in STOP's CONNECT) and the bytes that crossed it, so a transfer that cannot
  fit is refused before it starts (``Circuits.room``; dms.network.transfer).

Measured on loopback (one relay, a 32 MiB stream): about 8 MB/s through the relay.
A half-close (EOF) does not cross a relayed connection in py-libp2p 0.8.1, so
protocols on a relayed connection must frame their messages (dms's all do).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import multiaddr
import trio
from libp2p.abc import ConnectionType, IHost, INetConn, INetStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig
from libp2p.relay.circuit_v2.exceptions import RelayConnectionError
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from dms.network.settings import RelaySettings

log = logging.getLogger("dms.network")

__all__ = [
    "HOP_PROTOCOL",
    "BudgetedRelay",
    "Circuit",
    "Circuits",
    "RelayClient",
    "RelayRefusal",
    "is_relayed",
    "relayed_conn",
]

HOUR_S = 3600.0
# How often a private node looks for relays and renews what it holds.
RESERVE_EVERY_S = 2.0
RESERVE_TIMEOUT_S = 10.0
# How long a relay whose reservation ended with its connection (it restarted, the
# NAT dropped the mapping) is kept to be reached and reserved on again.
RENEW_FOR_S = 600.0
# How long a peer that refused this node a reservation is not asked again.
REFUSED_FOR_S = 60.0
# How long the relay may take to answer a CONNECT, and to send its STOP.
CONNECT_TIMEOUT_S = 15.0
CIRCUITS_PER_PEER = 4  # circuits remembered per peer (the newest; closed ones go)


class RelayRefusal(StrEnum):
    """Why the relay refused or ended something (``refusals`` keys)."""

    NOT_A_RELAY = "relay_off"
    RESERVATIONS_FULL = "relay_reservations_full"
    CIRCUITS_FULL = "relay_circuits_full"
    PEER_CIRCUITS_FULL = "relay_peer_circuits_full"
    BYTES_FULL = "relay_bytes_full"
    PEER_BYTES_FULL = "relay_peer_bytes_full"
    # A STOP (a circuit to this node) from a peer it holds no reservation on.
    STOP_UNRESERVED = "relay_stop_unreserved"


# What a relay's status code means, for the dialing side's error.
STATUS_REASON = {
    StatusCode.RESOURCE_LIMIT_EXCEEDED: "the relay's limits are reached "
    "(reservations, circuits, bytes or duration)",
    StatusCode.NO_RESERVATION: "the peer holds no reservation on that relay",
    StatusCode.PERMISSION_DENIED: "the relay refused (not a relay, or a relayed request)",
    StatusCode.CONNECTION_FAILED: "the relay could not reach the peer",
}


def is_relayed(addr: str) -> bool:
    return "/p2p-circuit" in addr


def relayed_conn(conn: INetConn) -> bool:
    """Whether ``conn`` runs through a relay (a circuit), not over a socket of its own."""
    with contextlib.suppress(Exception):
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
        return any(is_relayed(str(a)) for a in conn.get_transport_addresses())
    return False


class _HourlyBytes:
    """Bytes counted over a rolling hour (per minute buckets)."""

    def __init__(self) -> None:
        self._buckets: deque[tuple[int, int]] = deque()
        self.total = 0

    def add(self, n: int, now: float) -> None:
        minute = int(now // 60)
        if self._buckets and self._buckets[-1][0] == minute:
            self._buckets[-1] = (minute, self._buckets[-1][1] + n)
        else:
            self._buckets.append((minute, n))
        self.total += n

    def used(self, now: float) -> int:
        oldest = int((now - HOUR_S) // 60)
        while self._buckets and self._buckets[0][0] <= oldest:
            self.total -= self._buckets.popleft()[1]
        return self.total


@dataclass
class Circuit:
    """One relayed connection of this node: the limits its relay announced (0: none)
    and the bytes that crossed it, both ways (what the relay counts)."""

    relay: ID
    peer: ID
    limit_bytes: int = 0
    limit_s: int = 0
    opened: float = field(default_factory=time.monotonic)
    used: int = 0
    closed: bool = False

    def room(self) -> int | None:
        """Bytes it may still carry (None: no limit)."""
        return None if self.limit_bytes <= 0 else max(0, self.limit_bytes - self.used)


class Circuits:
    """This node's open relayed connections, by peer (the newest last)."""

    def __init__(self) -> None:
        self._by_peer: dict[ID, list[Circuit]] = {}

    def add(self, circuit: Circuit) -> None:
        kept = [c for c in self._by_peer.get(circuit.peer, []) if not c.closed]
        self._by_peer[circuit.peer] = [*kept, circuit][-CIRCUITS_PER_PEER:]

    def end(self, circuit: Circuit) -> None:
        circuit.closed = True
        kept = [c for c in self._by_peer.get(circuit.peer, []) if not c.closed]
        if kept:
            self._by_peer[circuit.peer] = kept
        else:
            self._by_peer.pop(circuit.peer, None)

    def newest(self, peer: ID) -> Circuit | None:
        found = self._by_peer.get(peer) or []
        return found[-1] if found else None


class _MeteredStream:
    """A relayed connection's stream: what crosses it is counted on its circuit; its
    end (close, EOF, an error) ends the circuit."""

    def __init__(self, stream: INetStream, circuit: Circuit, circuits: Circuits) -> None:
        self._stream = stream
        self._circuit = circuit
        self._circuits = circuits

    async def read(self, n: int | None = None) -> bytes:
        try:
            data = await self._stream.read(n)
        except BaseException:
            self._circuits.end(self._circuit)
            raise
        if not data:
            self._circuits.end(self._circuit)
        self._circuit.used += len(data)
        return data

    async def write(self, data: bytes) -> None:
        try:
            await self._stream.write(data)
        except BaseException:
            self._circuits.end(self._circuit)
            raise
        self._circuit.used += len(data)

    async def close(self) -> None:
        self._circuits.end(self._circuit)
        await self._stream.close()

    async def reset(self) -> None:
        self._circuits.end(self._circuit)
        await self._stream.reset()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# Whether this node holds a reservation on a relay (``RelayClient.holds``): the only
# peers whose STOP streams it accepts.
Reserved = Callable[[ID], bool]

# Admits a connection that arrived through a relay under the inbound connection
# budgets, and returns when it closes (``InboundGate.hold``: the muxed connection,
# the relay's IP).
Admit = Callable[[Any, str], Awaitable[None]]


def _still_open(host: IHost, peer: ID, muxed: Any) -> bool:
    """Whether ``muxed`` (a muxed connection) is still one of the connections to ``peer``."""
    return any(c.muxed_conn is muxed for c in host.get_network().get_connections(peer))


def _circuit_of(relay: ID, peer: ID, limit: Any) -> Circuit:
    if limit is None:
        return Circuit(relay, peer)
    return Circuit(relay, peer, int(limit.data), int(limit.duration))


class BudgetedRelay(CircuitV2Protocol):
    """py-libp2p's circuit v2 protocol (hop and stop) with dms's budgets on the hop side,
    and the circuits ending here metered (:class:`Circuits`)."""

    def __init__(
        self,
        host: IHost,
        settings: RelaySettings,
        refusals: Counter[str],
        serving: Any,
        circuits: Circuits,
        admit: Admit | None = None,
        reserved: Reserved = lambda relay: False,
    ) -> None:
        limits = RelayLimits(
            duration=settings.max_circuit_s,
            data=settings.max_circuit_bytes,
            max_circuit_conns=settings.max_circuits_per_peer,
            max_reservations=settings.max_reservations,
        )
        super().__init__(host, limits=limits, allow_hop=True)
        self.relay_settings = settings
        self.refusals = refusals
        self.circuit_meters = circuits
        self._serving = serving  # () -> bool: does this node relay now
        self._admit = admit
        self._reserved = reserved
        self.circuits_by_peer: Counter[ID] = Counter()
        self.bytes_by_peer: dict[ID, _HourlyBytes] = {}
        self.bytes_total = _HourlyBytes()
        self.relayed_bytes = 0
        # peer -> the muxed connection its reservation was made (or last renewed) on;
        # kept while that connection is open (a refused peer's too: at most one a
        # connection)
        self._reserved_on: dict[ID, Any] = {}

    @property
    def circuits(self) -> int:
        return sum(self.circuits_by_peer.values())

    @property
    def reservations(self) -> int:
        """Reservations held (unexpired). Only counts: the metrics thread reads it
        (``usage``), and a clean-up from there could take a reservation the network
        thread had just made again on a peer's new connection; the network thread ends
        reservations (``connection_closed``, ``_end_closed_reservations``)."""
        held = list(self.resource_manager._reservations.values())
        return sum(1 for reservation in held if not reservation.is_expired())

    def connection_closed(self, conn: INetConn) -> None:
        """End the reservation made on ``conn`` (network thread: the disconnect
        event). One renewed since on another connection is that one's, and stays."""
        peer = conn.muxed_conn.peer_id
        if self._reserved_on.get(peer) is conn.muxed_conn:
            del self._reserved_on[peer]
            self.resource_manager._reservations.pop(peer, None)

    def _end_closed_reservations(self) -> None:
        """A reservation lasts while the connection it was made on does (circuit v2:
        it is no longer valid once the peer disconnects). py-libp2p keeps it, by peer,
        until its TTL (an hour) and takes any later connection of the peer as its own:
        a peer that left still held a slot of ``max_reservations``, and one that
        redialed was reachable or not depending on whether it noticed and reserved
        again (RelayClient.keep_reservations now does, on the new connection).
        Network thread only (the handlers; ``connection_closed`` ends most at once)."""
        with contextlib.suppress(Exception):
            self.resource_manager._clean_expired()
        held = self.resource_manager._reservations
        for peer, conn in list(self._reserved_on.items()):
            if not _still_open(self.host, peer, conn):
                del self._reserved_on[peer]
                held.pop(peer, None)

    async def _refuse(
        self, stream: INetStream, code: StatusCode, why: RelayRefusal, msg: str
    ) -> None:
        self.refusals[why] += 1
        log.info("relay refused %s: %s (%s)", stream.muxed_conn.peer_id, msg, why)
        with contextlib.suppress(Exception):
            await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS, status=code))
        with contextlib.suppress(Exception):
            await trio.sleep(0.2)  # the status reaches the peer before the reset
            await stream.reset()

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        peer = stream.muxed_conn.peer_id
        s = self.relay_settings
        if not self._serving():
            await self._refuse(
                stream, StatusCode.PERMISSION_DENIED, RelayRefusal.NOT_A_RELAY, "not a relay"
            )
            return
        self._end_closed_reservations()
        if not self.resource_manager.has_reservation(peer) and (
            self.reservations >= s.max_reservations
        ):
            await self._refuse(
                stream,
                StatusCode.RESOURCE_LIMIT_EXCEEDED,
                RelayRefusal.RESERVATIONS_FULL,
                f"{s.max_reservations} reservations held (max_reservations)",
            )
            return
        # A reservation is for the peer that asks (as go-libp2p does): py-libp2p takes
        # the message's optional peer field when set, so one connection reserved every
        # slot in made-up names (the check above looks at the sender).
        msg.ClearField("peer")
        # Before the reservation exists (py-libp2p's handler awaits): it is this
        # connection's from the start, or renewed, moves to it.
        self._reserved_on[peer] = stream.muxed_conn
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        src = stream.muxed_conn.peer_id
        s = self.relay_settings
        now = time.monotonic()
        refusal = None
        if not self._serving():
            refusal = (StatusCode.PERMISSION_DENIED, RelayRefusal.NOT_A_RELAY, "not a relay")
        elif self.circuits >= s.max_circuits:
            refusal = (
                StatusCode.RESOURCE_LIMIT_EXCEEDED,
                RelayRefusal.CIRCUITS_FULL,
                f"{s.max_circuits} circuits open (max_circuits)",
            )
        elif self.circuits_by_peer[src] >= s.max_circuits_per_peer:
            refusal = (
                StatusCode.RESOURCE_LIMIT_EXCEEDED,
                RelayRefusal.PEER_CIRCUITS_FULL,
                f"{s.max_circuits_per_peer} circuits of this peer open (max_circuits_per_peer)",
            )
        elif self.bytes_total.used(now) >= s.max_bytes_per_h:
            refusal = (
                StatusCode.RESOURCE_LIMIT_EXCEEDED,
                RelayRefusal.BYTES_FULL,
                f"{s.max_bytes_per_h} bytes relayed this hour (max_bytes_per_h)",
            )
        elif self._peer_bytes(src).used(now) >= s.max_peer_bytes_per_h:
            refusal = (
                StatusCode.RESOURCE_LIMIT_EXCEEDED,
                RelayRefusal.PEER_BYTES_FULL,
                f"{s.max_peer_bytes_per_h} bytes of this peer relayed this hour",
            )
        if refusal is not None:
            await self._refuse(stream, *refusal)
            return
        self._end_closed_reservations()  # a destination's, ended with its connection
        self.circuits_by_peer[src] += 1
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self.circuits_by_peer[src] -= 1
            if self.circuits_by_peer[src] <= 0:
                del self.circuits_by_peer[src]
                if self._peer_bytes(src).used(time.monotonic()) == 0:
                    self.bytes_by_peer.pop(src, None)

    async def _handle_stop_stream(self, stream: INetStream) -> None:
        """A circuit to this node (STOP CONNECT), as py-libp2p accepts it, with the
        limit the relay sent in it kept and the circuit metered; only from a relay this
        node holds a reservation on (any peer could otherwise pose as a relay and hand
        it connections in the names of fresh keys)."""
        relay = stream.muxed_conn.peer_id
        if not self._reserved(relay):
            self.refusals[RelayRefusal.STOP_UNRESERVED] += 1
            log.info(
                "relayed connection from %s refused: this node holds no reservation on it (%s)",
                relay,
                RelayRefusal.STOP_UNRESERVED,
            )
            with contextlib.suppress(Exception):
                await self._send_stop_status(
                    stream, StatusCode.PERMISSION_DENIED, "no reservation on this relay"
                )
                await trio.sleep(0.2)  # the status reaches the peer before the reset
                await stream.reset()
            return
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                msg = await read_delimited_msg(stream, StopMessage)
            if msg.type != StopMessage.CONNECT:
                await self._send_stop_status(
                    stream, StatusCode.MALFORMED_MESSAGE, "Invalid message type"
                )
                await self._close_stream(stream)
                return
            limit = msg.limit if msg.HasField("limit") else None
            circuit = _circuit_of(stream.muxed_conn.peer_id, ID(msg.peer.id), limit)
            await self._send_stop_status(stream, StatusCode.OK, "Connection established")
            self.circuit_meters.add(circuit)
            metered = _MeteredStream(stream, circuit, self.circuit_meters)
            network = self.host.get_network()
            peer = ID(msg.peer.id)
            before = {id(c.muxed_conn) for c in network.get_connections(peer)}
            await self.handle_incoming_connection(metered, msg.peer.id)  # type: ignore[arg-type]
        except Exception as exc:
            log.debug("relayed connection not accepted: %s", exc)
            with contextlib.suppress(Exception):
                await self._send_stop_status(stream, StatusCode.CONNECTION_FAILED, str(exc))
                await self._close_stream(stream)
            return
        if self._admit is None:
            return
        # The relayed connection passes the inbound connection budgets as a direct one
        # does, under the relay's IP; this stream carries it, and so holds its slot.
        address = stream.muxed_conn.get_remote_address()
        ip = str(address[0]) if address else "?"
        for conn in list(network.get_connections(peer)):
            if id(conn.muxed_conn) not in before and not conn.muxed_conn.is_initiator:
                await self._admit(conn.muxed_conn, ip)

    def _peer_bytes(self, peer: ID) -> _HourlyBytes:
        found = self.bytes_by_peer.get(peer)
        if found is None:
            found = self.bytes_by_peer[peer] = _HourlyBytes()
        return found

    async def _relay_data(
        self,
        src_stream: INetStream,
        dst_stream: INetStream,
        peer_id: ID,
        deadline: float | None = None,
        circuit_data_limit: list[int] | None = None,
    ) -> None:
        # Count what passes, by the peer that sent it, on top of py-libp2p's circuit cap.
        sender = src_stream.muxed_conn.peer_id
        counted = _CountingStream(src_stream, self, sender)
        try:
            await super()._relay_data(counted, dst_stream, peer_id, deadline, circuit_data_limit)  # type: ignore[arg-type]
        finally:
            # One direction ended (its side closed or died, a write timed out, a limit):
            # the circuit ends both ways, so each end sees its relayed connection reset
            # and dials again. py-libp2p's own clean-up is keyed by peer, and missed the
            # circuits of a peer that had more than one: an end kept a connection whose
            # other side was gone (seen after a NAT dropped a provider's mapping).
            for stream in (src_stream, dst_stream):
                with contextlib.suppress(Exception):
                    await stream.reset()

    def count(self, sender: ID, n: int) -> bool:
        """Count ``n`` bytes sent by ``sender``; False once a byte budget is spent."""
        now = time.monotonic()
        s = self.relay_settings
        self.relayed_bytes += n
        self.bytes_total.add(n, now)
        per_peer = self._peer_bytes(sender)
        per_peer.add(n, now)
        if self.bytes_total.total > s.max_bytes_per_h:
            self.refusals[RelayRefusal.BYTES_FULL] += 1
            return False
        if per_peer.total > s.max_peer_bytes_per_h:
            self.refusals[RelayRefusal.PEER_BYTES_FULL] += 1
            return False
        return True

    def usage(self) -> dict[str, tuple[int, int]]:
        s = self.relay_settings
        now = time.monotonic()
        return {
            "relay_reservations": (self.reservations, s.max_reservations),
            "relay_circuits": (self.circuits, s.max_circuits),
            "relay_circuits_per_peer": (
                max(self.circuits_by_peer.values(), default=0),
                s.max_circuits_per_peer,
            ),
            "relay_bytes_per_h": (self.bytes_total.used(now), s.max_bytes_per_h),
        }


class _CountingStream:
    """A stream whose reads are counted against the relay's byte budgets; a read past
    them ends the circuit (py-libp2p's relay loop treats an empty read as its end)."""

    def __init__(self, stream: INetStream, relay: BudgetedRelay, sender: ID) -> None:
        self._stream = stream
        self._relay = relay
        self._sender = sender

    async def read(self, n: int | None = None) -> bytes:
        data = await self._stream.read(n)
        if data and not self._relay.count(self._sender, len(data)):
            log.info("relay ended a circuit of %s: byte budget spent", self._sender)
            return b""
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# A slot for a dial to a peer, held while the dial runs (``OutboundBudget.slot``).
DialSlot = Callable[[ID], AbstractAsyncContextManager[None]]


@contextlib.asynccontextmanager
async def _no_budget(peer: ID) -> AsyncIterator[None]:
    yield


def note_refusal(refused: dict[Any, float], pid: Any, now: float) -> None:
    """Note that ``pid`` refused a reservation (not asked again for ``REFUSED_FOR_S``)
    and forget the refusals that have run out: any number of keys may offer a relay
    and refuse, and the map kept one entry each for as long as the node ran."""
    for old in [p for p, until in refused.items() if until <= now]:
        del refused[old]
    refused[pid] = now + REFUSED_FOR_S


class RelayClient:
    """A node's reservations on relays, its relayed addresses, and dials through relays
    (each holds a slot of ``dial_slot`` from its start: the outbound connection budget)."""

    def __init__(
        self,
        host: IHost,
        protocol: BudgetedRelay,
        settings: RelaySettings,
        dial_slot: DialSlot = _no_budget,
    ) -> None:
        self._host = host
        self._settings = settings
        self._dial_slot = dial_slot
        self._transport = CircuitV2Transport(host, protocol, RelayConfig())
        self.circuits = protocol.circuit_meters
        # relay peer id -> its addresses (without /p2p), for the relayed addresses
        self.reserved: dict[ID, list[str]] = {}
        # relay peer id -> the muxed connection the reservation was made on: the
        # reservation ends with it, whatever other connection to the relay is open
        self._reserved_on: dict[ID, Any] = {}
        self._refused: dict[ID, float] = {}
        # relay peer id (base58) -> until when this node renews the reservation it
        # held there, which ended with its connection (at most ``reservations``)
        self._renewing: dict[str, float] = {}

    def holds(self, relay: ID) -> bool:
        """Whether this node holds a reservation on ``relay`` (it accepts circuits,
        STOP streams, from it and from no other peer)."""
        return relay in self.reserved

    def keeps(self, peer_id: str) -> bool:
        """Whether this node holds a reservation on ``peer_id``, or held one that ended
        with its connection less than ``RENEW_FOR_S`` ago and renews it once the relay
        is reached again: its addresses and connection slot are kept as a stake's are
        (a relay that restarted was forgotten at its disconnect or at the first failed
        redial, and the node stayed unreachable through it). Any thread."""
        if any(pid.to_base58() == peer_id for pid in list(self.reserved)):
            return True
        return self._renewing.get(peer_id, 0.0) > time.monotonic()

    def _renew(self, pid: ID) -> None:
        """The reservation on ``pid`` ended with its connection: renew it within
        ``RENEW_FOR_S`` (the oldest of those renewed goes past ``reservations``)."""
        self._renewing[pid.to_base58()] = time.monotonic() + RENEW_FOR_S
        while len(self._renewing) > max(self._settings.reservations, 1):
            del self._renewing[min(self._renewing, key=self._renewing.__getitem__)]

    def addrs(self, own_id: str) -> list[str]:
        out = []
        for relay, addrs in self.reserved.items():
            for addr in addrs[:2]:
                out.append(f"{addr}/p2p/{relay.to_base58()}/p2p-circuit/p2p/{own_id}")
        return out

    def _relay_candidates(self) -> list[ID]:
        network = self._host.get_network()
        store = self._host.get_peerstore()
        out = []
        for pid in list(network.connections):
            if pid in self.reserved or self._refused.get(pid, 0) > time.monotonic():
                continue
            with contextlib.suppress(Exception):
                if HOP_PROTOCOL in store.get_protocols(pid) and self._direct_addrs(pid):
                    out.append(pid)
        return out

    def _direct_addrs(self, pid: ID) -> list[str]:
        """Where we reach ``pid`` directly: the remote end of our connection to it."""
        out = []
        for conn in self._host.get_network().get_connections(pid):
            with contextlib.suppress(Exception):
                for addr in conn.get_transport_addresses():
                    text = str(addr)
                    if not is_relayed(text) and "/p2p/" not in text:
                        out.append(text)
        return list(dict.fromkeys(out))

    async def keep_reservations(self, wanted: Any) -> None:
        """While ``wanted()`` (the node is not publicly reachable), hold reservations on
        up to ``reservations`` relays among connected peers. A reservation whose
        connection closed is dropped, and made again at once if the relay is connected
        anew: checking only for *a* connection to the relay missed a redial that came
        before this loop looked (the relay ends the reservation with its connection,
        so the node stayed unreachable through it)."""
        while True:
            if wanted():
                for pid in list(self.reserved):
                    if not _still_open(self._host, pid, self._reserved_on.get(pid)):
                        log.info(
                            "relay %s: the connection the reservation was made on closed; "
                            "its relayed address is dropped",
                            pid,
                        )
                        del self.reserved[pid]
                        self._reserved_on.pop(pid, None)
                        self._renew(pid)
                missing = self._settings.reservations - len(self.reserved)
                for pid in self._relay_candidates()[: max(missing, 0)]:
                    await self._reserve(pid)
            elif self.reserved or self._renewing:
                self.reserved.clear()
                self._reserved_on.clear()
                self._renewing.clear()
            await trio.sleep(RESERVE_EVERY_S)

    async def _reserve(self, pid: ID) -> None:
        addrs = self._direct_addrs(pid)
        conn = None
        try:
            with trio.fail_after(RESERVE_TIMEOUT_S):
                stream = await self._host.new_stream(pid, [HOP_PROTOCOL])
                conn = stream.muxed_conn
                ok = await self._transport._make_reservation(stream, pid)
                with contextlib.suppress(Exception):
                    await stream.close()
        except Exception as exc:
            log.debug("no reservation on %s: %s", pid, exc)
            ok = False
        if ok:
            self.reserved[pid] = addrs
            self._reserved_on[pid] = conn
            self._renewing.pop(pid.to_base58(), None)
            log.info("reserved a relay slot on %s", pid)
        else:
            note_refusal(self._refused, pid, time.monotonic())

    def slot(self, pid: ID) -> AbstractAsyncContextManager[None]:
        """The outbound connection slot a dial of ``pid`` holds (``dial_slot``): held
        around a dial, the dials inside (direct, through a relay) take no other."""
        return self._dial_slot(pid)

    async def dial(self, pid: ID, circuit_addrs: list[Any]) -> multiaddr.Multiaddr:
        """Connect to ``pid`` through the first relayed address that works and return
        it; raise with the relay's reason when none does."""
        reasons = []
        async with self._dial_slot(pid):  # outbound_full raises here, with its reason
            for addr in circuit_addrs:
                text = str(addr)
                if not text.endswith(f"/p2p/{pid.to_base58()}"):
                    text = f"{text}/p2p/{pid.to_base58()}"
                try:
                    await self._connect(multiaddr.Multiaddr(text), pid)
                    return addr
                except RelayConnectionError as exc:
                    reasons.append(STATUS_REASON.get(exc.status_code, str(exc)))
                except Exception as exc:
                    reasons.append(str(exc))
        raise ConnectionError(
            f"no relay reached {pid.to_base58()}: {'; '.join(reasons) or 'no relayed address'}"
        )

    async def _connect(self, addr: multiaddr.Multiaddr, pid: ID) -> None:
        """CONNECT through the relay of ``addr`` as py-libp2p's transport does, keeping
        the limit the relay answers with, and the circuit metered."""
        relay_addr, _ = self._transport.parse_circuit_ma(addr)
        relay = ID.from_base58(str(relay_addr.get_peer_id()))
        await self._host.connect(PeerInfo(relay, [relay_addr]))
        stream = await self._host.new_stream(relay, [HOP_PROTOCOL])
        try:
            connect = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=pid.to_bytes()))
            await write_delimited_msg(stream, connect)
            with trio.fail_after(CONNECT_TIMEOUT_S):
                resp = await read_delimited_msg(stream, HopMessage)
            status = StatusCode(resp.status) if resp.HasField("status") else StatusCode.OK
            if status != StatusCode.OK:
                raise RelayConnectionError(f"the relay answered {status}", status_code=status)
            circuit = _circuit_of(relay, pid, resp.limit if resp.HasField("limit") else None)
            where = multiaddr.Multiaddr(f"/p2p/{relay.to_base58()}/p2p-circuit/p2p/{pid}")
            raw = RawConnection(
                _MeteredStream(stream, circuit, self.circuits),  # type: ignore[arg-type]
                initiator=True,
                connection_type=ConnectionType.RELAYED,
                addresses=[where],
            )
            self.circuits.add(circuit)
            await self._host.upgrade_outbound_connection(raw, pid)
        except BaseException:
            with contextlib.suppress(Exception):
                await stream.reset()
            raise

    def room(self, pid: ID) -> tuple[int, int] | None:
        """(limit, bytes left) of the newest relayed connection to ``pid``, or None
        when none is open or its relay set no byte limit."""
        circuit = self.circuits.newest(pid)
        left = None if circuit is None else circuit.room()
        return None if circuit is None or left is None else (circuit.limit_bytes, left)
