"""The C allocator of a node process: large blocks go back to the system when freed.

glibc maps a block of at least ``M_MMAP_THRESHOLD`` bytes apart and unmaps it on
free, but its threshold rises to the size of each mapped block freed (up to 32
MiB): after the first 16 MiB frame a node refused, the next ones came from its
heaps and stayed in its RSS when freed (specs/security.md, "Verify before
decode"). Setting the threshold fixes it, which turns the rise off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


def return_large_blocks(threshold: int) -> bool:
    """Blocks of ``threshold`` bytes or more are mapped apart from now on (0: leave
    glibc's own threshold). False where the C library has no ``mallopt`` (not glibc)."""
    if threshold <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no mallopt in this C library: large blocks follow its own threshold")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
