"""One timer thread per actor system: invoke deadlines and injected latency.

A heap of deadlines served by a single daemon thread is far cheaper than a
``threading.Timer`` (one thread each) per pending request.

Most timers are invoke deadlines that are cancelled when the reply comes, well
before they are due. A cancelled timer therefore costs nothing more: the thread
sleeps until the next *live* deadline instead of waking at each cancelled one
(on a busy node that was a wake-up, and a turn at the GIL, per invoke), and
cancelled entries are swept from the heap once they are the larger part of it,
so a node sending many invokes with long timeouts holds no pile of dead ones.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("dms.actor.timers")

# Sweep cancelled entries once there are this many and they outnumber the live ones.
SWEEP_AT = 256


class TimerHandle:
    __slots__ = ("_timers", "cancelled")

    def __init__(self, timers: Timers | None) -> None:
        self.cancelled = False
        # The timers whose heap holds this entry; None once it was taken off (or never on).
        self._timers: Timers | None = timers

    def cancel(self) -> None:
        timers = self._timers
        if timers is None:  # already taken off the heap: nothing to count
            self.cancelled = True
        else:
            timers._cancel(self)


_Entry = tuple[float, int, TimerHandle, Callable[[], None]]


class Timers:
    def __init__(self, name: str = "dms-timers") -> None:
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._cancelled = 0  # cancelled entries still on the heap
        self._stopped = False
        self.wakeups = 0  # times the thread woke up, for tests and status
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        """Entries on the heap, cancelled ones not yet swept included."""
        with self._cond:
            return len(self._heap)

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(self)
        with self._cond:
            entry = (time.monotonic() + delay_s, next(self._seq), handle, fn)
            heapq.heappush(self._heap, entry)
            # Wake the thread only when its next deadline moved earlier.
            if self._heap[0] is entry:
                self._cond.notify()
        return handle

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=2)

    def _cancel(self, handle: TimerHandle) -> None:
        with self._cond:
            if handle.cancelled or handle._timers is None:
                handle.cancelled = True
                return
            handle.cancelled = True
            self._cancelled += 1
            if self._cancelled >= SWEEP_AT and 2 * self._cancelled > len(self._heap):
                self._sweep()
            # The thread sleeps until the next live deadline; no need to wake it: an
            # earlier one cannot appear by cancelling.

    def _sweep(self) -> None:
        """Drop every cancelled entry (caller holds the lock)."""
        self._heap = [entry for entry in self._heap if not entry[2].cancelled]
        heapq.heapify(self._heap)
        self._cancelled = 0

    def _next_live(self) -> _Entry | None:
        """The earliest live entry, dropping cancelled ones before it (lock held)."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)[2]._timers = None
            self._cancelled -= 1
        return heap[0] if heap else None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    head = self._next_live()
                    if head is not None and head[0] <= time.monotonic():
                        break
                    self._cond.wait(head[0] - time.monotonic() if head is not None else None)
                    self.wakeups += 1
                if self._stopped:
                    return
                _, _, handle, fn = heapq.heappop(self._heap)
                handle._timers = None
            try:
                fn()
            except Exception:
                log.exception("timer callback failed")
