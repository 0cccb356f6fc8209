"""Requesters that commit leases and never allocate them, and how long each waits.

A commit that no allocate follows holds a provider's resources until
``allocate_within_s`` releases them; a requester that does it on purpose holds the
node again at once. An honest requester allocates right after its commit, so each
lapse costs the peer a cool-down in which this node makes it no bids: ``base_s``
after the first, doubling with each further lapse up to ``max_s``. Bounded: at most
``capacity`` peers are remembered (the oldest lapse is forgotten first), and a peer
whose cool-down is long over starts again from nothing.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from dms.backoff import Backoff


@dataclass
class Lapse:
    count: int
    until: float  # no bids before this (monotonic seconds)


class Lapses:
    def __init__(
        self,
        base_s: float,
        max_s: float = 3600.0,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_s, self.max_s, self.capacity, self.clock = base_s, max_s, capacity, clock
        self.backoff = Backoff(first_s=base_s, max_s=max_s)
        self._peers: OrderedDict[str, Lapse] = OrderedDict()
        self._lock = threading.Lock()  # noted from timers, read in the node's handlers

    def note(self, peer: str) -> float:
        """``peer`` let a committed lease lapse; returns its cool-down in seconds."""
        if self.base_s <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            last = self._peers.pop(peer, None)
            # Forgiven once its last cool-down has been over for max_s.
            fresh = last is None or now > last.until + self.max_s
            count = 1 if fresh or last is None else last.count + 1
            wait = self.backoff.delay(count - 1)
            self._peers[peer] = Lapse(count, now + wait)
            while len(self._peers) > self.capacity:
                self._peers.popitem(last=False)
        return wait

    def waiting(self, peer: str) -> float:
        """Seconds ``peer`` must still wait for a bid; 0 if none."""
        with self._lock:
            lapse = self._peers.get(peer)
        return max(0.0, lapse.until - self.clock()) if lapse else 0.0
