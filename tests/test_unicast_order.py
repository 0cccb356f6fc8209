"""Frames to one peer leave in the order each thread sent them (specs/network.md,
"Unicast", order).

Before, a frame for a peer with no stream yet waited for it in a task of its own, and
those tasks put their frames into the fresh stream's outbox in trio's scheduling order;
a frame sent once the stream was open went straight into the outbox, ahead of those
still waiting. A probe numbering 301 frames (a flood, then a request) had the request
read 5th or 6th (tests/adversarial/test_adversarial_flood.py, ee0becf).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from dms.network.host import Libp2pTransport
from dms.network.settings import NetworkSettings
from dms.security.identity import Identity
from tests.conftest import wait_for

# Each thread sends until the receiver has read a frame of either, or this many, then,
# once the receiver has read one, AFTER more: those go on an open stream, while earlier
# frames may still be on their way to it (all together under max_outbound_frames). Every
# YIELD_EVERY frames a sender lets the other threads run (the GIL), so the trio thread
# catches up meanwhile and sends flip from trio's entry queue to the outbox.
BEFORE = 3000
AFTER = 2000
YIELD_EVERY = 20
THREADS = ("a", "b")


def transport(receiver: Any = None, undeliverable: Any = None, **settings: Any) -> Libp2pTransport:
    s = NetworkSettings(
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht=False,
        reachability="public",
        hole_punching=False,
        **settings,
    )
    t = Libp2pTransport(Identity.generate(), s)
    t.start(receiver or (lambda frame, from_peer, *, signature_checked=False: None), undeliverable)
    return t


def out_of_place(numbers: list[int]) -> list[tuple[int, int]]:
    """(position read, number) of each frame not read at its number's place."""
    return [(pos, n) for pos, n in enumerate(numbers) if n != pos]


def test_frames_sent_while_the_stream_opens_are_read_in_each_threads_order(
    started: list[Libp2pTransport],
) -> None:
    read: list[bytes] = []
    first = threading.Event()

    def receive(frame: bytes, from_peer: str | None, *, signature_checked: bool = False) -> None:
        read.append(frame)
        first.set()

    # No frame budget in the way: every frame is delivered, none refused.
    receiver = transport(
        receive,
        max_frames_per_s=1e9,
        frame_burst=10**9,
        max_unknown_frames_per_s=1e9,
        unknown_frame_burst=10**9,
    )
    started.append(receiver)
    lost: list[str] = []
    sender = transport(undeliverable=lambda frame, reason: lost.append(reason))
    started.append(sender)
    # Its addresses only: no stream to it until the first frame (py-libp2p's
    # auto-connector may connect to it first; the stream opens on the first send).
    sender.learn_addrs(receiver.peer_id, receiver.addrs())

    sent: dict[str, int] = {}
    go = threading.Barrier(len(THREADS))

    def send(name: str) -> None:
        n = 0

        def one() -> None:
            nonlocal n
            sender.send(receiver.peer_id, b"%s:%d" % (name.encode(), n))
            n += 1
            if n % YIELD_EVERY == 0:
                time.sleep(0)

        go.wait()
        while not first.is_set() and n < BEFORE:
            one()
        if not first.wait(60):
            return  # no frame read: the test fails below, this sender unfinished
        for _ in range(AFTER):
            one()
        sent[name] = n

    threads = [threading.Thread(target=send, args=(name,)) for name in THREADS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(sent) == len(THREADS), "a sender did not finish"
    total = sum(sent.values())
    wait_for(lambda: len(read) >= total or lost, 60, f"the receiver to read {total} frames")
    assert lost == []
    assert len(read) == total

    for name in THREADS:
        numbers = [int(f.split(b":")[1]) for f in read if f.startswith(name.encode() + b":")]
        misplaced = out_of_place(numbers)
        # Before: thousands out of place, frames sent after the stream opened read among
        # the first.
        assert not misplaced, (
            f"thread {name}: {len(misplaced)} of {len(numbers)} frames read out of place; "
            f"(position read, number) first: {misplaced[:5]}; last frame read at "
            f"{numbers.index(sent[name] - 1)}"
        )
