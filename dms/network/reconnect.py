"""Which of the peers a node dials at start (bootstrap, remembered) it dials now.

The node dials its bootstrap and remembered peers (the peer book: up to 1,024, half
of them peers it has no stake in) at start and again while they are disconnected.
It dialed every one of them at once, every ``reconnect_interval_s`` (10 s), each
within ``dial_timeout_s``: a peer book whose peers' addresses no longer answer (keys
that came and went; a requester the node once sent a bid to) had the node hold one
outbound connection slot per peer for 5 s of every 10, up to all of
``max_outbound_connections``, and a dial of any other peer (a provider a placement
asks for a bid) was refused ``outbound_full`` meanwhile. Now, beside the per-peer
rule a global one: at most :func:`at_once` of these dials are in flight (bootstrap
peers first), and a remembered peer whose dial failed waits longer each time
(``reconnect_interval_s``, doubling, up to ``RECONNECT_MAX_S``); a bootstrap peer,
the operator's, is dialed again every ``reconnect_interval_s`` as before. See
specs/network.md, "Discovery", and specs/security.md, "Global budgets", the peer
book.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from dms.backoff import Backoff
from dms.network.settings import NetworkSettings, parse_multiaddr

log = logging.getLogger("dms.network")

# Reconnect dials in flight at once, at most (and at most a quarter of the outbound
# connection budget, so they never fill it).
RECONNECT_AT_ONCE = 16
# The longest a remembered peer whose dials keep failing waits between two.
RECONNECT_MAX_S = 600.0


def at_once(settings: NetworkSettings) -> int:
    return max(1, min(RECONNECT_AT_ONCE, settings.max_outbound_connections // 4))


def targets(bootstrap: list[str], remembered: list[str], own: str) -> list[PeerInfo]:
    """One ``PeerInfo`` a peer, with all its addresses, bootstrap peers first, each list
    in its order; addresses without ``/p2p/`` are logged and left out."""
    by_peer: dict[ID, PeerInfo] = {}
    for text in [*bootstrap, *remembered]:
        try:
            info = info_from_p2p_addr(parse_multiaddr(text))
        except Exception:
            log.warning("ignoring peer address without /p2p/: %s", text)
            continue
        if info.peer_id.to_base58() == own:
            continue
        known = by_peer.get(info.peer_id)
        if known is None:
            by_peer[info.peer_id] = info
        else:
            known.addrs.extend(a for a in info.addrs if a not in known.addrs)
    return list(by_peer.values())


@dataclass
class Reconnects:
    """When each peer dialed at start may be dialed again (trio's clock)."""

    settings: NetworkSettings
    bootstrap: set[ID]
    _failures: Counter[ID] = field(default_factory=Counter)
    _due: dict[ID, float] = field(default_factory=dict)

    def due(self, peer: ID, now: float) -> bool:
        return self._due.get(peer, float("-inf")) <= now

    def connected(self, peer: ID) -> None:
        """``peer`` is connected (this node's dial, or the peer's own: a remembered
        peer that came back and dialed this node): dialed as soon as it drops, its
        back-off forgotten."""
        self._failures.pop(peer, None)
        self._due.pop(peer, None)

    def ended(self, peer: ID, connected: bool, now: float) -> None:
        """A dial of ``peer`` ended: connected, it may be dialed as soon as it drops;
        failed, not before its back-off."""
        if connected:
            self.connected(peer)
            return
        self._failures[peer] += 1
        interval = self.settings.reconnect_interval_s
        wait = (
            interval
            if peer in self.bootstrap
            else Backoff(interval, max(interval, RECONNECT_MAX_S)).delay(self._failures[peer] - 1)
        )
        self._due[peer] = now + wait
