"""A frame sent as its host stops is carried or reported (specs/network.md, "Unicast",
on stop): the sender learns of every frame the host no longer carries.

Before, the frames in a peer's outbox when the host stopped (queued behind a write
its peer had not taken, or put on the fast path between ``stop()`` and the writer's
end) went with the writer, none reported: 10,439 frames sent to a peer that had
stopped reading were neither read nor reported.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from dms.actor.codes import Unreachable
from dms.network.host import Libp2pTransport
from dms.network.settings import NetworkSettings
from dms.security.identity import Identity
from tests.conftest import wait_for

# Frames sent once the peer stops reading before the host is stopped (its stream's
# window, 256 KiB, takes a few hundred of them; the rest wait in the outbox), and the
# frames between two pauses of the sending thread (the other threads run meanwhile: the
# trio threads, and the one that stops the host).
PILED = 3000
YIELD_EVERY = 20
PAUSE_S = 0.005
PADDING = b"." * 512


def transport(receiver: Any = None, undeliverable: Any = None) -> Libp2pTransport:
    # No frame budget in the way: every frame read is delivered, none refused.
    s = NetworkSettings(
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht=False,
        reachability="public",
        hole_punching=False,
        max_frames_per_s=1e9,
        frame_burst=10**9,
        max_unknown_frames_per_s=1e9,
        unknown_frame_burst=10**9,
    )
    t = Libp2pTransport(Identity.generate(), s)
    t.start(receiver or (lambda frame, from_peer, *, signature_checked=False: None), undeliverable)
    return t


def number(frame: bytes) -> int:
    return int(frame.split(b":", 1)[0])


def test_frames_sent_as_the_host_stops_are_carried_or_reported(
    started: list[Libp2pTransport],
) -> None:
    read: set[int] = set()
    hold = threading.Event()  # the reader holds its trio thread (reads nothing) until set
    holding = threading.Event()

    def receive(frame: bytes, from_peer: str | None, *, signature_checked: bool = False) -> None:
        read.add(number(frame))
        if not hold.is_set():
            holding.set()
            hold.wait(120)

    reader = transport(receive)
    started.append(reader)
    reported: set[int] = set()
    stopped: set[int] = set()  # reported as the network is stopped
    reported_lock = threading.Lock()

    def undeliverable(frame: bytes, reason: str) -> None:
        with reported_lock:
            reported.add(number(frame))
            if reason == "the network is stopped":
                stopped.add(number(frame))

    sender = transport(undeliverable=undeliverable)
    started.append(sender)
    sender.learn_addrs(reader.peer_id, reader.addrs())

    sent = 0
    refused: list[int] = []  # frames whose send raised Unreachable

    def send() -> None:
        nonlocal sent
        while True:
            try:
                sender.send(reader.peer_id, b"%d:%s" % (sent, PADDING))
            except Unreachable:
                refused.append(sent)
                return
            sent += 1
            if sent % YIELD_EVERY == 0:
                time.sleep(PAUSE_S)

    sending = threading.Thread(target=send, daemon=True)
    try:
        sending.start()
        assert holding.wait(60), "the reader read no frame"
        piled = sent + PILED
        wait_for(lambda: sent >= piled, 60, f"{PILED} more frames sent")
        # The sender goes on sending on the fast path as the host stops.
        sender.stop()
        sending.join(60)
        assert not sending.is_alive(), "send never raised Unreachable once the host stopped"
    finally:
        hold.set()

    def unaccounted() -> list[int]:
        """Frames neither read nor reported, after the first one reported stopped."""
        with reported_lock:
            first = min(stopped, default=sent)
            return [n for n in range(first, sent) if n not in read and n not in reported]

    # The reader released reads what the host wrote before it stopped (those frames
    # come first: a peer's frames leave in order), but for what its own side drops with
    # the closed connection; every frame after those is reported.
    deadline = time.monotonic() + 30
    while unaccounted() and time.monotonic() < deadline:
        time.sleep(0.1)
    lost = [n for n in range(sent) if n not in read and n not in reported]
    assert stopped, (
        f"no frame reported stopped: {len(lost)} of {sent} frames neither read nor "
        f"reported (read {len(read)}, reported {len(reported)}); the first: {lost[:5]}"
    )
    unreported = unaccounted()
    assert not unreported, (
        f"{len(unreported)} frames after the first one reported stopped ({min(stopped)}) "
        f"neither read nor reported; the first: {unreported[:5]}"
    )
    assert refused == [sent]
