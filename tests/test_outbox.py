"""The outbox that carries frames from actor threads to a stream's writer task."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dms.network.outbox import Outbox


async def _drain_until(box: Outbox, count: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < count:
        batch = await box.take()
        assert batch, "take returned [] before the box was closed"
        got += batch
    return got


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.binary(min_size=1, max_size=8), max_size=40), min_size=1, max_size=4))
def test_frames_from_many_threads_all_arrive_each_thread_in_order(
    per_thread: list[list[bytes]],
) -> None:
    """What the writer gets is every frame put, and each sender's frames in its order."""
    tagged = [[bytes([t]) + f for f in frames] for t, frames in enumerate(per_thread)]
    total = sum(len(frames) for frames in tagged)
    box = Outbox()

    async def main() -> list[bytes]:
        threads = [threading.Thread(target=lambda fs=fs: [box.put(f) for f in fs]) for fs in tagged]
        for thread in threads:
            thread.start()
        with trio.fail_after(10):
            got = await _drain_until(box, total)
        for thread in threads:
            thread.join()
        box.release()
        return got

    got = trio.run(main)
    assert sorted(got) == sorted(f for fs in tagged for f in fs)
    for t, frames in enumerate(tagged):
        assert [f for f in got if f[0] == t] == frames


def test_a_put_from_another_thread_wakes_a_waiting_writer() -> None:
    box = Outbox()

    async def main() -> list[bytes]:
        async with trio.open_nursery() as nursery:
            result: list[bytes] = []

            async def writer() -> None:
                result.extend(await box.take())

            nursery.start_soon(writer)
            await trio.sleep(0.05)  # the writer is parked on the descriptor
            await trio.to_thread.run_sync(box.put, b"frame")
        box.release()
        return result

    assert trio.run(main) == [b"frame"]


def test_close_refuses_new_frames_but_hands_over_queued_ones() -> None:
    box = Outbox()
    assert box.put(b"a") and box.put(b"b")
    box.close()
    assert box.closed
    assert box.put(b"late") is False

    async def main() -> tuple[list[bytes], list[bytes]]:
        first = await box.take()
        then = await box.take()  # closed and empty: no wait
        box.release()
        return first, then

    assert trio.run(main) == ([b"a", b"b"], [])


def test_close_wakes_a_writer_waiting_on_an_empty_box() -> None:
    box = Outbox()

    async def main() -> list[bytes]:
        async with trio.open_nursery() as nursery:
            result: list[list[bytes]] = []

            async def writer() -> None:
                result.append(await box.take())

            nursery.start_soon(writer)
            await trio.sleep(0.05)
            await trio.to_thread.run_sync(box.close)
        box.release()
        return result[0]

    assert trio.run(main) == []


@pytest.mark.skipif(not hasattr(os, "eventfd"), reason="eventfd is Linux only")
def test_release_closes_the_descriptor_and_later_puts_touch_nothing() -> None:
    box = Outbox()
    fd = box._readable()
    assert isinstance(fd, int)

    async def main() -> None:
        box.release()

    trio.run(main)
    with pytest.raises(OSError):
        os.fstat(fd)
    # A stale sender must not write to the number, which another socket may now own.
    reused = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert box.put(b"late") is False
        with pytest.raises(BlockingIOError):
            os.eventfd_read(reused)
    finally:
        os.close(reused)


@pytest.mark.skipif(sys.platform == "win32", reason="no RLIMIT_NOFILE")
def test_the_open_file_limit_is_lifted_to_the_hard_one() -> None:
    """A descriptor per outbound stream on top of a socket per connection does not fit
    a 1024 soft limit at scale; a starting host lifts the soft limit to the hard one."""
    script = (
        "import resource\n"
        "from dms.network.host import raise_open_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "raise_open_file_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    soft, hard = int(out[0]), int(out[1])
    assert soft > 256
    assert soft == hard or hard < 0  # RLIM_INFINITY is -1: lifted to a finite ceiling


def test_a_bounded_box_refuses_past_its_frames_or_bytes_and_takes_one_large_frame() -> None:
    from dms.network.outbox import OutboxFull

    box = Outbox(max_frames=2, max_bytes=100)
    assert box.put(b"a") and box.put(b"b")
    with pytest.raises(OutboxFull):
        box.put(b"c")  # a third frame
    assert box.take_nowait() == [b"a", b"b"]
    assert box.put(b"x" * 60)
    with pytest.raises(OutboxFull):
        box.put(b"y" * 41)  # 101 bytes
    box.take_nowait()
    assert box.put(b"z" * 500)  # larger than the bound, but alone: it must go somehow
    assert len(box) == 1

    async def release() -> None:
        box.release()

    trio.run(release)
