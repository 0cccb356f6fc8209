"""Outbound connections: those this host dialed, in all.

:class:`OutboundBudget`: py-libp2p bounded them only by its pruner, past its high
watermark, and a remote party makes a node dial by asking for an answer it must
send elsewhere (a bid for a gossip request). A dial for a peer without a stake is
refused when full; one for a staked peer closes the unknown outbound connection
idle the longest first. The budgets' shared terms, and the others:
``dms.network.budgets``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from libp2p.peer.id import ID

from dms.network.admission import refused_here
from dms.network.budgets import Budget, Stake
from dms.network.loop import NetworkError
from dms.network.settings import NetworkSettings

log = logging.getLogger("dms.network")


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
