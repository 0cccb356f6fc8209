"""Peers this node has a stake in: they keep their share when a budget is full.

A key is free, so a budget shared by every peer is filled by whoever makes the
most keys. The admission budgets (``dms.actor.admission``) and the bid index
(``dms.provider.bidindex``) give peers without a stake only part of each
global budget; the peers in this book keep the rest. A peer is in it when it
holds or held an allocation here (its requester committed a lease and
allocated it: a real job, read from the ledger at start and noted at each
allocate), when this node placed work on it, or when its key is a root of this
node's trust anchors. Bounded: the ``capacity`` most recent peers are kept.
See ``specs/security.md``, "Global budgets".
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

from dms.security.identity import IdentityError, public_key_from_peer_id

CAPACITY = 4096


class StakeBook:
    """Any thread may read it (``peer in book``) and note a stake."""

    def __init__(
        self, capacity: int = CAPACITY, is_root: Callable[[bytes], bool] | None = None
    ) -> None:
        self.capacity = capacity
        self._is_root = is_root
        self._lock = threading.Lock()
        self._peers: OrderedDict[str, str] = OrderedDict()  # peer -> why, oldest first

    def note(self, peer: str, why: str) -> None:
        """This node has a stake in ``peer`` now (``why``: allocation, placed, ...)."""
        with self._lock:
            self._peers.pop(peer, None)
            self._peers[peer] = why
            while len(self._peers) > self.capacity:
                self._peers.popitem(last=False)

    def note_all(self, peers: Iterable[str], why: str) -> None:
        for peer in peers:
            self.note(peer, why)

    def __contains__(self, peer: object) -> bool:
        if not isinstance(peer, str):
            return False
        with self._lock:
            if peer in self._peers:
                return True
        if self._is_root is None:
            return False
        try:
            return self._is_root(public_key_from_peer_id(peer))
        except IdentityError:
            return False

    def why(self, peer: str) -> str | None:
        with self._lock:
            return self._peers.get(peer)

    def __len__(self) -> int:
        with self._lock:
            return len(self._peers)
