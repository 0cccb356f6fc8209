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
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection

from dms.store.db import Database

Write = Callable[[Connection], Any]


class _Waiting:
    __slots__ = ("done", "error", "lead", "write")

    def __init__(self, write: Write) -> None:
        self.write = write
        self.done = threading.Event()
        self.lead = False  # woken to lead the next transaction, not because it is written
        self.error: BaseException | None = None


class GroupCommit:
    """Runs ``write(conn)`` calls of any thread inside shared transactions of ``db``."""

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
        if self.db.bounded:
            # This thread may wait for the store only so long (the node's own thread,
            # Database.waiting_at_most): a transaction of its own, never behind a batch
            # another thread leads, which may wait for the store as long as it must.
            self.transactions += 1
            with self.db.transaction() as conn:
                write(conn)
            return
        me = _Waiting(write)
        with self._lock:
            self._queue.append(me)
            lead = not self._busy
            self._busy = True
        if not lead:
            me.done.wait()
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
        for waiting in batch:
            if waiting is not me:
                waiting.done.set()
        if following is not None:
            following.lead = True
            following.done.set()
        if me.error is not None:
            raise me.error

    def _write(self, batch: list[_Waiting]) -> None:
        try:
            self._transaction(batch)
            return
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
        for waiting in batch:  # one write spoiled the batch: each alone, to know which
            try:
                self._transaction([waiting])
            except BaseException as exc:
                waiting.error = exc

    def _transaction(self, batch: list[_Waiting]) -> None:
        self.transactions += 1
        with self.db.transaction() as conn:
            for waiting in batch:
                waiting.write(conn)
