"""A nonce cache bounded by expiry: an envelope seen once is refused again.

Entries live until the envelope's own expiry; since the pipeline refuses
expiries further than ``max_ttl_s`` away, the cache holds at most the
envelopes of one TTL window.
"""

from __future__ import annotations

import heapq
import threading


class ReplayCache:
    def __init__(self) -> None:
        self._seen: set[tuple[bytes, bytes]] = set()
        self._expiries: list[tuple[int, tuple[bytes, bytes]]] = []
        self._lock = threading.Lock()

    def first_sight(self, signer: bytes, nonce: bytes, expiry: int, now: int) -> bool:
        """Record the nonce; False if this signer already used it."""
        key = (signer, nonce)
        with self._lock:
            while self._expiries and self._expiries[0][0] <= now:
                self._seen.discard(heapq.heappop(self._expiries)[1])
            if key in self._seen:
                return False
            self._seen.add(key)
            heapq.heappush(self._expiries, (expiry, key))
            return True

    def __len__(self) -> int:
        return len(self._seen)
