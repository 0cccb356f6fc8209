"""The node process's C allocator (``dms/node/allocator.py``): freed heap pages go back
to the system once enough were freed (specs/security.md, "Freed heap pages go back").
The daemon-level test is ``tests/adversarial/test_adversarial_heap.py``."""

from __future__ import annotations

import ctypes

import psutil
import pytest

from dms.node.allocator import HeapTrimmer

MIB = 1024 * 1024
BLOCK = 64 * 1024  # under glibc's mmap threshold: from the heap


def test_the_trimmer_gives_freed_heap_pages_back_once_enough_were_freed() -> None:
    """32 MiB of heap blocks, written and freed under a block still in use (so the
    heap cannot shrink from its top): the RSS stays until a check trims; a check with
    nothing freed since does not trim."""
    trimmer = HeapTrimmer(interval_s=0, freed_bytes=16 * MIB)  # not started: checked here
    if trimmer.free_bytes() is None:
        pytest.skip("needs glibc 2.33 (mallinfo2)")
    process = psutil.Process()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    trimmer.check()  # what was freed before this test is not the test's
    blocks = [libc.malloc(BLOCK) for _ in range(512)]
    pin = libc.malloc(BLOCK)  # in use above them
    try:
        for block in blocks:
            ctypes.memset(block, 1, BLOCK)
        full = process.memory_info().rss
        assert not trimmer.check()  # nothing freed yet
        for block in blocks:
            libc.free(block)
        assert process.memory_info().rss > full - 8 * MIB  # freed, not given back
        assert trimmer.check()
        assert process.memory_info().rss < full - 24 * MIB
        assert not trimmer.check()  # nothing freed since the trim
        assert trimmer.trims == 1
    finally:
        libc.free(pin)
