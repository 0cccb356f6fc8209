"""Which of a peer's addresses a dial tries, in what order, and how it staggers them.

py-libp2p 0.8.1's ``Swarm.dial_peer`` ranks a peer's addresses by transport class
(QUIC, WebRTC, TCP, WS) and dials the first of each class, two at most: a peer that
advertises two TCP addresses is dialed on its first alone. A machine often has several
addresses of one class (Wi-Fi and Ethernet, Docker's bridge, a VPN, IPv4 and IPv6), and
the first it lists need not be one this node can reach: the direct connection never
happened. :func:`dial_peer` (installed by ``libp2p_patches.dial``) keeps
everything else py-libp2p's does (the negative cache, a connection reused, one dial a
peer at a time, the connection gate, its filters, the global bound of 32 addresses
dialed at once (handed out fairly: ``dms.network.dialslots``), each address's retries,
the per-peer connection cap, its metrics) and dials up to
``MAX_DIAL_ADDRS`` addresses (``MAX_DIAL_ADDRS_PER_HOST`` of one host), ranked by
:func:`ranked`: the first of each transport class at once, as before, and each next one
``STAGGER_S`` after the one before it or as soon as a dial fails (happy eyeballs, RFC
8305), until one connects; the others in flight are then cancelled. See
specs/network.md, "py-libp2p corrections", and specs/security.md, "Addresses a peer
advertises".
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

import trio
from libp2p.exceptions import MultiError
from libp2p.metrics.swarm import SwarmEvent
from libp2p.network.exceptions import SwarmDialAllFailedError, SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError
from libp2p.utils.address_validation import (
    has_public_ipv6,
    is_public_ipv6_address,
    is_relay_address,
)
from multiaddr import Multiaddr

from dms.network.admission import admit, remember, worked_for
from dms.network.dialslots import slots_for
from dms.network.interfaces import IPInterface, interface_networks

log = logging.getLogger("dms.network")

# Addresses of one peer a dial tries, at most: a peer may advertise up to 1,000
# (py-libp2p's identify keeps that many), and each dial is a socket, a slot of the
# swarm's 32 dials in flight, and a packet to whatever host the address names.
MAX_DIAL_ADDRS = 8
# Addresses of one host (one IP, or one name) a dial tries, at most: a peer's TCP and
# QUIC ports. A peer advertising one victim's IP on many ports would otherwise have
# every node that dials it send the victim MAX_DIAL_ADDRS connection attempts (each
# with the swarm's retries) a dial: with this, 2, as py-libp2p's dial of two
# addresses at most did.
MAX_DIAL_ADDRS_PER_HOST = 2
# How long a dial gives an address before it starts the next (unless one fails
# sooner): RFC 8305's recommended connection attempt delay, go-libp2p's for public TCP.
STAGGER_S = 0.25

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# Transport classes, py-libp2p's order (go-libp2p's): QUIC, WebRTC, TCP, WS, relay.
_QUIC, _WEBRTC, _TCP, _WS, _RELAY, _OTHER = range(6)
# Scopes, the order a dial tries them in (after the address that connected last).
ON_LINK, PUBLIC, PRIVATE, OTHER = range(4)


def transport_class(addr: Multiaddr) -> int:
    """py-libp2p's transport priority (``Swarm.dial_peer``'s ``_transport_priority``)."""
    protos = {p.name for p in addr.protocols()}
    if "quic-v1" in protos or "quic" in protos:
        return _QUIC
    if "webrtc-direct" in protos or "webrtc" in protos:
        return _WEBRTC
    if "tcp" in protos and "ws" not in protos and "wss" not in protos:
        return _TCP
    if "ws" in protos or "wss" in protos:
        return _WS
    if "p2p-circuit" in protos:
        return _RELAY
    return _OTHER


def ip_of(addr: Multiaddr) -> IPAddress | None:
    for proto in ("ip4", "ip6"):
        with contextlib.suppress(Exception):
            return ipaddress.ip_address(addr.value_for_protocol(proto))
    return None


def port_of(addr: Multiaddr) -> str | None:
    for proto in ("tcp", "udp"):
        with contextlib.suppress(Exception):
            return str(addr.value_for_protocol(proto))
    return None


def reaches_this_host(addr: Multiaddr, own_ips: set[IPAddress], own_ports: set[str]) -> bool:
    """An address a dial from here lands on this very host: loopback, the unspecified
    address (0.0.0.0, ``::``: what a node listening on every interface advertises), or
    one of this host's own IPs on a port it listens on (a peer and this node both on
    Docker's 172.17.0.1:9000). Dialed, it reaches this node, or another on this machine,
    and py-libp2p then clears the peer's addresses ("Peer ID mismatch")."""
    ip = ip_of(addr)
    if ip is None:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    return ip in own_ips and port_of(addr) in own_ports


def scope(addr: Multiaddr, networks: Iterable[IPInterface]) -> int:
    """Where ``addr`` is as seen from here: on one of this host's own networks (on-link),
    public, private (RFC 1918, ULA, CGNAT: reachable over a VPN or a route, often not),
    or other (link-local, reserved, a name). An order only: the first 8 are dialed."""
    ip = ip_of(addr)
    if ip is None:
        return OTHER
    if any(ip in net.network and ip != net.ip for net in networks if net.version == ip.version):
        return ON_LINK
    if ip.is_global:
        return PUBLIC
    if ip.is_private and not ip.is_link_local:
        return PRIVATE
    if ip.version == 4 and ip in ipaddress.ip_network("100.64.0.0/10"):
        return PRIVATE
    return OTHER


def host_of(addr: Multiaddr) -> str:
    """The host ``addr`` names: its IP, or its DNS name (``/dns4/example.com/...``), or
    the address itself when it names neither."""
    ip = ip_of(addr)
    if ip is not None:
        return str(ip)
    for proto in ("dns", "dns4", "dns6", "dnsaddr"):
        with contextlib.suppress(Exception):
            return f"{proto}:{addr.value_for_protocol(proto)}"
    return str(addr)


def per_host(addrs: list[Multiaddr], limit: int = MAX_DIAL_ADDRS_PER_HOST) -> list[Multiaddr]:
    """``addrs`` in their order, at most ``limit`` of each host (:func:`host_of`)."""
    seen: dict[str, int] = {}
    out: list[Multiaddr] = []
    for addr in addrs:
        host = host_of(addr)
        if seen.get(host, 0) < limit:
            seen[host] = seen.get(host, 0) + 1
            out.append(addr)
    return out


def ranked(
    addrs: list[Multiaddr],
    networks: Iterable[IPInterface] = (),
    worked: Multiaddr | None = None,
) -> list[Multiaddr]:
    """``addrs`` in the order a dial tries them: the one that connected last, then by
    :func:`scope`, then by transport class; the peer's own order among equals."""
    nets = list(networks)
    return sorted(
        addrs,
        key=lambda a: (a != worked, scope(a, nets), transport_class(a)),
    )


def _own_endpoints(swarm: Any) -> tuple[set[IPAddress], set[str]]:
    """This host's IPs and the ports it listens on."""
    ips = {net.ip for net in interface_networks()}
    ports: set[str] = set()
    for listener in list(getattr(swarm, "listeners", {}).values()):
        with contextlib.suppress(Exception):
            for addr in listener.get_addrs():
                port = port_of(addr)
                if port is not None:
                    ports.add(port)
                ip = ip_of(addr)
                if ip is not None and not ip.is_unspecified:
                    ips.add(ip)
    return ips, ports


async def candidates(swarm: Any, peer_id: ID) -> list[Multiaddr]:
    """The peer's addresses a dial may try: py-libp2p's filters, in its order (the
    connection gate, loopback only when nothing else, no relayed address, no public
    IPv6 without one here, a transport that dials it), with the unspecified address and
    this host's own endpoints counted as loopback is."""
    try:
        addrs = swarm.peerstore.addrs(peer_id)
    except PeerStoreError as error:
        raise SwarmException(f"No known addresses to peer {peer_id}") from error
    if not addrs:
        raise SwarmException(f"No known addresses to peer {peer_id}")
    gate = swarm.connection_gate
    allowed: list[Multiaddr] = [a for a in addrs if await gate.is_allowed(a)]
    if not allowed:
        raise SwarmException(f"All addresses for peer {peer_id} blocked by connection gate")
    own_ips, own_ports = _own_endpoints(swarm)
    elsewhere = [a for a in allowed if not reaches_this_host(a, own_ips, own_ports)]
    if elsewhere:
        allowed = elsewhere
    allowed = [a for a in allowed if not is_relay_address(a)]
    if not allowed:
        raise SwarmException(
            f"All addresses for peer {peer_id} are unusable "
            "(relay-only or blocked by connection gate)"
        )
    if not has_public_ipv6():
        allowed = [a for a in allowed if not is_public_ipv6_address(a)]
        if not allowed:
            raise SwarmException(
                f"All addresses for peer {peer_id} require public IPv6 "
                "but the host has no public IPv6"
            )

    def supported(addr: Multiaddr) -> bool:
        try:
            return swarm.transport_manager.transport_for_dialing(addr) is not None
        except Exception:
            return False

    allowed = [a for a in allowed if supported(a)]
    if not allowed:
        raise SwarmException(f"No supported transport found for peer {peer_id} addresses")
    return allowed


def schedule(addrs: list[Multiaddr]) -> tuple[list[Multiaddr], list[Multiaddr]]:
    """(dialed at once: the first of each transport class, as py-libp2p did; then the
    rest, one after another)."""
    first: list[Multiaddr] = []
    rest: list[Multiaddr] = []
    classes: set[int] = set()
    for addr in addrs:
        cls = transport_class(addr)
        (rest if cls in classes else first).append(addr)
        classes.add(cls)
    return first, rest


async def dial_peer(self: Any, peer_id: ID) -> list[Any]:
    """py-libp2p's ``Swarm.dial_peer`` (0.8.1), dialing up to ``MAX_DIAL_ADDRS`` of the
    peer's addresses (:func:`ranked`) where it dialed one a transport class."""
    event = SwarmEvent()
    event.peer_id = peer_id.pretty()
    event.dial_attempt = True
    if self.metric_send_channel is not None:
        await self.metric_send_channel.send(event)

    if self._negative_peer_cache.is_blocked(str(peer_id)):
        raise SwarmException(f"Peer {peer_id} recently failed all addresses (negative cache)")

    def open_connections() -> list[Any]:
        return [c for c in self.get_connections(peer_id) if not c.is_closed]

    if existing := open_connections():
        return existing
    if peer_id in self._ongoing_dials:
        await self._ongoing_dials[peer_id].wait()
        if existing := open_connections():
            return existing

    dial_event = trio.Event()
    self._ongoing_dials[peer_id] = dial_event
    try:
        worked = worked_for(self).get(peer_id)
        addrs = per_host(ranked(await candidates(self, peer_id), interface_networks(), worked))
        if len(addrs) > MAX_DIAL_ADDRS:
            log.debug("peer %s: %d addresses, dialing %d", peer_id, len(addrs), MAX_DIAL_ADDRS)
            addrs = addrs[:MAX_DIAL_ADDRS]
        preferred = admit(self, peer_id)
        connections, exceptions = await _dial_staggered(self, peer_id, addrs, preferred)

        if not connections:
            event = SwarmEvent()
            event.peer_id = peer_id.pretty()
            event.dial_attempt_error = True
            if self.metric_send_channel is not None:
                await self.metric_send_channel.send(event)
            self._negative_peer_cache.mark_failed(str(peer_id))
            raise SwarmDialAllFailedError(
                f"unable to connect to {peer_id}, no addresses established a "
                "successful connection (with exceptions)",
                peer_id=peer_id,
                num_addrs_tried=len(exceptions),
            ) from MultiError(exceptions)

        max_conns = self.connection_config.max_connections_per_peer
        for extra in connections[max_conns:]:
            with contextlib.suppress(Exception):
                await extra.close()
        self._negative_peer_cache.evict(str(peer_id))
        return connections[:max_conns]
    finally:
        dial_event.set()
        self._ongoing_dials.pop(peer_id, None)


async def _dial_staggered(
    swarm: Any, peer_id: ID, addrs: list[Multiaddr], preferred: bool
) -> tuple[list[Any], list[Exception]]:
    """Dial ``addrs`` as :func:`schedule` says, each next one ``STAGGER_S`` after the one
    before or once a dial in flight fails, until one connects; then cancel the rest.
    ``preferred``: its addresses go first for a slot (``DialSlots``)."""
    connections: list[Any] = []
    exceptions: list[Exception] = []
    first, rest = schedule(addrs)
    failed = trio.Event()
    slots = slots_for(swarm)

    async def dial(addr: Multiaddr, nth: int) -> None:
        connection = None
        try:
            async with slots.slot(preferred, nth) as attempt:
                with attempt.scope:
                    connection = await swarm._dial_with_retry(addr, peer_id)
                if connection is None:  # cancelled to give its slot up (DialSlots)
                    raise SwarmException(
                        f"{addr}: no connection within {slots.hold_s:g} s while "
                        "other dials waited for a slot"
                    )
        except Exception as exc:
            exceptions.append(exc)
            log.debug("dial of %s at %s failed: %s", peer_id, addr, exc)
            failed.set()
            return
        connections.append(connection)
        remember(swarm, peer_id, addr)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for nth, addr in enumerate(first):
            nursery.start_soon(dial, addr, nth)
        for nth, addr in enumerate(rest, start=len(first)):
            with trio.move_on_after(STAGGER_S):
                await failed.wait()
            failed = trio.Event()
            nursery.start_soon(dial, addr, nth)
    return connections, exceptions
