"""A frame sent as its host stops is carried or reported (specs/network.md, "Unicast",
on stop): the sender learns of every frame the host no longer carries.

Before, the frames in a peer's outbox when the host stopped (queued behind a write
its peer had not taken, or put on the fast path between ``stop()`` and the writer's
end) went with the writer, none reported: 10,439 frames sent to a peer that had
stopped reading were neither read nor reported.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import sys
import termios
import threading
import time
from typing import Any

import pytest
from libp2p.io.trio import TrioTCPStream

from dms.actor.codes import Unreachable
from dms.network import outbound as outbound_module
from dms.network.host import Libp2pTransport
from dms.network.loop import NetworkError
from dms.network.relay import is_relayed
from dms.network.settings import NetworkSettings
from dms.security.identity import Identity
from tests.conftest import raised_by, wait_for

# Frames sent once the peer stops reading before the host is stopped (its stream's
# window, 256 KiB, takes a few hundred of them; the rest wait in the outbox), and the
# frames between two pauses of the sending thread (the other threads run meanwhile: the
# trio threads, and the one that stops the host).
PILED = 3000
YIELD_EVERY = 20
PAUSE_S = 0.005
PADDING = b"." * 512
BIG_FRAMES = 200
BIG = b"." * 64 * 1024
# A send buffer (the kernel doubles it) far smaller than a Yamux stream's window.
SMALL_SNDBUF = 8 * 1024


def transport(receiver: Any = None, undeliverable: Any = None, **more: Any) -> Libp2pTransport:
    # No frame budget in the way: every frame read is delivered, none refused.
    settings: dict[str, Any] = {"reachability": "public", **more}
    s = NetworkSettings(
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht=False,
        hole_punching=False,
        max_frames_per_s=1e9,
        frame_burst=10**9,
        max_unknown_frames_per_s=1e9,
        unknown_frame_burst=10**9,
        **settings,
    )
    t = Libp2pTransport(Identity.generate(), s)
    t.start(receiver or (lambda frame, from_peer, *, signature_checked=False: None), undeliverable)
    return t


def send_held(fd: int, settle_s: float = 0.2) -> bool:
    """The socket ``fd`` takes nothing more: not writable, and its send queue (the
    bytes its peer has not acknowledged, ``SIOCOUTQ``) unchanged ``settle_s`` on. A
    send that had more to write waits on it, in trio's ``wait_writable``."""
    queued = fcntl.ioctl(fd, termios.TIOCOUTQ, struct.pack("i", 0))
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if poller.poll(0):
        return False
    time.sleep(settle_s)
    return not poller.poll(0) and fcntl.ioctl(fd, termios.TIOCOUTQ, queued) == queued


def number(frame: bytes) -> int:
    return int(frame.split(b":", 1)[0])


class Deaf:
    """A receiver that holds its transport's trio thread from the first frame it reads
    until ``hold`` is set: the transport reads nothing more, not even its sockets."""

    def __init__(self) -> None:
        self.read: set[int] = set()
        self.hold = threading.Event()
        self.holding = threading.Event()

    def __call__(
        self, frame: bytes, from_peer: str | None, *, signature_checked: bool = False
    ) -> None:
        self.read.add(number(frame))
        if not self.hold.is_set():
            self.holding.set()
            self.hold.wait(120)


def test_frames_sent_as_the_host_stops_are_carried_or_reported(
    started: list[Libp2pTransport],
) -> None:
    deaf = Deaf()
    read = deaf.read
    reader = transport(deaf)
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
        assert deaf.holding.wait(60), "the reader read no frame"
        piled = sent + PILED
        wait_for(lambda: sent >= piled, 60, f"{PILED} more frames sent")
        # The sender goes on sending on the fast path as the host stops.
        sender.stop()
        sending.join(60)
        assert not sending.is_alive(), "send never raised Unreachable once the host stopped"
    finally:
        deaf.hold.set()

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


@pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ (the socket's send queue) is Linux's")
def test_a_host_whose_peer_stopped_reading_stops(
    started: list[Libp2pTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that stopped reading, the host's socket to it full: its stop waited for
    the writer's send (a Noise message is sent shielded, up to ``NOISE_SEND_LIMIT_S``;
    made endless here), ``stop()`` returned at its own 10 s bound with the host still
    running, its connections open (30 s with the real limit). The send is cut
    ``CLOSE_GRACE_S`` into the stop (the stream's close, held the same way, too): the
    host stops."""
    from dms.network.libp2p_patches import noise as patches_noise

    monkeypatch.setattr(patches_noise, "NOISE_SEND_LIMIT_S", 3600.0)
    deaf = Deaf()
    reader = transport(deaf)
    started.append(reader)
    sender = transport()
    started.append(sender)
    sender.learn_addrs(reader.peer_id, reader.addrs())
    try:
        sender.send(reader.peer_id, b"0:%s" % PADDING)
        assert deaf.holding.wait(60), "the reader read no frame"
        outbound = sender._outbound[reader.peer_id]
        sock = outbound.stream.muxed_conn.secured_conn.conn.read_writer.read_write_closer
        sock = sock.stream.stream.socket
        # The kernel grows a socket's send buffer up to 4 MiB, past the stream's Yamux
        # window (256 KiB): the writer then waited on the window, not the socket, and
        # stop() cancelled it there. A small fixed buffer fills first.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SNDBUF)
        # More than the peer's window and the sockets' buffers take.
        for n in range(1, BIG_FRAMES):
            sender.send(reader.peer_id, b"%d:%s" % (n, BIG))
        # The writer's send waits on the full socket (the send queue unchanged,
        # the socket not writable): a cancel no longer ends it.
        wait_for(lambda: send_held(sock.fileno()), 60, "the writer's send held by the socket")
        assert raised_by(sender.stop, 60, "stop() to return") is None
        wait_for(sender._done.is_set, 60, "the host to stop")
    finally:
        deaf.hold.set()


def test_a_host_whose_relayed_peer_stopped_reading_stops(
    started: list[Libp2pTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through a relay: the writer's send waits for the window of the sender's
    stream to the relay (the relay forwards nothing more to a peer that reads nothing),
    in the shielded Noise send. Its connection has no socket of its own to close: it was
    never cut, and the host never stopped (30 s with the real limit). Its stream to the
    relay is reset instead: the host stops, its connection to the relay kept to the
    end (other circuits may share it)."""
    from libp2p.stream_muxer.yamux import yamux

    from dms.network.libp2p_patches import noise as patches_noise

    monkeypatch.setattr(patches_noise, "NOISE_SEND_LIMIT_S", 3600.0)
    relay = transport()
    started.append(relay)
    deaf = Deaf()
    reader = transport(deaf, reachability="private", bootstrap=relay.addrs())
    started.append(reader)
    wait_for(lambda: [a for a in reader.addrs() if is_relayed(a)], 60, "a reservation")
    sender = transport()
    started.append(sender)
    sender.learn_addrs(reader.peer_id, [a for a in reader.addrs() if is_relayed(a)])
    try:
        wait_for(lambda: pinged(sender, reader.peer_id), 60, "a ping through the relay")
        # The circuit's streams to the relay are open; the stream the frames go on,
        # opened next, gets a window larger than the two relay streams' together: the
        # sender's stream to the relay is the one that runs out.
        monkeypatch.setattr(yamux, "DEFAULT_WINDOW_SIZE", 64 * 1024 * 1024)
        sender.send(reader.peer_id, b"0:%s" % PADDING)
        assert deaf.holding.wait(60), "the reader read no frame"
        outbound = sender._outbound[reader.peer_id]
        raw = outbound.stream.muxed_conn.secured_conn.conn.read_writer.read_write_closer
        to_relay = getattr(raw, "_wrapped", raw).stream
        assert not isinstance(to_relay, TrioTCPStream), "not relayed"
        # The sender's own connection to the relay, which the cut must leave open.
        relay_raw = to_relay.muxed_stream.muxed_conn.secured_conn.conn.read_writer
        relay_tcp = getattr(relay_raw.read_write_closer, "_wrapped", relay_raw.read_write_closer)
        relay_socket = relay_tcp.stream.stream.socket  # as closing.cut finds it
        kept: list[bool] = []  # after each cut of a held send: the relay's socket open
        real_cut = outbound_module.cut

        async def cut_and_look(muxed_conn: Any) -> bool:
            done = await real_cut(muxed_conn)
            kept.append(relay_socket.fileno() != -1)
            return done

        monkeypatch.setattr(outbound_module, "cut", cut_and_look)
        for n in range(1, BIG_FRAMES):
            sender.send(reader.peer_id, b"%d:%s" % (n, BIG))
        wait_for(
            lambda: window_shut(to_relay.muxed_stream),
            60,
            "the writer's send held by the window to the relay",
        )
        assert raised_by(sender.stop, 60, "stop() to return") is None
        wait_for(sender._done.is_set, 60, "the host to stop")
        assert kept and all(kept), kept  # cut, and the relay's connection kept through it
    finally:
        deaf.hold.set()


def pinged(t: Libp2pTransport, peer_id: str) -> bool:
    try:
        return t.ping(peer_id) > 0
    except NetworkError:
        return False


def window_shut(muxed_stream: Any, settle_s: float = 0.2) -> bool:
    """The Yamux stream grants no window, and ``settle_s`` on still none."""
    if muxed_stream.send_window > 0:
        return False
    time.sleep(settle_s)
    return muxed_stream.send_window == 0
