"""py-libp2p's peerstore, bounded so that a flood of keys cannot push out what matters.

py-libp2p 0.8 keeps at most ``max_peers`` entries (addresses, public key, protocols
of each peer; 1,000 by default) and, past it, dropped the entries without addresses
first, then the oldest. Every key that connects with listen addresses (identify
keeps them 2 h) makes an entry, none is dropped when the key leaves, and the first
entry without addresses is the host's own (its key pair, which identify and signed
peer records read): past the bound it went first, and every identify after it
failed. Then the peers inserted first went, those the node works with among them,
and a peer whose connection had dropped could no longer be dialed ("no known
address"). Here the host itself, a connected peer and a peer the node has a stake
in (``keep``) are never dropped; next, peers heard lately through their signed
heartbeats (``heard``: alive in the peers table, those known the longest first, at
most ``max_heard`` of them) go only once no other entry is left to drop; among the
others, those without addresses go first, then those whose addresses expired, then
those identified the longest ago. Past the bound it drops down to ``SLACK`` below it
at once, so the sort (and the stake asked of each entry) is paid once per
``max_peers * SLACK`` new keys, not for each. If every entry is kept the store stays
over its bound: the connections and stakes that keep them have budgets of their own.

A peer that leaves is forgotten at once (``forget``) unless it is one of those kept
or heard: py-libp2p's auto-connector dials every peer it holds addresses of, so a
fresh key that connected once was dialed again and again (every 5 s to 300 s) until
its addresses expired 2 h later. py-libp2p's own cleanup (``start_cleanup_task``)
drops the entries whose addresses expired, the kept and heard ones aside. See
specs/security.md, "Budgets and priority".
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from libp2p.peer.id import ID
from libp2p.peer.peerdata import PeerData
from libp2p.peer.peerstore import PeerStore

log = logging.getLogger("dms.network")

MAX_PEERS = 1000  # NetworkSettings.max_peerstore_peers: py-libp2p's own default
MAX_HEARD = 500  # NetworkSettings.max_peerstore_heard_peers
MAX_RECORDS = 2000  # signed peer records (py-libp2p's default)
SLACK = 0.1  # of max_peers: dropped past the bound, beyond the one entry over it
CLEANUP_S = 60  # how often entries whose addresses expired are dropped


def _keep_none(peer: ID) -> bool:
    return False


def _heard_none() -> list[str]:
    return []


class BoundedPeerStore(PeerStore):
    """A ``PeerStore`` whose eviction spares the host, connected and staked peers, and
    peers heard lately ahead of fresh keys; it forgets an unknown peer that leaves."""

    def __init__(
        self, max_peers: int = MAX_PEERS, max_heard: int = MAX_HEARD, max_records: int = MAX_RECORDS
    ) -> None:
        super().__init__(max_records=max_records, max_peers=max_peers)
        self.max_heard = max_heard
        # Set once the host runs: whether a peer's entry must stay (see the module), and
        # the peers heard lately through heartbeats, those known the longest first.
        self.keep: Callable[[ID], bool] = _keep_none
        self.heard: Callable[[], list[str]] = _heard_none
        self.local: ID | None = None

    def size(self) -> int:
        """Entries held now (safe from another thread: one ``len``)."""
        return len(self.peer_data_map)

    def heard_now(self) -> set[str]:
        """The peers heard lately that outrank fresh keys: at most ``max_heard``."""
        return set(self.heard()[: self.max_heard])

    def _spared(self, peer: ID) -> bool:
        return peer == self.local or self.keep(peer)

    def _drop(self, peer: ID) -> None:
        self.peer_record_map.pop(peer, None)
        self.peer_data_map.pop(peer, None)

    def forget(self, peer: ID) -> bool:
        """Drop the entry of ``peer``, which has just left, unless it is kept or heard
        lately (those are dialed again); returns whether it was dropped."""
        if peer not in self.peer_data_map or self._spared(peer):
            return False
        if peer.to_base58() in self.heard_now():
            return False
        self._drop(peer)
        return True

    def _cleanup_expired_records(self) -> None:
        """py-libp2p's cleanup (``start_cleanup_task``, a task of the host: an exception
        here would end it), sparing what the eviction spares."""
        try:
            heard = self.heard_now()
            expired = [
                peer
                for peer, data in self.peer_data_map.items()
                if data.is_expired() and not self._spared(peer) and peer.to_base58() not in heard
            ]
            for peer in expired:
                self._drop(peer)
            self._enforce_record_limit()
            self._enforce_peer_limit()
        except Exception:
            log.warning("the peerstore's cleanup failed; it runs again later", exc_info=True)

    def _enforce_peer_limit(self) -> None:
        if len(self.peer_data_map) <= self.max_peers:
            return
        over = len(self.peer_data_map) - self.max_peers + int(self.max_peers * SLACK)
        heard = self.heard_now()

        def order(item: tuple[ID, PeerData]) -> tuple[bool, bool, bool, int]:
            peer, data = item
            return (
                peer.to_base58() in heard,
                bool(data.get_addrs()),
                not data.is_expired(),
                data.get_last_identified(),
            )

        candidates = sorted(
            (item for item in self.peer_data_map.items() if not self._spared(item[0])),
            key=order,
        )
        # A peer heard lately goes only to bring the store back to its bound, not for
        # the slack below it.
        fresh = sum(1 for peer, _ in candidates if peer.to_base58() not in heard)
        if fresh < over:
            over = max(fresh, len(self.peer_data_map) - self.max_peers)
        for peer, _ in candidates[:over]:
            self._drop(peer)
