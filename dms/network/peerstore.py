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
in (``keep``) are never dropped; among the others, those without addresses go
first, then those whose addresses expired, then those identified the longest ago.
Past the bound it drops down to ``SLACK`` below it at once, so the sort (and the
stake asked of each entry) is paid once per ``max_peers * SLACK`` new keys, not for
each. If every entry is kept the store stays over its bound: the connections and
stakes that keep them have budgets of their own. See specs/security.md, "Budgets and
priority".
"""

from __future__ import annotations

from collections.abc import Callable

from libp2p.peer.id import ID
from libp2p.peer.peerdata import PeerData
from libp2p.peer.peerstore import PeerStore

MAX_PEERS = 1000  # NetworkSettings.max_peerstore_peers: py-libp2p's own default
MAX_RECORDS = 2000  # signed peer records (py-libp2p's default)
SLACK = 0.1  # of max_peers: dropped past the bound, beyond the one entry over it


def _keep_none(peer: ID) -> bool:
    return False


class BoundedPeerStore(PeerStore):
    """A ``PeerStore`` whose eviction spares the host, connected and staked peers."""

    def __init__(self, max_peers: int = MAX_PEERS, max_records: int = MAX_RECORDS) -> None:
        super().__init__(max_records=max_records, max_peers=max_peers)
        # Set once the host runs: whether a peer's entry must stay (see the module).
        self.keep: Callable[[ID], bool] = _keep_none
        self.local: ID | None = None

    def size(self) -> int:
        """Entries held now (safe from another thread: one ``len``)."""
        return len(self.peer_data_map)

    def _enforce_peer_limit(self) -> None:
        if len(self.peer_data_map) <= self.max_peers:
            return
        over = len(self.peer_data_map) - self.max_peers + int(self.max_peers * SLACK)

        def order(item: tuple[ID, PeerData]) -> tuple[bool, bool, int]:
            data = item[1]
            return (bool(data.get_addrs()), not data.is_expired(), data.get_last_identified())

        candidates = sorted(
            (
                item
                for item in self.peer_data_map.items()
                if item[0] != self.local and not self.keep(item[0])
            ),
            key=order,
        )
        for peer, _ in candidates[:over]:
            self.peer_record_map.pop(peer, None)
            del self.peer_data_map[peer]
