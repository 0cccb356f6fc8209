"""The trio event loop a host runs in, and how other threads cross into it.

A node's host runs in a trio loop on a thread of its own; a simulation's hosts
share one loop (:class:`SharedLoop`). Actor threads never wait to send: they
hand frames over (``dms.network.outbox``) or queue a callback with
``TrioToken.run_sync_soon``; peer operations (ping, connect, subscribe) cross
with ``trio.from_thread.run``, blocking and bounded. See specs/network.md,
"Threads".
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from dms.actor.wakes import DeferredWakes, stop_deferring, wakes_deferred

START_TIMEOUT_S = 30.0

T = TypeVar("T")


class NetworkError(Exception):
    """The host could not start or an operation on it failed; the message says why."""


class _WakeActorsBeforeWaiting(trio.abc.Instrument):
    """Hands out the actor wakes this loop's thread deferred, each time it is about
    to wait for I/O (``dms.actor.wakes.DeferredWakes``)."""

    def __init__(self, wakes: DeferredWakes) -> None:
        self._wakes = wakes

    def before_io_wait(self, timeout: float) -> None:
        if self._wakes:
            try:
                self._wakes.flush()
            except BaseException:
                # trio drops an instrument that raises: wake at once from now on,
                # or every later put would wait for the loop's end.
                stop_deferring()
                raise


def run_loop(fn: Callable[[], Awaitable[Any]]) -> Any:
    """``trio.run(fn)`` on this thread, the actors it queues messages for woken as
    the loop next waits for I/O, not while it still holds the GIL."""
    with wakes_deferred() as wakes:
        return trio.run(fn, instruments=[_WakeActorsBeforeWaiting(wakes)])


class SharedLoop:
    """One trio event loop, on one thread, that several transports' hosts run in.

    A process normally runs one node, and its host has a trio thread of its own.
    A simulation runs N nodes in one process; with a thread each, every frame
    between two of them crosses threads and waits for the GIL, a cost no real
    deployment pays. ``LocalCluster`` therefore runs its hosts as tasks of one
    loop: still N hosts with their own keys, sockets, Noise and Yamux sessions.
    """

    def __init__(self, name: str = "dms-libp2p-shared") -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=run_loop, args=(self._main,), name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise NetworkError("the shared trio loop did not start")
        self.ident = self._thread.ident

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        assert self._token is not None and self._nursery is not None
        self._token.run_sync_soon(self._nursery.start_soon, fn)

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._stop.set)
        self._thread.join(10.0)


class LoopBridge:
    """The part of a transport that lives in a trio loop: its token, its nursery, and
    the ways in from other threads. The host (``dms.network.host``) sets them."""

    _loop: SharedLoop | None
    _thread: threading.Thread | None
    _thread_ident: int | None
    _token: trio.lowlevel.TrioToken | None
    _nursery: trio.Nursery | None
    _stopped: bool

    def _on_trio_thread(self) -> bool:
        return threading.get_ident() == self._thread_ident

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` in the loop and wait for it (from another thread)."""
        if self._token is None or self._stopped:
            raise NetworkError("the network is stopped")
        try:
            return trio.from_thread.run(fn, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise NetworkError("the network is stopped") from None

    def _start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Start a task of this host; False once it has stopped.

        Callbacks queued with ``run_sync_soon`` may run after this host's nursery
        closed (in a shared loop the trio token outlives it), and an exception
        there would end the whole loop, every other host in it included.
        """
        nursery = self._nursery
        if nursery is None:
            return False
        try:
            nursery.start_soon(fn, *args)
        except RuntimeError:  # "Nursery is closed to new arrivals": stopping
            return False
        return True


# A dial's failures said in one line: the first few addresses' reasons.
SHOWN_REASONS = 3


def why(exc: BaseException) -> str:
    """An exception as one line: its type, and its text if it has one; for a dial whose
    every address failed, each address's own reason (:func:`dial_reasons`)."""
    reasons = dial_reasons(exc)
    if reasons:
        return f"every address failed: {reasons}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def dial_reasons(exc: BaseException) -> str:
    """py-libp2p's "unable to connect to PEER, no addresses established a successful
    connection (with exceptions)" keeps why in its cause (a ``MultiError`` of each
    address's failure) and says none of it: ``dms peers connect`` of a closed port, and
    the log's "cannot connect to PEER" at every redial, gave no reason. The innermost
    reason of each (``ConnectionRefusedError: [Errno 111] Error connecting to
    ('127.0.0.1', 9): Connection refused``), the first ``SHOWN_REASONS``; "" if none."""
    errors = getattr(exc.__cause__, "errors", None)
    if not isinstance(errors, list) or not errors:
        return ""
    reasons = list(dict.fromkeys(why(innermost(e)) for e in errors))
    more = len(reasons) - SHOWN_REASONS
    return "; ".join(reasons[:SHOWN_REASONS]) + (f" (and {more} more)" if more > 0 else "")


def innermost(exc: BaseException) -> BaseException:
    """The exception at the bottom of ``exc``'s causes (a group: its first)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return exc


def root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
