"""Group commit: writes that threads make at the same moment share one transaction.

A requester saves each deployment's row at every transition, from the deployment's
own actor thread. With many deployments in flight, each save was a transaction of
its own and the threads queued on the store's writer lock, one transaction after
another (at 32 deployments in flight, 26-51 ms of every placement went to waiting
there: ``bench/placement.py``). Here a writer that finds another transaction under
way queues its write and waits; when that transaction ends, the first writer
waiting leads the next one with every write queued meanwhile. Each caller returns
once its own write is committed, or raises the error it met, as with a transaction
of its own: a batch that fails is tried again one write a transaction, so one bad
write fails only its own caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection

from dms.store.db import Database
from dms.store.errors import StoreBusy

Write = Callable[[Connection], Any]


class _Waiting:
    __slots__ = ("bound", "done", "error", "lead", "write")

    def __init__(self, write: Write, bound: float | None) -> None:
        self.write = write
        self.bound = bound  # how long its thread may wait for the store (None: no bound)
        self.done = threading.Event()
        self.lead = False  # woken to lead the next transaction, not because it is written
        self.error: BaseException | None = None


class GroupCommit:
    """Runs ``write(conn)`` calls of any thread inside shared transactions of ``db``.

    A thread whose waits for the store are bounded (``Database.waiting_at_most``: the
    node's, a deployment's) waits its bound at most, queue and transaction together: it
    leaves the queue with :class:`StoreBusy` if no transaction took its write in time,
    and a transaction with such a write in it waits for the store no longer than the
    least bound of its writers (before, a bounded thread wrote alone, never batched)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._queue: list[_Waiting] = []
        self._busy = False  # a transaction is under way (its leader writes the queue)
        self.transactions = 0  # committed or failed, for tests and benchmarks

    @property
    def waiting(self) -> int:
        """Writes queued behind the transaction under way."""
        with self._lock:
            return len(self._queue)

    def run(self, write: Write) -> None:
        """Run ``write`` in a transaction, maybe beside other threads' writes; returns
        when it is committed, raises what it raised (or the commit's error)."""
        me = _Waiting(write, self.db.thread_bound())
        started = time.monotonic()
        with self._lock:
            self._queue.append(me)
            lead = not self._busy
            self._busy = True
        if not lead:
            self._wait_turn(me, started)
            if not me.lead:
                if me.error is not None:
                    raise me.error
                return
        with self._lock:
            batch, self._queue = self._queue, []
        self._write(batch)
        with self._lock:
            following = self._queue[0] if self._queue else None
            if following is None:
                self._busy = False
            else:  # handed the lead under the lock: a writer leaving the queue sees it
                following.lead = True
                following.done.set()
        for waiting in batch:
            if waiting is not me:
                waiting.done.set()
        if me.error is not None:
            raise me.error

    def _wait_turn(self, me: _Waiting, started: float) -> None:
        """Until ``me`` is written or leads; within its bound while it is only queued."""
        if me.bound is None or me.done.wait(me.bound):
            me.done.wait()
            return
        with self._lock:
            queued = not me.done.is_set() and me in self._queue
            if queued:
                self._queue.remove(me)
        if queued:
            raise self.db.refuse_busy(
                started,
                "another thread's transaction of this process waits for its database "
                "(locked by another process, or connection)",
            )
        me.done.wait()  # in a transaction under way, bounded by its writers' least bound

    def _write(self, batch: list[_Waiting]) -> None:
        try:
            self._transaction(batch)
            return
        except BaseException as exc:
            if len(batch) == 1 or isinstance(exc, StoreBusy):  # busy for each of them
                for waiting in batch:
                    waiting.error = exc
                return
        for waiting in batch:  # one write spoiled the batch: each alone, to know which
            try:
                self._transaction([waiting])
            except BaseException as exc:
                waiting.error = exc

    def _transaction(self, batch: list[_Waiting]) -> None:
        self.transactions += 1
        bounds = [w.bound for w in batch if w.bound is not None]
        bound = min(bounds) if bounds else None
        with self.db.waiting_at_most(bound), self.db.transaction() as conn:
            for waiting in batch:
                waiting.write(conn)
