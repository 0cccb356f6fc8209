"""Parked threads that run actors' loops (and other long tasks), one at a time each.

pykka starts a thread per actor, and ``Thread.start`` waits for the new thread to
run before it returns: starting an allocation's actor on a provider, or a
deployment's on its requester, cost 0.2-0.5 ms of the placement path in thread
creation and that wait (``bench/provider_handlers.py``; ``specs/orchestration.md``,
"Placement, sixth pass"). A thread whose task ended parks here instead of
exiting, and the next task is handed to it through a queue: a put and a wake-up.
At most ``max_idle`` threads park (a task that ends with that many parked lets its
thread exit), each for at most ``idle_s``: the threads kept are bounded, and a
node that placed a burst of jobs holds none of them for long. A task that finds no
parked thread gets a new one, as before.

A parked thread is named ``dms-parked``; while it runs a task it takes that task's
name (``AllocationActor-7``), so a thread still named after an actor is one that
runs it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("dms.actor.threads")

PARKED_NAME = "dms-parked"
MAX_IDLE = 16
IDLE_S = 30.0

_Task = tuple[Callable[[], object], str]


class ThreadPark:
    """Hands tasks to parked daemon threads, or to new ones when none is parked."""

    def __init__(self, max_idle: int = MAX_IDLE, idle_s: float = IDLE_S) -> None:
        self.max_idle = max_idle
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._parked: list[queue.SimpleQueue[_Task]] = []
        self.started = 0  # threads created, for tests and benches
        self.reused = 0  # tasks handed to a parked thread

    def run(self, fn: Callable[[], object], name: str) -> None:
        """Run ``fn`` on a thread of its own, named ``name`` while it runs."""
        with self._lock:
            slot: queue.SimpleQueue[_Task] | None = self._parked.pop() if self._parked else None
            if slot is not None:
                self.reused += 1
            else:
                self.started += 1
        if slot is None:
            # The task goes through the slot, not the thread's arguments: the thread keeps
            # those for its whole life, and with them the first task it ran.
            slot = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(slot,), name=name, daemon=True).start()
        slot.put((fn, name))

    @property
    def parked(self) -> int:
        with self._lock:
            return len(self._parked)

    def _serve(self, slot: queue.SimpleQueue[_Task]) -> None:
        me = threading.current_thread()
        task: _Task | None = slot.get()
        while True:
            assert task is not None
            fn, me.name = task
            try:
                fn()
            except BaseException:  # a task's own failure must not take a parked thread
                log.exception("thread task %s failed", me.name)
            # Nothing of the task stays while parked: an actor's loop is a bound method,
            # and holding it kept the stopped actor whole for as long as this waits.
            del fn
            task = None
            me.name = PARKED_NAME
            with self._lock:
                if len(self._parked) >= self.max_idle:
                    return
                self._parked.append(slot)
            try:
                task = slot.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if slot in self._parked:  # nobody took it meanwhile: leave
                        self._parked.remove(slot)
                        return
                task = slot.get()  # taken as the wait ended: its task is on its way


# Every actor of this process starts on one park (actors of several nodes in one
# process, as tests and simulations run them, share it).
PARK = ThreadPark()
_names = itertools.count()


def next_name(prefix: str) -> str:
    """A thread name as pykka gives its actors' threads (``AllocationActor-7``)."""
    return f"{prefix}-{next(_names)}"
