"""Closing a libp2p host: its connections side by side, then the host.

py-libp2p 0.8's ``Swarm.close`` closes a host's connections one after another,
and each close sleeps 0.2 s (0.1 s in ``Yamux.close``, 0.1 s in
``SwarmConn._cleanup``, to let stream handlers see their resets). A node with
N connections took 0.2 N seconds to leave: 25 connections filled the 5 s it is
given, and a daemon holding its usual 50 left half of them for the kernel to
drop when its process ended, its peers seeing no goodbye on them. Closed side
by side, the sleeps overlap: a host leaves in about 0.2 s whatever it holds.

Before its connections, the host stops taking new ones: a socket its listeners
accept is closed at once (a peer that lost its connection to this node dials it
again at once, and py-libp2p closed the listeners only after the connections: in a
16-node simulation half a stopping node's connections were new ones, closed one by
one again), and a connection that closes starts no dial of its own (py-libp2p's
rule once its close has begun: "disconnects during shutdown must not cause new
dials"). The listeners themselves close only after the connections, in
``Swarm.close``: closing a TCP listener cancels the task holding each inbound
connection it accepted, and trio then closes that socket at once, so every inbound
connection's goodbye (Yamux's GO_AWAY, its streams' resets) went to a closed socket.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from libp2p.io.trio import TrioTCPStream

log = logging.getLogger(__name__)

# A host's goodbye, all of it: connections, listeners, transports.
CLOSE_TIMEOUT_S = 5.0
# A connection still closing this long into its host's close is cut (its socket
# closed; a relayed one's stream to its relay reset):
# its goodbye waits behind a send its peer never takes (a Noise message is sent
# shielded, up to NOISE_SEND_LIMIT_S), and a closed socket ends that send at once.
CLOSE_GRACE_S = 2.0


async def close_host(host: Any, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Stop ``host`` taking connections (a socket accepted is closed at once, no dial
    on a disconnect or from the auto-connector's loop), close every connection it
    holds at once, then ``host`` itself (its listeners and transports; no connection
    left for its own one-by-one loop), all within ``timeout_s``. Never raises: a
    connection that fails to close is logged and the rest go on."""
    swarm = host.get_network()
    with trio.move_on_after(timeout_s) as scope:
        # The instance's own hook, not the class's: py-libp2p skips it once closing.
        swarm._schedule_auto_connect = _no_dial
        # Its periodic dials too (every 10 s below min_connections): stopped only
        # once Swarm.close has stopped the swarm's manager, a tick meanwhile dialed
        # the peerstore's peers from a host closing its connections.
        with contextlib.suppress(Exception):
            await swarm.auto_connector.stop()
        refuse_connections(swarm)
        await close_connections(swarm)
        with contextlib.suppress(Exception):
            await host.close()
    if scope.cancelled_caught:
        left = sum(len(c) for c in host.get_network().connections.values())
        log.warning("host not closed within %g s (%d connections left)", timeout_s, left)


async def close_hosts(hosts: Iterable[Any]) -> None:
    """``close_host`` for each of ``hosts``, side by side (each within its own bound)."""
    async with trio.open_nursery() as nursery:
        for host in hosts:
            nursery.start_soon(close_host, host)


def refuse_connections(swarm: Any) -> None:
    """Stop accepting connections, the established ones left as they are: a socket
    ``swarm``'s listeners accept from now on is closed before its handshake (py-libp2p
    calls the instance's ``_handle_inbound_connection`` for each; a node's own,
    ``InboundGate.handle``, is replaced the same way). The listeners stay open until
    ``Swarm.close``, which closes them after the connections and tells its notifees."""
    swarm._handle_inbound_connection = _refuse


async def _refuse(read_write_closer: Any, maddr: Any) -> None:
    with contextlib.suppress(Exception):
        await read_write_closer.close()


async def close_connections(swarm: Any) -> None:
    """Close every connection ``swarm`` holds, side by side. Each removes itself from
    ``swarm.connections`` and notifies the swarm's notifees as ``Swarm.close`` would."""
    conns = [conn for held in list(swarm.connections.values()) for conn in list(held)]
    if not conns:
        return
    async with trio.open_nursery() as cutter:
        cutter.start_soon(_cut_sockets_after, conns, CLOSE_GRACE_S)
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(_quietly, conn.close, "a connection")
        cutter.cancel_scope.cancel()


async def _cut_sockets_after(conns: list[Any], grace_s: float) -> None:
    """Cut each of ``conns`` still open ``grace_s`` from now (``cut``, side by side): a
    send blocked on it (its peer reads nothing) then ends at once, and its close goes
    on."""
    await trio.sleep(grace_s)
    async with trio.open_nursery() as nursery:
        for conn in conns:
            if not (conn.event_closed.is_set() and conn.muxed_conn.is_closed):
                nursery.start_soon(_cut_logged, conn.muxed_conn)


async def _cut_logged(muxed_conn: Any) -> None:
    if await cut(muxed_conn):
        log.info("a connection cut: its close waited on a send")


async def cut(muxed_conn: Any) -> bool:
    """End every send held on ``muxed_conn`` (a Yamux connection over Noise), shielded
    or not, at once. Direct, its TCP socket is closed. Relayed, the stream to the relay
    it runs over is reset (a send held there waits for that stream's Yamux window, and
    a reset ends the wait); the relay's own connection, which other circuits share, is
    left. False if there is neither (QUIC)."""
    try:
        raw = muxed_conn.secured_conn.conn.read_writer.read_write_closer
    except AttributeError:
        return False
    under = getattr(getattr(raw, "_wrapped", raw), "stream", None)  # a tracked circuit's
    if isinstance(under, TrioTCPStream):
        with contextlib.suppress(Exception):
            under.stream.socket.close()
        return True
    reset = getattr(under, "reset", None)  # a stream to the relay (metered or not)
    if callable(reset):
        with contextlib.suppress(Exception):
            await reset()
        return True
    return False


def _no_dial() -> None:
    """What a stopping host does when a connection closes: no auto-connect dial."""


async def _quietly(close: Callable[[], Awaitable[None]], what: str) -> None:
    try:
        await close()
    except Exception as exc:
        log.debug("closing %s failed: %s", what, exc)
