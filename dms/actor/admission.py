"""Requests a second per peer for chosen behaviours, checked before the signature.

A node may limit how often one peer invokes a behaviour (bid requests:
``Preferences.bid_requests_per_s``, ``bid_request_burst``). The check reads the
header alone: the behaviour and the sender's host, which the receive pipeline
has already bound to the peer that delivered the frame (the libp2p connection
of a stream, the libp2p signature of a gossip message). So a request over the
rate costs no signature check, no payload decoding and no turn in the target
actor's mailbox, where it queued before every other peer's requests: a flood of
bid requests made an honest placement wait behind hundreds of them.

A refused request is counted (``rate_limited``), logged once a second per peer
with its count, and answered if it asks for a reply, at most
``ANSWERS_PER_S`` a second per peer (each answer costs a signature). See
``specs/security.md``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dms.actor.ratelimit import PeerRates

# Peers whose budgets are kept before the full ones are forgotten (checked at most
# once a second).
MAX_PEERS = 4096


@dataclass(frozen=True)
class Verdict:
    """An over-rate request: why, whether to answer it, and the refusals to log now
    (0: not yet; they are logged once a second per peer)."""

    reason: str
    answer: bool
    log_count: int


class BehaviourLimits:
    """Per-peer budgets for some behaviours; any thread may call :meth:`check`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._limits: dict[str, tuple[PeerRates, str]] = {}
        self._swept = float("-inf")

    def set(self, behaviour: str, rate: float, burst: int, reason: str) -> None:
        """At most ``rate`` requests a second (``burst`` at once) of ``behaviour`` from
        one peer; ``rate`` 0: no limit. ``reason`` is the refusal's text."""
        with self._lock:
            if rate <= 0:
                self._limits.pop(behaviour, None)
            else:
                self._limits[behaviour] = (PeerRates(rate, burst, self._clock), reason)

    def __contains__(self, behaviour: str) -> bool:
        return behaviour in self._limits

    def check(self, behaviour: str, peer: str) -> Verdict | None:
        """Take one request from ``peer``'s budget for ``behaviour``; a verdict if it
        has none left, else None."""
        with self._lock:
            limit = self._limits.get(behaviour)
            if limit is None:
                return None
            rates, reason = limit
            if len(rates) > MAX_PEERS and self._clock() > self._swept + 1.0:
                rates.forget("")  # every peer whose budget is full again goes
                self._swept = self._clock()
            if rates.allow(peer):
                return None
            count = rates.refused(peer)
            answer = rates.may_answer(peer)
            if answer:
                rates.answered(peer)
            return Verdict(reason, answer, count)
