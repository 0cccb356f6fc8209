"""Token buckets per peer: how often one peer may do a thing. The network layer
limits the frames a peer sends and the gossip each host publishes; the actor
system, the requests a peer makes of chosen behaviours (``admission``). No
libp2p here: both layers use it.

For frames: a peer may send ``rate`` frames a second on its streams, and up to ``burst`` at
once; a frame over that is refused (``rate_limited``) before a byte of it is
decoded. A refused frame that asks for a reply is answered, but only
``ANSWERS_PER_S`` of them a second per peer and ``TOTAL_ANSWERS_PER_S`` for all
peers together: answering a flood costs a signature each, and many keys would
each have a budget of their own. Refusals are logged once a second per peer,
with their count. A peer found flooding (``flooding``: the network layer says so
of a peer without a stake that it refused) has ``flood_rate`` a second instead
until ``flood_cooldown_s`` after its last refusal (specs/security.md, "Flooders").
See specs/network.md, "Limits per peer".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

# Refusals answered a second per peer (the rest are counted and logged only).
ANSWERS_PER_S = 10.0
# Refusals answered a second across all peers (each answer is a signature).
TOTAL_ANSWERS_PER_S = 50.0
# Refusals of one peer are logged at most once this often, with their count.
LOG_EVERY_S = 1.0
# The shared budget of peers without a stake: a peer's use of it is measured over about
# this long (decaying), and a peer counts among those sharing it this long after its
# last frame.
SHARE_WINDOW_S = 1.0


@dataclass
class Bucket:
    tokens: float
    stamp: float

    def take(self, rate: float, burst: float, now: float) -> bool:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ShareMeter:
    """Who draws on a budget that many peers share, and how much: each peer's draws
    decay over ``SHARE_WINDOW_S``, and its fair share is the budget's ``rate`` over
    that window divided among the peers that drew on it meanwhile. A budget uses it to
    let the peers within their share through a flood of the others (frames:
    ``PeerRates.allow_shared``; bytes and new streams: ``dms.network.paced``).
    One thread uses it (no lock); a peer that has not drawn for ``SHARE_WINDOW_S`` is
    dropped, so it holds the peers of the last second only."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._drawn: dict[str, tuple[float, float]] = {}  # peer -> (units, when)
        self._sharing: dict[str, float] = {}  # peer -> its last draw
        self._pruned = float("-inf")

    def draw(self, peer: str, units: float, now: float) -> bool:
        """Note that ``peer`` draws ``units`` now; whether it was over its share before
        this draw (what it drew in the last ``SHARE_WINDOW_S``, decaying)."""
        drawn, at = self._drawn.get(peer, (0.0, now))
        drawn *= math.exp((at - now) / SHARE_WINDOW_S)
        over = drawn >= self.rate * SHARE_WINDOW_S / self._sharing_now(peer, now)
        self._drawn[peer] = (drawn + units, now)
        return over

    def _sharing_now(self, peer: str, now: float) -> int:
        """How many peers drew in the last ``SHARE_WINDOW_S``, ``peer`` among them (its
        entry is renewed; old ones go at most every tenth of it)."""
        self._sharing[peer] = now
        if now - self._pruned >= SHARE_WINDOW_S / 10:
            self._pruned = now
            cutoff = now - SHARE_WINDOW_S
            self._sharing = {p: t for p, t in self._sharing.items() if t >= cutoff}
            self._drawn = {p: d for p, d in self._drawn.items() if p in self._sharing}
        return len(self._sharing)


@dataclass
class _Peer:
    frames: Bucket
    answers: Bucket
    refused: int = 0  # since the last log line
    logged: float = float("-inf")
    # Found flooding: until then, only ``flood_rate`` frames a second (``penalty``).
    flooding_until: float = float("-inf")
    penalty: Bucket | None = None


class PeerRates:
    """Per-peer frame budgets; one trio thread uses it (no lock).

    ``forget`` a peer when its last connection closes: a new connection starts
    with a full bucket, so entries live only as long as connections do.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        shared_rate: float = float("inf"),
        shared_burst: int = 1,
        flood_rate: float = float("inf"),
        flood_cooldown_s: float = 0.0,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.flood_rate = flood_rate
        self.flood_cooldown_s = flood_cooldown_s
        self.shared_rate = shared_rate
        self.shared_burst = float(shared_burst)
        self._clock = clock
        self._peers: dict[str, _Peer] = {}
        self._answers = Bucket(TOTAL_ANSWERS_PER_S, clock())
        self._shared = Bucket(self.shared_burst, clock())
        self._meter = ShareMeter(shared_rate)

    def allow(self, peer: str) -> bool:
        """Take one frame from ``peer``'s budget; False if it has none left. A peer found
        flooding (:meth:`flooding`) takes from a budget of ``flood_rate`` a second
        instead until its cooldown is over; a frame over that extends the cooldown."""
        now = self._clock()
        state = self._peers.get(peer)
        if state is None:
            state = _Peer(Bucket(self.burst, now), Bucket(ANSWERS_PER_S, now))
            self._peers[peer] = state
        if state.flooding_until > now and state.penalty is not None:
            rate = min(self.flood_rate, self.rate)
            if state.penalty.take(rate, max(1.0, min(rate, self.burst)), now):
                return True
            state.flooding_until = now + self.flood_cooldown_s
            return False
        return state.frames.take(self.rate, self.burst, now)

    def flooding(self, peer: str) -> None:
        """``peer`` was found flooding: for ``flood_cooldown_s`` from now (longer while it
        goes on), it may send only ``flood_rate`` frames a second."""
        if self.flood_cooldown_s <= 0:
            return
        now = self._clock()
        state = self._peers.get(peer)
        if state is None:
            state = _Peer(Bucket(self.burst, now), Bucket(ANSWERS_PER_S, now))
            self._peers[peer] = state
        if state.flooding_until <= now or state.penalty is None:
            state.penalty = Bucket(0.0, now)
        state.flooding_until = now + self.flood_cooldown_s

    def pardon(self, peer: str) -> None:
        """``peer`` is no longer held to ``flood_rate`` (it has a stake now: a peer with
        one keeps its own budget, or its work in progress would stall)."""
        state = self._peers.get(peer)
        if state is not None:
            state.flooding_until, state.penalty = float("-inf"), None

    def is_flooding(self, peer: str) -> bool:
        state = self._peers.get(peer)
        return state is not None and state.flooding_until > self._clock()

    def allow_shared(self, peer: str) -> bool:
        """Take one frame of ``peer`` (after ``allow``) from the budget the peers without
        a stake share (``shared_rate`` a second, ``shared_burst`` at once); False if it
        may not.

        Fair inside it: a peer that sent more than its share of it in the last
        ``SHARE_WINDOW_S`` (``shared_rate`` over the peers that sent in that time) takes
        only from its upper half; a peer within its share takes down to the last frame.
        So keys that flood it keep it half full for the quiet ones, and an honest
        newcomer or requester, sending a few frames, is served beside any flood.
        """
        if self.shared_rate == float("inf"):
            return True
        now = self._clock()
        over = self._meter.draw(peer, 1.0, now)
        floor = self.shared_burst / 2 if over else 0.0
        bucket = self._shared
        bucket.tokens = min(
            self.shared_burst, bucket.tokens + (now - bucket.stamp) * self.shared_rate
        )
        bucket.stamp = now
        if bucket.tokens - 1.0 >= floor:
            bucket.tokens -= 1.0
            return True
        if over:
            self.flooding(peer)
        return False

    def last_active(self, peer: str) -> float | None:
        """When ``peer`` last sent a frame (this clock), or None if it has not."""
        state = self._peers.get(peer)
        return state.frames.stamp if state is not None else None

    def refused(self, peer: str) -> int:
        """Note a refusal of ``peer``'s frame; the refusals to log now (0: not yet)."""
        now = self._clock()
        state = self._peers[peer]
        state.refused += 1
        if now - state.logged < LOG_EVERY_S:
            return 0
        count, state.refused, state.logged = state.refused, 0, now
        return count

    def may_answer(self, peer: str) -> bool:
        """Whether a refusal of ``peer`` may be answered now, within its budget and that
        of all peers (``answered`` takes from both)."""
        now = self._clock()
        for bucket, rate in (
            (self._peers[peer].answers, ANSWERS_PER_S),
            (self._answers, TOTAL_ANSWERS_PER_S),
        ):
            bucket.tokens = min(rate, bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
            if bucket.tokens < 1.0:
                return False
        return True

    def answered(self, peer: str) -> None:
        self._peers[peer].answers.tokens -= 1.0
        self._answers.tokens -= 1.0

    def forget(self, peer: str) -> None:
        """``peer`` has no connection left. Its entry goes once its bucket is full
        again (a peer that reconnects gets no fresh burst), and its cooldown over if it
        was found flooding (reconnecting does not end it); and so do the others'."""
        now = self._clock()
        for key, state in list(self._peers.items()):
            frames = state.frames
            full = frames.tokens + (now - frames.stamp) * self.rate >= self.burst
            if full and state.flooding_until <= now:
                del self._peers[key]

    def __len__(self) -> int:
        return len(self._peers)
