"""The C allocator of a node process: what it frees goes back to the system.

glibc maps a block of at least ``M_MMAP_THRESHOLD`` bytes apart and unmaps it on
free, but its threshold rises to the size of each mapped block freed (up to 32
MiB): after the first 16 MiB frame a node refused, the next ones came from its
heaps and stayed in its RSS when freed (specs/security.md, "Verify before
decode"). Setting the threshold fixes it, which turns the rise off.

Smaller blocks come from the heaps, and a heap gives its free pages back only
from its top: a flood of many peers' frames at once (200 keys writing 420 KB
each) left ~25-37 MB of free pages in the network thread's heap, under blocks
still in use, for as long as the node ran (specs/security.md, "Freed heap pages
go back"). :class:`HeapTrimmer` gives them back with ``malloc_trim`` once that
much was freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


def freeze_start_heap() -> int:
    """Collect once, then keep every object alive now out of the collector's future
    passes (``gc.freeze``); the objects frozen.

    A started node holds some 180,000 objects that live as long as it does (modules,
    classes, the network stack, its actors). Python's full collection walks them all
    whenever a quarter as many again have survived since the last one: 120-175 ms of
    CPU in a daemon of the placement bench, every few seconds across 21 processes,
    during which that process answers nothing; the slowest placements were the ones
    caught behind one (specs/orchestration.md, "Seventh pass: the tail"). Frozen, a
    full collection walks only what came after. Frozen objects are still freed when
    no longer referenced; a cycle among them is not (for a process that runs one
    node: ``dms run`` calls this once, after its start)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _libc_function(name: str) -> Any:
    """``name`` of the C library, or None where it has none (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, name)
    except (OSError, AttributeError):
        log.info("no %s in this C library: the allocator keeps its own ways", name)
        return None


def return_large_blocks(threshold: int) -> bool:
    """Blocks of ``threshold`` bytes or more are mapped apart from now on (0: leave
    glibc's own threshold). False where the C library has no ``mallopt`` (not glibc)."""
    if threshold <= 0:
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


class _Mallinfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h, glibc 2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


class HeapTrimmer:
    """Every ``interval_s``, if the heaps' free bytes rose by ``freed_bytes`` or more
    above their lowest since the last trim (blocks were freed: a flood's buffers, a
    job's data), give their free pages back to the system (``malloc_trim(0)``: the
    free pages of every arena, not only those at the top of each). A node that holds
    still never trims. Started and stopped by whoever runs the node (``dms run``)."""

    def __init__(self, interval_s: float, freed_bytes: int) -> None:
        self.interval_s = interval_s
        self.freed_bytes = freed_bytes
        self.trims = 0
        self._trim = _libc_function("malloc_trim")
        self._info = _libc_function("mallinfo2")
        if self._trim is not None and self._info is not None:
            self._trim.argtypes = [ctypes.c_size_t]
            self._trim.restype = ctypes.c_int
            self._info.argtypes = []
            self._info.restype = _Mallinfo2
        self._low: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heap-trimmer", daemon=True)

    def free_bytes(self) -> int | None:
        """Bytes free in the heaps (given back or not), or None without glibc 2.33."""
        if self._trim is None or self._info is None:
            return None
        return int(self._info().fordblks)

    def start(self) -> HeapTrimmer:
        """Start watching (nothing to do without glibc 2.33, or with interval 0)."""
        if self.interval_s > 0 and self.free_bytes() is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval_s + 5)

    def check(self) -> bool:
        """Trim if enough was freed since the last trim; whether it trimmed."""
        free = self.free_bytes()
        if free is None:
            return False
        if self._low is None or free < self._low:
            self._low = free
        if free - self._low < self.freed_bytes:
            return False
        assert self._trim is not None
        self._trim(0)
        self.trims += 1
        self._low = free  # trimmed pages still count as free: freed again is above this
        log.debug("heap trimmed: %d bytes free in the heaps given back", free)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
