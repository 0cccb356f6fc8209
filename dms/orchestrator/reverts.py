"""Reverts that are retried until a provider acknowledges them.

A revert gives a provider's lease back (a bid that lost, a slot lost or
stopped, everything a deployment may hold when it ends). Sent once and lost,
it left the lease held until it expired, and a committed one for ever. Here a
revert is an invoke; any reply is its acknowledgement (``released``, or a
refusal: the provider handled it), and only no reply at all (``timeout``,
``unreachable``, a send that fails) or an answer that says it was not handled
yet (``store_refused``: the store was busy; ``rate_limited``: over the provider's
admission budgets; ``outbox_full``: the stream's queue was full; ``stopped``: the
provider's node actor was stopping; ``expired``, ``clock_skew``,
``expiry_too_far``: refused on the envelope's times before any handling) sends it
again, after 1, 2, 4 ... up to 30 seconds, for at most ``horizon_s``. A retry is
a fresh envelope, so a queue delay passes; clocks that stay apart refuse every
one until the horizon, said once per peer (a warning, again only after that peer
acknowledged one) instead of each time. The node actor owns the outbox, so a revert
outlives the deployment that asked for it. ``send`` may be called from any thread (a
deployment's sends its reverts from its own, in order with its other frames to that
peer); the answers and retries run in the node actor.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from typing import Any

from dms.actor import ErrorCode, Outcome
from dms.backoff import Backoff
from dms.orchestrator.base import Messenger, node_handle
from dms.orchestrator.messages import REVERT
from dms.store import STORE_REFUSED

log = logging.getLogger("dms.orchestrator")

RETRY = Backoff(first_s=1.0, max_s=30.0)
# Answers that are no acknowledgement: the revert is sent again. Each says the provider
# did not handle it (yet): its store was busy (another process held it locked past
# store_wait_s), its admission budgets were spent (a deployment's many reverts at once),
# the frame never left, the provider's node actor was stopping (its queue answered
# ``stopped``), or the envelope was refused on its times before the behaviour ran. Taken
# for an acknowledgement, the allocation ran on and its lease stayed allocated.
UNTIMELY = frozenset(
    {ErrorCode.EXPIRED.value, ErrorCode.CLOCK_SKEW.value, ErrorCode.EXPIRY_TOO_FAR.value}
)
UNANSWERED = (
    frozenset(
        {
            ErrorCode.TIMEOUT.value,
            ErrorCode.UNREACHABLE.value,
            ErrorCode.RATE_LIMITED.value,
            ErrorCode.OUTBOX_FULL.value,
            ErrorCode.STOPPED.value,
            STORE_REFUSED,
        }
    )
    | UNTIMELY
)


class Reverts:
    def __init__(
        self,
        actor: Messenger,
        timeout_s: float = 5.0,
        horizon_s: float = 600.0,
        max_pending: int = 10_000,
    ) -> None:
        self.actor = actor
        self.timeout_s, self.horizon_s, self.max_pending = timeout_s, horizon_s, max_pending
        self._lock = threading.Lock()  # the counts: send runs on any thread
        self.pending = 0
        self.acknowledged = 0
        self.abandoned = 0
        # Peers whose answer was refused on the envelope's times since their last
        # acknowledgement (abandoned reverts too): warned about once, as clocks apart
        # refuse every retry.
        self.untimely: set[str] = set()

    def send(self, peer: str, payload: dict[str, Any]) -> None:
        """Revert at ``peer`` until it answers (from any thread; sent from the caller's)."""
        with self._lock:
            full = self.pending >= self.max_pending
            if full:
                self.abandoned += 1
            else:
                self.pending += 1
            pending = self.pending
        if full:
            log.warning("revert to %s dropped: %d reverts pending", peer, pending)
            return
        self._attempt(peer, payload, 0, time.monotonic())

    def _attempt(self, peer: str, payload: dict[str, Any], attempt: int, first: float) -> None:
        try:
            self.actor.invoke(
                node_handle(peer),
                REVERT,
                payload,
                timeout=self.timeout_s,
                on_reply=partial(self._answered, peer, payload, attempt, first),
            )
        except Exception as exc:  # not sent (the peer unreachable now): try again later
            self._again(peer, payload, attempt, first, str(exc))

    def _answered(
        self, peer: str, payload: dict[str, Any], attempt: int, first: float, outcome: Outcome
    ) -> None:
        if outcome.ok or (outcome.error is not None and outcome.error.code not in UNANSWERED):
            with self._lock:
                self.pending -= 1
                self.acknowledged += 1
            self.untimely.discard(peer)
            return
        assert outcome.error is not None
        code, why = outcome.error.code, outcome.error.reason
        if code in UNTIMELY and peer not in self.untimely:
            if len(self.untimely) >= self.max_pending:  # bounded: warned again at worst
                self.untimely.clear()
            self.untimely.add(peer)
            log.warning(
                "revert to %s refused on its envelope's times (%s: %s): a queue delay, or "
                "the two nodes' clocks apart; sent again until %g s after the first",
                peer,
                code,
                why,
                self.horizon_s,
            )
        self._again(peer, payload, attempt, first, f"{code}: {why}")

    def _again(
        self, peer: str, payload: dict[str, Any], attempt: int, first: float, why: str
    ) -> None:
        delay = RETRY.delay(attempt)
        if time.monotonic() + delay - first > self.horizon_s:
            with self._lock:
                self.pending -= 1
                self.abandoned += 1
            log.warning("revert to %s abandoned after %d attempts: %s", peer, attempt + 1, why)
            return
        log.info("revert to %s unanswered (%s); again in %g s", peer, why, delay)
        self.actor.call_later(delay, lambda: self._attempt(peer, payload, attempt + 1, first))
