"""The final answers of the allocations that ended on this node, kept a while.

An allocation's actor stops as soon as it ends; a late ``/dms/allocation/status``
(or ``logs``, ``start``, ``stop``, ``session``) is answered by the node from its
record (:class:`dms.jobs.allocation.EndedAllocation`), as the actor answered it.
At most ``kept`` records, each for ``keep_s`` after its end: the oldest go first.
In memory only: an allocation's process died with a restart, and its record too.
See ``specs/orchestration.md``, "An ended allocation".
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from dms.jobs.allocation import EndedAllocation


class EndedAllocations:
    """Records by inbox, in the order they ended; thread-safe (the receive pipeline
    asks ``holds`` on the network's thread, the node adds and reads on its own)."""

    def __init__(self, kept: int, keep_s: float) -> None:
        self.kept = kept
        self.keep_s = keep_s
        self._records: OrderedDict[str, EndedAllocation] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, record: EndedAllocation) -> None:
        with self._lock:
            self._records[record.inbox] = record
            self._records.move_to_end(record.inbox)
            self._prune(time.monotonic())

    def get(self, inbox: str, key: bytes) -> EndedAllocation | None:
        """The record of the allocation at ``inbox`` with that key, if still kept."""
        with self._lock:
            self._prune(time.monotonic())
            record = self._records.get(inbox)
        return record if record is not None and record.key == key else None

    def holds(self, inbox: str, key: bytes) -> bool:
        return self.get(inbox, key) is not None

    def _prune(self, now: float) -> None:
        """Under the lock: drop the records past the count or the age bound."""
        records = self._records
        while len(records) > self.kept:
            records.popitem(last=False)
        while records:
            oldest = next(iter(records.values()))
            if now - oldest.ended <= self.keep_s:
                break
            records.popitem(last=False)

    @property
    def gone(self) -> str:
        """Added to the refusal of a poll for an allocation that is not here."""
        return (
            f"an ended allocation answers here for ended_allocation_keep_s = {self.keep_s:g} s "
            f"after its end, the last ended_allocations_kept = {self.kept} of them"
        )

    def __len__(self) -> int:
        with self._lock:
            self._prune(time.monotonic())
            return len(self._records)
