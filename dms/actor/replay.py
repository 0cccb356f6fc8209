"""The replay cache: an envelope seen once is refused again, in bounded memory.

Entries are keyed by ``(signer, nonce)`` (a 16-byte digest of the two) and kept
until the envelope's own expiry, in a heap ordered by ``issued_at``. The cache
holds at most ``capacity`` entries. When it is full, the entry issued first is
forgotten and ``floor`` rises to its ``issued_at``: from then on an envelope
issued at or before the floor is refused (``replay_window``), because the cache
can no longer tell whether it saw it. So the bound cannot be used to replay:
whatever the cache forgot is refused, not accepted again.

Expired entries are dropped from the top of the heap as they come (an expired
envelope is refused by its expiry anyway); one that sits behind a longer-lived
entry waits until that one goes, which costs memory within the bound, never a
replay.
"""

from __future__ import annotations

import hashlib
import heapq
import threading

from dms.actor.codes import ErrorCode, Refusal

DEFAULT_CAPACITY = 200_000


def _key(signer: bytes, nonce: bytes) -> bytes:
    return hashlib.blake2b(signer + nonce, digest_size=16).digest()


class ReplayCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("a replay cache holds at least one entry")
        self.capacity = capacity
        self.floor = 0  # unix ns: envelopes issued at or before it are refused
        self._seen: set[bytes] = set()
        self._heap: list[tuple[int, int, bytes]] = []  # (issued_at, expiry, key)
        self._lock = threading.Lock()

    def check(self, signer: bytes, nonce: bytes, issued_at: int, expiry: int, now: int) -> None:
        """Record the envelope, or raise ``Refusal`` (``replayed`` / ``replay_window``)."""
        key = _key(signer, nonce)
        with self._lock:
            heap = self._heap
            while heap and heap[0][1] <= now:
                self._seen.discard(heapq.heappop(heap)[2])
            if issued_at <= self.floor:
                raise Refusal(
                    ErrorCode.REPLAY_WINDOW,
                    "issued before the oldest envelope this node still remembers; send a new one",
                )
            if key in self._seen:
                raise Refusal(ErrorCode.REPLAYED, "nonce already seen from this signer")
            if len(heap) >= self.capacity:
                if issued_at <= heap[0][0]:
                    # Older than all it holds: remembering it would forget a newer one.
                    raise Refusal(
                        ErrorCode.REPLAY_WINDOW,
                        "issued before every envelope this node remembers; send a new one",
                    )
                issued, _, forgotten = heapq.heapreplace(heap, (issued_at, expiry, key))
                self._seen.discard(forgotten)
                self.floor = max(self.floor, issued)
            else:
                heapq.heappush(heap, (issued_at, expiry, key))
            self._seen.add(key)

    def __len__(self) -> int:
        return len(self._seen)
