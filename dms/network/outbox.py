"""Frames that any thread queues and one trio task writes.

Actor threads hand a frame straight to its stream's writer task: they append
it here and signal a wake-up descriptor (an eventfd on Linux, a socket pair
elsewhere) that the writer awaits with ``trio.lowlevel.wait_readable``. The
writer runs in the same scheduler pass that sees the descriptor ready.
Entering trio with ``TrioToken.run_sync_soon`` instead wakes trio's entry-queue
task, which can only reschedule the writer for the next pass: one more task
step and one more pass per frame (see specs/network.md, "Threads").
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import threading

import trio


class OutboxFull(Exception):
    """The box holds its most frames or bytes: the peer is not reading fast enough."""


class Outbox:
    """A thread-safe, bounded queue of frames with one trio consumer.

    ``put`` works from any thread; ``take`` and ``release`` belong to the one trio
    task that drains the box. It holds at most ``max_frames`` frames and
    ``max_bytes`` bytes (one frame larger than that is taken alone, into an empty
    box); ``put`` raises ``OutboxFull`` past either. After ``close`` nothing more
    is accepted, and ``take`` returns what was queued before, then ``[]``.
    """

    def __init__(self, max_frames: int | None = None, max_bytes: int | None = None) -> None:
        self._frames: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        # Guards the descriptors against a put racing release: a write to a closed
        # (and perhaps reused) descriptor number would corrupt someone else's socket.
        self._lock = threading.Lock()
        self._closed = False
        self._released = False
        self._eventfd: int | None = None
        self._pair: tuple[socket.socket, socket.socket] | None = None
        if hasattr(os, "eventfd"):
            self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            reader, writer = socket.socketpair()
            reader.setblocking(False)
            writer.setblocking(False)
            self._pair = (reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, frame: bytes) -> bool:
        """Queue ``frame`` and wake the writer; False, and nothing queued, once closed.
        ``OutboxFull``, and nothing queued, when the box is full."""
        with self._lock:
            if self._closed:
                return False
            if self._frames and (
                (self.max_frames is not None and len(self._frames) >= self.max_frames)
                or (self.max_bytes is not None and self._bytes + len(frame) > self.max_bytes)
            ):
                raise OutboxFull(f"{len(self._frames)} frames ({self._bytes} bytes) already queued")
            self._frames.append(frame)
            self._bytes += len(frame)
            self._signal()
        return True

    def __len__(self) -> int:
        return len(self._frames)

    def close(self) -> None:
        """Accept no more frames; the writer still takes those already queued."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._signal()

    async def take(self) -> list[bytes]:
        """Every queued frame, waiting for one if there are none; ``[]`` once closed
        and empty."""
        while True:
            with self._lock:
                if self._frames:
                    batch = list(self._frames)
                    self._frames.clear()
                    self._bytes = 0
                    return batch
                if self._closed:
                    return []
            await trio.lowlevel.wait_readable(self._readable())
            self._consume_signal()

    def take_nowait(self) -> list[bytes]:
        """Every queued frame, without waiting."""
        with self._lock:
            batch = list(self._frames)
            self._frames.clear()
            self._bytes = 0
            return batch

    def release(self) -> None:
        """Close the descriptors; the consumer calls it once it will wait no more."""
        with self._lock:
            self._closed = True
            if self._released:
                return
            self._released = True
            if self._eventfd is not None:
                trio.lowlevel.notify_closing(self._eventfd)
                os.close(self._eventfd)
            elif self._pair is not None:  # pragma: no cover - not Linux
                trio.lowlevel.notify_closing(self._pair[0])
                for sock in self._pair:
                    sock.close()

    def _readable(self) -> int | socket.socket:
        if self._eventfd is not None:
            return self._eventfd
        assert self._pair is not None
        return self._pair[0]

    def _signal(self) -> None:
        # Never blocks: a full counter or buffer means a wake-up is already pending.
        with contextlib.suppress(BlockingIOError):
            if self._eventfd is not None:
                os.eventfd_write(self._eventfd, 1)
            elif self._pair is not None:  # pragma: no cover - not Linux
                self._pair[1].send(b"\0")

    def _consume_signal(self) -> None:
        with contextlib.suppress(BlockingIOError):
            if self._eventfd is not None:
                os.eventfd_read(self._eventfd)
            elif self._pair is not None:  # pragma: no cover - not Linux
                self._pair[0].recv(4096)
