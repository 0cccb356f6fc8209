"""An actor's mailbox in two lanes: requests of peers the node has no stake in wait
behind everything else.

pykka's inbox is one FIFO queue: a flood of requests from fresh keys, each admitted
within the global budgets (``dms.actor.admission``), still queued ahead of a
request of a peer the node works with, which then waited for all of them. Here a
request whose admission ticket says its sender has no stake here goes to the low
lane; everything else (requests of staked peers, this node's own calls, replies,
timers, stop) to the high lane, which is always served first. Within a lane the
order is kept, so one peer's requests are handled in the order they came. See
``specs/security.md``, "Global budgets".
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any

import pykka

from dms.actor.system import Inbound
from dms.actor.wakes import defer_or_wake


def _is_request(message: Any) -> bool:
    return isinstance(message, Inbound)


class LanedInbox:
    """pykka's ``ActorInbox`` (put, get, empty) with a high and a low lane.

    The actor's thread is woken through a ``queue.SimpleQueue`` of tokens, one put
    after each message (its put and get are C calls: a ``threading.Condition`` cost
    some ten Python steps on each side of every hop to the actor). There are never
    fewer tokens than messages, so a thread holding a token finds a message, unless
    ``close`` removed it, and then it waits for the next token.

    Once closed (its actor is stopping) it refuses requests: pykka's ``tell`` checks
    that the actor is alive and then puts, so a request whose check passed just
    before the stop would land here after ``close`` gave back the tickets of those
    waiting, and never be handled, answered or given back.
    """

    def __init__(self) -> None:
        self._high: deque[Any] = deque()
        self._low: deque[Any] = deque()
        self._lock = threading.Lock()
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._closed = False

    def put(self, envelope: Any, /) -> None:
        """Queue a message; ``pykka.ActorDeadError`` for a request once closed (its
        sender answers ``stopped`` and gives its ticket back, as for any dead actor)."""
        message = envelope.message
        unknown = (
            isinstance(message, Inbound)
            and message.ticket is not None
            and not message.ticket.staked
        )
        with self._lock:
            if self._closed and _is_request(message):
                raise pykka.ActorDeadError("the actor stopped before taking the request")
            (self._low if unknown else self._high).append(envelope)
        defer_or_wake(self._tokens)

    def get(self) -> Any:
        while True:
            self._tokens.get()
            with self._lock:
                if self._high:
                    return self._high.popleft()
                if self._low:
                    return self._low.popleft()

    def empty(self) -> bool:
        with self._lock:
            return not self._high and not self._low

    def qsize(self) -> int:
        """Messages waiting in both lanes (``queue.Queue.qsize``, which pykka's own
        inbox is and ``dms sim``'s memory mode reads to know a network settled)."""
        with self._lock:
            return len(self._high) + len(self._low)

    def close(self) -> list[Inbound]:
        """The actor is stopping: drop every request still waiting, refuse those put
        from now on, and return the dropped ones (to be answered, their admission
        tickets given back)."""
        with self._lock:
            self._closed = True
            dropped: list[Inbound] = []
            for lane in (self._high, self._low):
                kept = deque(e for e in lane if not _is_request(e.message))
                dropped += [e.message for e in lane if _is_request(e.message)]
                lane.clear()
                lane.extend(kept)
        return dropped

    def __len__(self) -> int:
        with self._lock:
            return len(self._high) + len(self._low)
