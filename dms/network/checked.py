"""Gossip frames whose signature the topic validator has already checked.

py-libp2p runs our topic validator before it queues a message for our
subscription, and the actor system would then check the same signature again:
two Ed25519 verifications per broadcast on every node. The validator remembers
the frames it passed; the subscription pump tells the actor system when a frame
it delivers is, byte for byte, one of them.

The key is the content, not py-libp2p's message id: py-libp2p caches validation
results by (sender, seqno), so a message that reuses an id with other content
can reach the queue without our validator. Such a frame is not found here, and
is checked in full.
"""

from __future__ import annotations

from collections import OrderedDict

from dms.security.identity import SIGNATURE_BYTES

DEFAULT_CAPACITY = 1024


class CheckedFrames:
    """A bounded memory of checked frames; one trio thread uses it (no lock)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._frames: OrderedDict[bytes, bytes] = OrderedDict()

    def remember(self, frame: bytes) -> None:
        key = frame[-SIGNATURE_BYTES:]
        self._frames[key] = frame
        self._frames.move_to_end(key)
        # Frames validated but never delivered (py-libp2p drops some after
        # validation) must not pile up.
        while len(self._frames) > self._capacity:
            self._frames.popitem(last=False)

    def take(self, frame: bytes) -> bool:
        """True, once, if exactly these bytes were remembered."""
        return self._frames.pop(frame[-SIGNATURE_BYTES:], None) == frame

    def __len__(self) -> int:
        return len(self._frames)
