"""Reachability: is this node publicly reachable? (AutoNAT, confirmed by peers dialing back.)

py-libp2p 0.8.1's ``AutoNATService`` (``/libp2p/autonat/1.0.0``) answers a dial-back
request with ``host.connect``, which returns the connection the asking peer already
holds: every peer would be told it is public. :class:`DialBack` dials a fresh TCP
connection to each advertised address instead (only addresses on the IP the request
came from, as the spec says, so a node cannot be used to dial third parties), and
closes it at once: reaching the port is the proof.

A node asks its connected peers (at most ``ASK_PEERS`` at a time) soon after it
connects and then every ``RECHECK_S``. Peers on ``CONFIRMATIONS`` (2) distinct
networks that reached it make it ``public`` (:func:`network_of`: the /24 of an
IPv4 address, the /48 of an IPv6 one, the address itself on loopback), so one lying
or mistaken peer cannot, nor one attacker with many keys on one machine; short of
that, one peer that failed makes it ``private`` (a NATed node's listen address is
not the IP its peers see, so they refuse to dial it); with fewer confirmations
and no failure it stays ``unknown`` and asks the next peers it connects to, up to
``UNDECIDED_ASKS`` (8) peers, then waits for the recheck as a decided node does:
nodes on one loopback address (a simulation) never reach two networks, and asked
every peer that connected, each a stream and a handshake. A peer that does not
answer gives no verdict (it did not try to dial): it is not asked again until the
next recheck.
``NetworkSettings.reachability`` forces either answer. See specs/network.md,
"Reachability".
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from enum import StrEnum
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService, _addr_ip
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from dms.network.inboundgate import subnet_of
from dms.network.interfaces import interface_networks
from dms.network.relay import relayed_conn

log = logging.getLogger("dms.network")

__all__ = ["AUTONAT_PROTOCOL_ID", "DialBack", "Reachability", "network_of"]

DIAL_BACK_TIMEOUT_S = 3.0
QUERY_TIMEOUT_S = 8.0
ASK_PEERS = 4
FIRST_CHECK_EVERY_S = 1.0
RECHECK_S = 300.0
# Peers asked without a verdict (still unknown) before the check waits for the
# recheck, as a decided one does.
UNDECIDED_ASKS = 8
# Peers on distinct networks (network_of) that must have dialed this node back for
# it to be public.
CONFIRMATIONS = 2
# The network of a peer's address, for CONFIRMATIONS: what one party (a machine, a
# home, a small hosting account) may well hold many addresses of.
V4_PREFIX = 24
V6_PREFIX = 48


def network_of(ip: str) -> str:
    """The network ``ip`` is in, as far as confirmations go: its /24 (IPv4) or /48
    (IPv6). A loopback address stands for itself: every node on one machine is on
    127.0.0.0/8, and tests make peers of distinct networks of 127.0.0.1, 127.0.0.2, ..."""
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(ip).is_loopback:
            return ip
    return subnet_of(ip, V4_PREFIX, V6_PREFIX)


def _this_machine(ip: str) -> bool:
    """Whether ``ip`` is one of this machine's addresses (loopback included)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return address.is_loopback or any(net.ip == address for net in interface_networks())


def _is_loopback(raw: bytes) -> bool:
    with contextlib.suppress(Exception):
        ip = _addr_ip(Multiaddr(raw))
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    return False


class Reachability(StrEnum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


class DialBack(AutoNATService):
    """AutoNAT with a real dial-back, and the node's verdict."""

    def __init__(self, host: IHost, forced: str = "auto") -> None:
        super().__init__(host, serve=True, confirmations=CONFIRMATIONS)  # type: ignore[arg-type]
        self.forced = forced
        self.verdicts: dict[ID, bool] = {}
        # The network each peer that gave a verdict answered from (network_of its
        # direct connection's remote address; None if it had none).
        self.networks: dict[ID, str | None] = {}
        # Peers that did not answer (no verdict): not asked again until the next recheck,
        # so a few silent peers cannot keep the answering ones from being asked.
        self.silent: set[ID] = set()
        self.confirmed_addr: str | None = None
        # Dial-back requests this node sent (for tests and status).
        self.requests = 0
        # The next recheck (trio time) while the check waits for it; None while it
        # asks every FIRST_CHECK_EVERY_S.
        self.rechecking_at: float | None = None
        self.changed = trio.Event()

    @property
    def reachability(self) -> Reachability:
        if self.forced in (Reachability.PUBLIC, Reachability.PRIVATE):
            return Reachability(self.forced)
        confirmed = sum(1 for ok in self.verdicts.values() if ok)
        networks = {self.networks.get(p) for p, ok in self.verdicts.items() if ok}
        networks.discard(None)
        if len(networks) >= CONFIRMATIONS:
            return Reachability.PUBLIC
        if confirmed < len(self.verdicts):  # a peer that could not reach it
            return Reachability.PRIVATE
        return Reachability.UNKNOWN

    def _filter_by_observed_ip(  # type: ignore[override]
        self, addrs: list[bytes], observed_ip: str | None
    ) -> list[bytes]:
        """The asker's addresses on the IP its request came from (py-libp2p's rule: no
        third party is dialed), and, for a request from this very machine through another
        of its addresses, its loopback ones: a node that listens on loopback only and
        reached this one at its LAN address is reachable from here, and is answered as a
        loopback asker is (``_try_dial``: no probe). It was refused, that is judged
        private, and asked every relay for a slot it did not need."""
        kept = AutoNATService._filter_by_observed_ip(addrs, observed_ip)
        if kept or observed_ip is None or not _this_machine(observed_ip):
            return kept
        return [raw for raw in addrs if _is_loopback(raw)]

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs:
            with contextlib.suppress(Exception):
                addr = Multiaddr(raw)
                ip, port = _addr_ip(addr), int(addr.value_for_protocol("tcp"))
                if ip is None:
                    continue
                if ipaddress.ip_address(ip).is_loopback:
                    # Asked from this very machine (a simulation, a test): a dial would
                    # prove nothing, and each one is a socket in the asker's handshake
                    # budget.
                    return bytes(raw)
                with trio.fail_after(DIAL_BACK_TIMEOUT_S):
                    stream = await trio.open_tcp_stream(ip, port)
                await stream.aclose()
                return bytes(raw)
        return None

    def network(self, peer: ID) -> str | None:
        """The network of ``peer``'s address (its direct connection's remote end), or
        None when it has none (through a relay its address is not seen)."""
        for conn in self.host.get_network().get_connections(peer):
            if relayed_conn(conn):
                continue
            with contextlib.suppress(Exception):
                address = conn.muxed_conn.get_remote_address()
                if address:
                    return network_of(str(address[0]))
        return None

    async def ask(self, peer: ID) -> bool | None:
        """Ask ``peer`` to dial this node back; its verdict, or None if it did not answer
        (no verdict: it did not try, so its silence says nothing of this node)."""
        addrs = [
            a.to_bytes()
            for a in self.host.get_addrs()
            if "/p2p-circuit" not in str(a) and _addr_ip(a) not in ("0.0.0.0", "::")
        ]
        self.requests += 1
        try:
            status, addr = await self.query_server(peer, addrs, timeout=QUERY_TIMEOUT_S)
        except Exception as exc:
            log.debug("no dial-back answer from %s: %s", peer, exc)
            return None
        ok = status == int(Message.OK)
        if ok and addr is not None:
            self.confirmed_addr = str(Multiaddr(addr))
        return ok

    async def run(self, peers: Any) -> None:
        """Ask connected peers until there is a verdict, then every ``RECHECK_S``; a
        check still without one after asking ``UNDECIDED_ASKS`` peers waits for the
        recheck too."""
        undecided_asks = 0  # peers asked since the last recheck while unknown
        while True:
            if self.reachability is Reachability.UNKNOWN:
                asked = [p for p in peers() if p not in self.verdicts and p not in self.silent]
                asked = asked[: min(ASK_PEERS, UNDECIDED_ASKS - undecided_asks)]
            else:  # a recheck: fresh verdicts replace the old ones peer by peer
                asked = list(peers())[:ASK_PEERS]
            before = self.reachability
            for peer in asked:
                with contextlib.suppress(Exception):
                    if AUTONAT_PROTOCOL_ID not in self.host.get_peerstore().get_protocols(peer):
                        continue
                undecided_asks += before is Reachability.UNKNOWN
                verdict = await self.ask(peer)
                if verdict is None:
                    self.silent.add(peer)
                else:
                    self.verdicts[peer] = verdict
                    self.networks[peer] = self.network(peer)
            if self.reachability != before:
                log.info("reachability: %s", self.reachability)
                self.changed.set()
                self.changed = trio.Event()
            if self.reachability is Reachability.UNKNOWN and undecided_asks < UNDECIDED_ASKS:
                await trio.sleep(FIRST_CHECK_EVERY_S)
                continue
            if self.reachability is Reachability.UNKNOWN:
                log.info(
                    "reachability: unknown after asking %d peers; asking again in %.0f s",
                    undecided_asks,
                    RECHECK_S,
                )
            self.rechecking_at = trio.current_time() + RECHECK_S
            await trio.sleep(RECHECK_S)
            self.rechecking_at = None
            undecided_asks = 0
            self.silent.clear()
