"""dms over QUIC: two real hosts listening on QUIC addresses only (``/udp/0/quic-v1``)
connect and carry dms frames both ways, under the same budgets as over TCP, and an
idle dms stream stays open as over Yamux (specs/network.md, "QUIC")."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dms.network.budgets import Budget
from dms.network.host import Libp2pTransport
from dms.network.settings import NetworkSettings
from dms.security.identity import Identity
from tests.conftest import wait_for

QUIC_LISTEN = "/ip4/127.0.0.1/udp/0/quic-v1"


class Host:
    """A dms transport listening on QUIC alone, with the frames it received and the
    reasons its frames were not delivered."""

    def __init__(self, **settings_: Any) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.undelivered: list[str] = []
        settings = NetworkSettings(
            listen=[QUIC_LISTEN], dht=False, reachability="public", hole_punching=False, **settings_
        )
        self.transport = Libp2pTransport(Identity.generate(), settings)
        self.transport.start(
            lambda frame, peer, *, signature_checked=False: self.received.append((peer, frame)),
            lambda frame, reason: self.undelivered.append(reason),
        )

    @property
    def peer_id(self) -> str:
        return self.transport.peer_id

    def used(self, budget: str) -> int:
        return self.transport.budget_usage()[budget][0]


@contextlib.contextmanager
def two_hosts(**settings: Any) -> Iterator[tuple[Host, Host]]:
    """Two QUIC hosts, the first connected to the second."""
    made: list[Host] = []
    try:
        made.append(Host(**settings))
        made.append(Host(**settings))
        a, b = made
        (addr,) = b.transport.addrs()
        assert "/udp/" in addr and "/quic-v1/" in addr
        assert a.transport.connect(addr) == b.peer_id
        yield a, b
    finally:
        for host in made:
            host.transport.stop()


def sent(sender: Host, receiver: Host, frame: bytes) -> None:
    """``frame`` sent, and received (or the reason it was not, in the failure)."""
    sender.transport.send(receiver.peer_id, frame)
    wait_for(
        lambda: (sender.peer_id, frame) in receiver.received or sender.undelivered,
        what=f"{frame!r} at the receiver",
    )
    assert sender.undelivered == []


def quic_config(monkeypatch: pytest.MonkeyPatch, **values: Any) -> None:
    """Every QUIC transport built from here on has ``values`` in its config."""
    from libp2p.transport.quic.config import QUICTransportConfig

    made = QUICTransportConfig.__post_init__

    def with_values(config: QUICTransportConfig) -> None:
        made(config)
        for name, value in values.items():
            setattr(config, name, value)

    monkeypatch.setattr(QUICTransportConfig, "__post_init__", with_values)


def test_two_hosts_on_quic_exchange_dms_frames() -> None:
    """Before, the connection was made but the listener's side was never the swarm's
    (the inbound gate ran a Noise and Yamux upgrade over a connection QUIC had already
    secured and multiplexed), so every dms stream opened on it failed (StreamFailure:
    the protocol's negotiation unanswered). Now a frame goes each way; the connection
    counts against the dialer's outbound budget (it did not: only Yamux said which
    side dialed) and the listener's inbound one, which has the slot back once the
    dialer leaves."""
    with two_hosts() as (a, b):
        sent(a, b, b"a dms frame over QUIC")
        sent(b, a, b"and one back")
        assert a.transport.path_to(b.peer_id) == "direct"
        assert a.used("outbound_connections") == 1
        assert b.used("inbound_connections") == 1
        a.transport.stop()
        wait_for(lambda: b.used("inbound_connections") == 0, what="the inbound slot back")


def test_an_idle_dms_stream_over_quic_is_not_reset_by_quics_own_read_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """py-libp2p's QUIC streams give up a read after 30 s without a byte (1 s here,
    to be seen quickly): a dms stream idle between two frames was reset with an ERROR
    line, where over Yamux it stays open until the node's own idle watch
    (``stream_idle_s``, 120 s). Now it stays open."""
    quic_config(monkeypatch, STREAM_READ_TIMEOUT=1.0)
    with two_hosts() as (a, b):
        sent(a, b, b"a first frame")
        wait_for(lambda: b.used("idle_watched_streams") == 1, what="a's stream at b")
        time.sleep(3.0)  # idle: three of those read timeouts
        assert b.used("idle_watched_streams") == 1, "the idle stream was reset"
        sent(a, b, b"a frame after a pause")


def test_a_quic_write_the_peer_never_acknowledges_ends_as_a_yamux_write_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write waits for the peer's flow-control credit ``YAMUX_WINDOW_WAIT_S`` (1 s
    here), as a Yamux write waits for a window: a peer that grants none holds the
    writer that long, not for ever (before: py-libp2p's 30 s made infinite, the write
    still waiting at the test's 60 s deadline)."""
    import trio
    from libp2p.custom_types import TProtocol

    from dms.network.libp2p_patches import yamux

    monkeypatch.setattr(yamux, "YAMUX_WINDOW_WAIT_S", 1.0)
    protocol = TProtocol("/dms-test/reads-nothing/1")
    with two_hosts() as (a, b):
        b.transport._host.set_stream_handler(protocol, lambda _stream: trio.sleep_forever())
        # b acknowledges a's packets (the connection lives) but grants no more credit
        # than its first window: a peer that reads nothing (py-libp2p's receiver grants
        # credit as bytes arrive, read or not, and drops what overflows its buffer).
        swarm, a_id = b.transport._host.get_network(), a.transport._host.get_id()
        wait_for(lambda: swarm.get_connections(a_id), what="a's connection at b")
        (conn,) = swarm.get_connections(a_id)
        quic = conn.muxed_conn._quic
        quic._write_connection_limits = lambda **_kw: None
        quic._write_stream_limits = lambda **_kw: None

        async def write_until_stuck() -> str:
            peer = b.transport._host.get_id()
            stream = await a.transport._host.new_stream(peer, [protocol])
            try:
                with trio.fail_after(60):
                    for _ in range(64):  # 16 MB: past the stream's 1 MB window
                        await stream.write(b"x" * (256 * 1024))
            except trio.TooSlowError:
                return "still waiting at the test's deadline"
            except Exception as exc:
                return f"ended: {type(exc).__name__}: {exc}"
            finally:
                with contextlib.suppress(Exception):
                    await stream.reset()
            return "written: the peer acknowledged all"

        outcome = a.transport._call(write_until_stuck)
        assert outcome.startswith("ended: ") and "timed out" in outcome, outcome


def test_a_quic_stream_reset_for_idling_ends_its_handler() -> None:
    """The idle watch resets a dms stream with no frame for ``stream_idle_s`` (1 s
    here); its handler, waiting in a read, must end and give its stream budget back.
    py-libp2p's QUIC reset wakes no reader (as its Yamux reset did not:
    ``libp2p_patches.yamux``): the read woke at its 30 s timeout, and with the read
    made to wait as long as its caller (e4ddb7b) never, every idle stream a peer
    opened holding its slot for good (before: the stream still counted at 30 s)."""
    with two_hosts(stream_idle_s=1.0) as (a, b):
        sent(a, b, b"a frame, then nothing")
        wait_for(lambda: b.used("idle_watched_streams") == 1, what="a's stream at b")
        held = b.used("streams")  # a's dms stream and its long-lived gossip stream
        wait_for(lambda: b.transport.refusals[Budget.STREAM_IDLE] == 1, what="the idle reset")
        wait_for(
            lambda: b.used("streams") == held - 1,
            timeout=30,
            what="the reset stream's handler ended, its place in the budget back",
        )


def test_a_quic_stream_past_its_receive_buffer_is_reset_not_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader that stops reading (dms paces a peer over its byte budget) while the
    writer sends more than the stream's receive buffer (``MAX_STREAM_RECEIVE_BUFFER``,
    2 MB; 64 KiB here), then reads on: py-libp2p dropped each chunk past the buffer
    with a warning, and the reader got bytes with a gap in them (a dms reader its next
    length prefix from the wrong place). Now the stream is reset: the reader gets
    what came before the overflow, as sent, then an error, never wrong bytes; and
    what the writer sent until it saw the reset opens no new stream (before the
    drop: py-libp2p, which forgets a stream once reset, took 11 to 25 of its later
    chunks each for a new inbound stream of the peer's, with that stream's id)."""
    import threading

    import trio
    from libp2p.custom_types import TProtocol

    from dms.network import libp2p_patches

    libp2p_patches.apply_quic_patches()  # loads py-libp2p's QUIC modules
    from libp2p.transport.quic.connection import QUICConnection

    opened: list[int] = []
    create = QUICConnection._create_inbound_stream

    async def creating(self: Any, stream_id: int) -> Any:
        opened.append(stream_id)
        return await create(self, stream_id)

    monkeypatch.setattr(QUICConnection, "_create_inbound_stream", creating)
    quic_config(monkeypatch, MAX_STREAM_RECEIVE_BUFFER=64 * 1024)
    protocol = TProtocol("/dms-test/reads-late/1")
    sent = bytes(i % 251 for i in range(512 * 1024))
    half_written = threading.Event()
    read: dict[str, Any] = {}

    async def read_late(stream: Any) -> None:
        read["id"] = stream.muxed_stream._stream_id
        while not half_written.is_set():  # reads nothing meanwhile
            await trio.sleep(0.05)
        got = bytearray()
        try:
            while chunk := await stream.read(65536):
                got += chunk
            read["end"] = "EOF"
        except Exception as exc:
            read["end"] = type(exc).__name__
        read["bytes"] = bytes(got)
        read["reset"] = stream.muxed_stream.is_reset()

    with two_hosts() as (a, b):
        b.transport._host.set_stream_handler(protocol, read_late)

        async def write_all() -> str:
            stream = await a.transport._host.new_stream(b.transport._host.get_id(), [protocol])
            try:
                for at in range(0, len(sent), 8192):
                    if at == len(sent) // 2:
                        half_written.set()  # 256 KiB: the reader drains, then keeps up
                        await trio.sleep(0.5)
                    await stream.write(sent[at : at + 8192])
                    await trio.sleep(0.001)
                await stream.close()
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            finally:
                half_written.set()
            return "written"

        outcome = a.transport._call(write_all)
        wait_for(lambda: "bytes" in read, what="the reader's end")
    got = read["bytes"]
    assert got == sent[: len(got)], (
        f"the reader got {len(got)} bytes, not those sent: a gap (writer: {outcome})"
    )
    assert len(got) < len(sent) and read["reset"], (read["end"], len(got), outcome)
    assert "EOF" not in read["end"], read["end"]  # an error, not the end of the stream
    assert opened.count(read["id"]) == 1, f"stream {read['id']} opened {opened.count(read['id'])}"


def test_the_quic_timeouts_stay_py_libp2ps_when_the_reset_wake_does_not_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read waits for ever only if a reset wakes it: with ``QUICStream.read`` (or
    ``reset``, ``write``) not the source the wake was written against, the wake is
    skipped (``SKIPPED``, an INFO line) and the transport keeps py-libp2p's 30 s read
    and write timeouts (before: the wake was applied by attribute, with no digest,
    and the read made infinite whatever the source)."""
    from libp2p.transport.quic.stream import QUICStream

    from dms.network import libp2p_patches
    from dms.network.deferred import Deferred
    from dms.network.libp2p_patches import quic as quic_patches

    if isinstance(QUICStream, Deferred):  # run alone: the QUIC transport not loaded yet
        QUICStream = QUICStream.real()  # the class itself, to patch
    shipped_read = QUICStream.read

    async def read(self: Any, n: int | None = None) -> bytes:  # another source
        return await shipped_read(self, n)

    monkeypatch.setattr(QUICStream, "read", read)
    monkeypatch.setattr(
        QUICStream, "reset", getattr(QUICStream.reset, "__wrapped__", QUICStream.reset)
    )
    monkeypatch.setattr(libp2p_patches, "_quic_applied", False)
    monkeypatch.setattr(libp2p_patches, "APPLIED", [])
    monkeypatch.setattr(libp2p_patches, "SKIPPED", [])
    host = Host()
    try:
        swarm = host.transport._host.get_network()
        (config,) = [
            t._config
            for t in swarm.transport_manager.get_transports()
            if type(t).__module__ == quic_patches.QUIC_TRANSPORT
        ]
        assert (config.STREAM_READ_TIMEOUT, config.STREAM_WRITE_TIMEOUT) == (30.0, 30.0)
        assert libp2p_patches.SKIPPED == ["resets_wake_the_streams_waiters"]
        assert not getattr(QUICStream.reset, "dms_wakes", False)
    finally:
        host.transport.stop()


def test_a_quic_connection_the_swarm_never_finishes_adding_is_closed() -> None:
    """The gate adds an inbound QUIC connection to the swarm within
    ``handshake_timeout_s`` (0.2 s here), as it upgrades a TCP one: one whose start
    never ends is closed, holds nothing, and is counted ``handshake_timeout`` (before: the
    gate waited on it for good; then it was closed but counted nothing)."""
    from collections import Counter

    import trio

    from dms.network.inboundgate import InboundGate

    class Stalling:
        async def add_conn(self, muxed: Any, direction: str) -> Any:
            await trio.sleep_forever()

    class Connection:
        peer_id = "a peer"
        closed = False

        async def close(self) -> None:
            self.closed = True

    refusals: Counter[str] = Counter()
    gate = InboundGate(
        Stalling(),
        NetworkSettings(handshake_timeout_s=0.2),
        refusals,
        lambda _p: False,
        lambda _p: None,
    )
    conn = Connection()

    async def admitted() -> bool:
        with trio.move_on_after(20) as scope:
            await gate._multiplexed(conn, "127.0.0.1")  # type: ignore[arg-type]
        return not scope.cancelled_caught

    assert trio.run(admitted), "the gate still waited on the connection at 20 s"
    assert conn.closed
    assert gate.usage()["inbound_connections"][0] == 0
    assert refusals == {"handshake_timeout": 1}
