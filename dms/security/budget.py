"""Budgets for the signature work remote peers can make a node do.

A :class:`WorkBudget` is two token buckets deep: one per peer and one for all
peers together (DESIGN decision 12: a limit per peer is never enough, keys are
free to make). :meth:`WorkBudget.take` charges one unit of work (a revocation to
verify, a token chain to verify) and says why not when either bucket is empty;
refusals are counted by reason for ``/metrics``. No libp2p and no actors here:
the trust store and the capability policy use it.

Priority: peers the node has a stake in (``stake``, set by the node: an
allocation, an anchor; see ``dms.node.stakes``) take from the budget of all; the
others together take from ``unknown_share`` of it too, so a crowd of fresh keys
spends at most that share and a peer with a stake always finds the rest.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

# Peers whose buckets are kept; beyond it, the full ones (idle peers) are forgotten.
MAX_PEERS = 4096
UNKNOWN_SHARE = 0.5  # of the budget of all, for the peers without a stake together


def _never(_peer: str) -> bool:
    return False


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def refill(self, rate: float, burst: float, now: float) -> float:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        return self.tokens


class WorkBudget:
    """``rate`` units a second for all peers (``burst`` at once), and ``peer_rate``
    (``peer_burst``) for each peer. Thread-safe."""

    def __init__(
        self,
        what: str,
        *,
        rate: float,
        burst: int,
        peer_rate: float,
        peer_burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.rate, self.burst = rate, float(burst)
        self.peer_rate, self.peer_burst = peer_rate, float(peer_burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._all = _Bucket(self.burst, clock())
        self._unknown = _Bucket(self.burst * UNKNOWN_SHARE, clock())
        self._peers: dict[str, _Bucket] = {}
        self.stake: Callable[[str], bool] = _never
        self.refused: Counter[str] = Counter()  # "peer", "unknown" or "global" -> refusals

    def take(self, peer: str | None) -> str | None:
        """Charge one unit to ``peer`` (None: this node's own work, never refused);
        None if allowed, else the reason to give."""
        if peer is None:
            return None
        now = self._clock()
        with self._lock:
            bucket = self._peers.get(peer)
            if bucket is None:
                if len(self._peers) >= MAX_PEERS:
                    self._forget_full(now)
                bucket = self._peers[peer] = _Bucket(self.peer_burst, now)
            if bucket.refill(self.peer_rate, self.peer_burst, now) < 1.0:
                self.refused["peer"] += 1
                return (
                    f"over this node's budget for {self.what} from one peer "
                    f"({self.peer_rate:g} a second): try again later"
                )
            if self._all.refill(self.rate, self.burst, now) < 1.0:
                self.refused["global"] += 1
                return (
                    f"over this node's budget for {self.what} from all peers "
                    f"({self.rate:g} a second): try again later"
                )
            staked = self.stake(peer)
            share = self.burst * UNKNOWN_SHARE
            if not staked and self._unknown.refill(self.rate * UNKNOWN_SHARE, share, now) < 1.0:
                self.refused["unknown"] += 1
                return (
                    f"over this node's budget for {self.what} from peers it has no stake "
                    f"in ({self.rate * UNKNOWN_SHARE:g} a second): try again later"
                )
            bucket.tokens -= 1.0
            self._all.tokens -= 1.0
            if not staked:
                self._unknown.tokens -= 1.0
            return None

    def _forget_full(self, now: float) -> None:
        for key, bucket in list(self._peers.items()):
            if bucket.refill(self.peer_rate, self.peer_burst, now) >= self.peer_burst:
                del self._peers[key]
        if len(self._peers) >= MAX_PEERS:  # all busy: the oldest entry goes
            del self._peers[next(iter(self._peers))]
