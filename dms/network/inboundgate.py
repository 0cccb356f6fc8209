"""Inbound connections: how many this host holds, and who goes when full.

:class:`InboundGate` stands in place of py-libp2p's inbound limiter, which kept each
inbound slot until the host stopped, so 250 connections over a node's life, however
short, locked every newcomer out; connections that arrive through a relay pass it
too, under the relay's IP. Raw sockets still in their handshake are bounded per IP
and in total and have a deadline; the oldest handshake goes first when full.
Established inbound connections are bounded in total, per IP and per /24 (IPv6:
/64) subnet (:func:`subnet_of`); when one of these is full, the unknown peer idle
the longest in that scope is evicted for the newcomer, and a peer the node has a
stake in (``stake``) is never evicted. The budgets' shared terms, and the others:
``dms.network.budgets``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IMuxedConn
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID

from dms.network.budgets import Budget, Stake
from dms.network.settings import NetworkSettings

log = logging.getLogger("dms.network")


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
        except Exception as exc:
            log.debug("inbound connection from %s failed: %s", ip, exc)
        else:
            if conn is None:  # counted and said as a TCP socket's unfinished upgrade is
                self.refusals[Budget.HANDSHAKE_TIMEOUT] += 1
                log.info(
                    "QUIC connection from %s closed: handshake_timeout: not started within "
                    "%g s (handshake_timeout_s)",
                    ip,
                    self.settings.handshake_timeout_s,
                )
        if conn is None:
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
