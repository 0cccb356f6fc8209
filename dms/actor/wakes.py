"""Waking an actor's thread, from a thread that holds the GIL until it next waits.

A trio loop's thread holds the GIL for most of a pass of its scheduler, from one
wait for I/O to the next. An actor's thread woken in between mostly waits for
the GIL, and waking it (a futex call, often a switch of the core to it and back)
was the most sampled line of a busy requester's network thread (specs/actor.md,
"Receive pipeline"). While a thread runs inside ``wakes_deferred`` (every host's
loop does: ``dms.network.loop.run_loop``), the wakes of the mailboxes it puts
messages in are held in its ``DeferredWakes`` and handed out just before the
loop waits; every other thread wakes at once.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator

# The wakes a thread defers (``wakes_deferred``): set on a trio loop's thread while it
# runs. Unset on every other thread, whose puts wake the actor at once.
_here = threading.local()


# A wake deferred this long is handed out at the next put, pass or not: a busy
# loop's pass can last tens of milliseconds on two loaded cores, and an actor woken
# at once used to get the GIL within the interpreter's switch interval (5 ms).
MAX_DEFER_S = 0.002


class DeferredWakes:
    """Actor threads to wake once the thread that queued their messages next waits:
    at its ``flush`` (trio's ``before_io_wait``), or at the first put after one has
    waited ``MAX_DEFER_S``."""

    __slots__ = ("_pending", "_since")

    def __init__(self) -> None:
        self._pending: list[queue.SimpleQueue[None]] = []
        self._since = 0.0

    def add(self, tokens: queue.SimpleQueue[None]) -> None:
        now = time.monotonic()
        if not self._pending:
            self._since = now
        self._pending.append(tokens)
        if now - self._since > MAX_DEFER_S:
            self.flush()

    def flush(self) -> None:
        # One at a time: a put that failed would lose none of the others.
        pending = self._pending
        while pending:
            pending.pop().put(None)

    def __len__(self) -> int:
        return len(self._pending)


@contextlib.contextmanager
def wakes_deferred() -> Iterator[DeferredWakes]:
    """On this thread, until the block ends, a message put in a mailbox wakes its
    actor only at the next ``flush`` (and at the end of the block)."""
    if getattr(_here, "wakes", None) is not None:
        raise RuntimeError("this thread already defers its wakes")
    wakes = DeferredWakes()
    _here.wakes = wakes
    try:
        yield wakes
    finally:
        _here.wakes = None
        wakes.flush()


def stop_deferring() -> None:
    """This thread's puts wake their actors at once from now on (what it deferred is
    handed out): for a loop whose flushing failed."""
    wakes = getattr(_here, "wakes", None)
    _here.wakes = None
    if wakes is not None:
        wakes.flush()


def flush_deferred_wakes() -> None:
    """Hand out the wakes this thread deferred, if it defers any: before it blocks
    waiting for an actor (``ActorRef.ask``, a blocking stop), which would otherwise
    wait for a wake this very thread holds back."""
    wakes = getattr(_here, "wakes", None)
    if wakes is not None:
        wakes.flush()


def defer_or_wake(tokens: queue.SimpleQueue[None]) -> None:
    """Put the token that wakes a mailbox's thread: now, or, on a thread that defers
    its wakes, when it next waits."""
    wakes = getattr(_here, "wakes", None)
    if wakes is None:
        tokens.put(None)
    else:
        wakes.add(tokens)
