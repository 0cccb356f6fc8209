"""Asking a silent requester whether it still holds its allocations here.

An allocation stops by itself when its requester is gone (``Bidding._requester_gone``:
no call for ``orphan_s`` and the peers table holds it ``gone``). A requester that is
alive but let the allocation go without this node hearing it (its revert lost: the
outbox is in memory, a restart forgets it, and it gives up after its horizon) stays
alive in the table, and its allocation ran until its job ended. So when a live
requester has not called an allocation for ``orphan_s``, the node asks it
(``/dms/deployment/held``) which of its leases here it still holds, and stops each
one the answer leaves out. Only a clear answer stops anything: no answer, a refusal
or an answer that cannot be read (an older node, a busy one, an unreachable one)
leaves the allocation running, and it is asked again ``orphan_s`` later.

One question at a time to each requester, naming every silent lease of it (at most
``MAX_HELD_ASKED``); each lease is asked about once per ``orphan_s``. ``silent`` may
be called from any thread (an allocation's watch); answers come on the node's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

from pydantic import ValidationError

from dms.actor import Outcome
from dms.actor.runtime import Messenger
from dms.orchestrator.base import node_handle
from dms.orchestrator.messages import MAX_HELD_ASKED, STILL_HELD, HeldAnswer

log = logging.getLogger("dms.node")

LET_GO = "its requester no longer holds it"


class HeldChecks:
    """``stop(lease_id, reason)``: stop the allocation of a lease its requester let go."""

    def __init__(
        self,
        node: Messenger,
        stop: Callable[[str, str], None],
        every_s: float,
        timeout_s: float = 10.0,
    ) -> None:
        self.node = node
        self.stop = stop
        self.every_s, self.timeout_s = every_s, timeout_s
        self._lock = threading.Lock()
        self._asked_at: dict[str, float] = {}  # lease -> when last asked (monotonic)
        self._waiting: dict[str, dict[str, str]] = {}  # requester -> {lease: deployment}
        self._in_flight: set[str] = set()  # requesters with a question unanswered
        self.asked = 0  # questions sent
        self.let_go = 0  # allocations stopped on an answer

    def silent(self, requester: str, deployment_id: str, lease_id: str) -> None:
        """``requester``, alive, has not called ``lease_id``'s allocation for the
        node's ``orphan_s``: ask it, unless this lease was asked about lately."""
        now = time.monotonic()
        with self._lock:
            last = self._asked_at.get(lease_id)
            if last is not None and now - last < self.every_s:
                return
            self._asked_at[lease_id] = now
            self._waiting.setdefault(requester, {})[lease_id] = deployment_id
            if requester in self._in_flight:
                return  # asked with the next question, once this one is answered
            self._in_flight.add(requester)
        self._ask(requester)

    def forget(self, lease_id: str) -> None:
        """The allocation ended: nothing more to ask about it."""
        with self._lock:
            self._asked_at.pop(lease_id, None)
            for leases in self._waiting.values():
                leases.pop(lease_id, None)

    def _ask(self, requester: str) -> None:
        """Send the next question to ``requester`` (its waiting leases), if any; else it
        has none in flight any more."""
        while True:
            with self._lock:
                waiting = self._waiting.get(requester, {})
                asked = dict(list(waiting.items())[:MAX_HELD_ASKED])
                for lease_id in asked:
                    del waiting[lease_id]
                if not waiting:
                    self._waiting.pop(requester, None)
                if not asked:
                    self._in_flight.discard(requester)
                    return
                self.asked += 1
            leases = [{"deployment_id": d, "lease_id": x} for x, d in asked.items()]
            try:
                self.node.invoke(
                    node_handle(requester),
                    STILL_HELD,
                    {"leases": leases},
                    timeout=self.timeout_s,
                    on_reply=partial(self._answered, requester, asked),
                )
                return
            except Exception as exc:  # not sent (unreachable now): asked again later
                log.info("could not ask requester %s about its allocations: %s", requester, exc)

    def _answered(self, requester: str, asked: dict[str, str], outcome: Outcome) -> None:
        try:
            if not outcome.ok:
                assert outcome.error is not None
                log.info(
                    "requester %s did not say whether it holds %d allocation(s) here "
                    "(%s: %s); they run on", requester, len(asked), outcome.error.code,
                    outcome.error.reason,
                )  # fmt: skip
                return
            try:
                held = set(HeldAnswer.model_validate(outcome.result).held)
            except ValidationError as exc:
                log.warning(
                    "requester %s answered whether it holds its allocations with "
                    "something unreadable (%s); they run on", requester,
                    str(exc).splitlines()[0],
                )  # fmt: skip
                return
            for lease_id in asked:
                if lease_id in held:
                    continue
                with self._lock:
                    # Ended while the question was out (``forget``): nothing to stop, and
                    # not let go (the requester may have seen it complete).
                    if lease_id not in self._asked_at:
                        continue
                    self.let_go += 1
                log.info("allocation %s: %s; stopping it", lease_id, LET_GO)
                self.stop(lease_id, LET_GO)
        finally:
            self._ask(requester)  # the leases that went silent meanwhile, if any
