"""The memory of gossip frames whose signature the topic validator checked."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from dms.network.checked import CheckedFrames
from dms.security.identity import SIGNATURE_BYTES


def frame(body: bytes, signature: bytes | None = None) -> bytes:
    return body + (signature or os.urandom(SIGNATURE_BYTES))


def test_a_remembered_frame_is_vouched_for_once() -> None:
    checked = CheckedFrames()
    f = frame(b"heartbeat")
    checked.remember(f)
    assert checked.take(f) is True
    assert checked.take(f) is False  # a second delivery is checked in full


@given(st.binary(min_size=1, max_size=64), st.binary(min_size=1, max_size=64))
def test_other_bytes_under_the_same_signature_are_not_vouched_for(a: bytes, b: bytes) -> None:
    """A frame reusing a checked frame's signature with another body (what a replay
    through py-libp2p's id-keyed validation cache could deliver) gets a full check."""
    checked = CheckedFrames()
    signature = os.urandom(SIGNATURE_BYTES)
    checked.remember(frame(a, signature))
    assert checked.take(frame(b, signature)) is (a == b)


def test_frames_never_delivered_do_not_pile_up() -> None:
    checked = CheckedFrames(capacity=8)
    frames = [frame(bytes([i])) for i in range(20)]
    for f in frames:
        checked.remember(f)
    assert len(checked) == 8
    assert checked.take(frames[-1]) and not checked.take(frames[0])
