"""SIGINT and SIGTERM, waited for by the main thread of a long command (``dms run``,
``dms sim``).

A signal's Python handler runs in the main thread between two of its bytecodes, so it
must take no lock the main thread may hold. ``threading.Event.set`` takes the lock that
``Event.wait`` holds on its way in and out of its wait: a SIGTERM landing there (one
sent as the node said it was running, or any of several sent together) left the handler
waiting on its own thread for good, and the node never stopped. Here the handler writes
a byte to a pipe (a system call, no lock) and the waiter reads it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_BYTES = {sig: bytes([sig]) for sig in STOP_SIGNALS}


class StopSignals:
    """The stop signals this process was sent, in a pipe the main thread waits on."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        # Never blocks the handler: past the pipe's 64 KiB of signals the rest are
        # dropped, and the waiter has plenty to wake it.
        os.set_blocking(self._write, False)

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        """The handler: a byte to the pipe, no lock taken. As short as it can be: a
        signal coming while it runs runs it again inside itself."""
        try:  # noqa: SIM105 (suppress() is a context manager: more bytecodes to nest in)
            os.write(self._write, _BYTES[signum])
        except OSError:  # the pipe full (BlockingIOError) or closed: nothing to add
            pass

    def wait(self, timeout: float | None = None) -> int | None:
        """The first stop signal not yet waited for (its number); None if none came
        within ``timeout`` (None: wait for one)."""
        ready, _, _ = select.select([self._read], [], [], timeout)
        return os.read(self._read, 1)[0] if ready else None

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


Handler = Callable[[int, FrameType | None], Any] | int | None


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """SIGINT and SIGTERM go to a ``StopSignals`` while the block runs; their handlers
    before are put back after it (a command run in a test's process leaves it as it
    was)."""
    signals = StopSignals()
    before: dict[int, Handler] = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signals.handle)
        yield signals
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        signals.close()
