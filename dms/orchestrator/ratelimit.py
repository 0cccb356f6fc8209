"""A token bucket per peer: how often one peer may ask a provider for something (bid
requests; the frames a peer sends at all are limited below, in ``dms/network``).

Each peer gets ``burst`` requests at once, then ``rate`` a second. The table
is bounded: past ``max_peers`` the peer heard from least recently is forgotten
(it starts again with a full bucket, which costs an attacker a fresh key and a
fresh connection per name).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class PeerRate:
    def __init__(
        self,
        rate: float,
        burst: int,
        max_peers: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.max_peers, self.clock = rate, burst, max_peers, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def allow(self, peer: str) -> bool:
        """Take one token from ``peer``'s bucket; False when it is empty (rate 0: always)."""
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, at = self._buckets.pop(peer, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[peer] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
        return allowed
