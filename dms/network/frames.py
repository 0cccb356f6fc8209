"""Length-prefixed frames on a byte stream.

Every actor message on a unicast stream is ``u32 big-endian length | frame``.
The length is checked against the limit before a byte of the body is read, so
a peer announcing 2 GiB costs us four bytes, not a buffer.
"""

from __future__ import annotations

import struct
from typing import Protocol

PREFIX = struct.Struct(">I")


class FrameError(Exception):
    """The stream broke the framing rules; the stream must be dropped."""


class Reader(Protocol):
    async def read(self, n: int | None = -1) -> bytes: ...


def encode_frame(frame: bytes) -> bytes:
    return PREFIX.pack(len(frame)) + frame


class FrameReader:
    """Reads whole frames from a stream whose ``read(n)`` may return fewer bytes."""

    def __init__(self, stream: Reader, max_bytes: int) -> None:
        self._stream = stream
        self._max = max_bytes
        self._buffer = bytearray()

    async def _fill(self, n: int) -> None:
        while len(self._buffer) < n:
            chunk = await self._stream.read(max(n - len(self._buffer), 65536))
            if not chunk:
                raise EOFError
            self._buffer += chunk

    async def next(self) -> bytes:
        """The next frame; ``EOFError`` at a clean end, ``FrameError`` on a bad one."""
        try:
            await self._fill(PREFIX.size)
        except EOFError:
            if self._buffer:
                raise FrameError("stream ended inside a length prefix") from None
            raise
        (length,) = PREFIX.unpack_from(self._buffer)
        if length > self._max:
            raise FrameError(f"frame of {length} bytes announced; the limit is {self._max}")
        if length == 0:
            raise FrameError("empty frame")
        try:
            await self._fill(PREFIX.size + length)
        except EOFError:
            raise FrameError(
                f"stream ended after {len(self._buffer) - PREFIX.size} of {length} bytes"
            ) from None
        frame = bytes(self._buffer[PREFIX.size : PREFIX.size + length])
        del self._buffer[: PREFIX.size + length]
        return frame
