"""A patch to py-libp2p's TCP stream.

**A TCP connection reads ahead.** Noise reads each message as a 2-byte length and
then its body, and py-libp2p's TCP stream made a ``recv`` of each (and took its
read lock, a trio checkpoint, for each): two socket reads per frame, where one
brings both. A read now asks the socket for at least ``TCP_READ_AHEAD`` bytes and
serves the next reads from what came beyond what was asked, in order (each still a
trio schedule point, as a socket read was); at most that many bytes a connection
wait there (the kernel held them before).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

log = logging.getLogger("dms.network")


# The least a TCP connection asks its socket for; what comes beyond the read that asked
# is kept for the next reads (at most this much a connection).
TCP_READ_AHEAD = 4096


def read_ahead_on_tcp() -> bool:
    from libp2p.io.trio import TrioTCPStream

    if not hasattr(TrioTCPStream, "read") or hasattr(TrioTCPStream, "_ahead"):
        log.info("py-libp2p's TCP stream changed shape; it reads as before")
        return False
    read = TrioTCPStream.read
    TrioTCPStream._ahead = b""  # what the last socket read brought beyond its ask

    async def read_ahead(self: Any, n: int | None = None) -> bytes:
        # A function patched in as TrioTCPStream.read: ``self`` is py-libp2p's stream.
        if n == 0:
            return b""
        if self._ahead:
            # A schedule point, as each socket read was: a task woken by the frame just
            # read runs before the next frame is taken (a stream's reset that came in
            # the same segment as its protocol's acknowledgement is not seen before the
            # opener's first write, which it was not either).
            await trio.lowlevel.checkpoint()
        if not self._ahead:  # (another reader may have taken it meanwhile)
            data = await read(self, None if n is None else max(n, TCP_READ_AHEAD))
            if self._ahead:  # another reader's read, queued before this one, kept some
                self._ahead += data
            elif n is None or len(data) <= n:
                return data
            else:
                self._ahead = data
        ahead = self._ahead
        out = ahead if n is None else ahead[:n]
        self._ahead = ahead[len(out) :]
        return out

    TrioTCPStream.read = read_ahead
    return True
