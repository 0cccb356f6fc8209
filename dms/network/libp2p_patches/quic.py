"""Patches to py-libp2p's QUIC streams, and what a dms host asks of its QUIC transport
(built for a ``/udp/.../quic-v1`` listen address) beside what it asks of TCP + Noise +
Yamux. See specs/network.md, "QUIC".

A QUIC connection comes secured (TLS 1.3 with the peer's libp2p key) and multiplexed
(QUIC's own streams): the inbound gate takes it as it is (``InboundGate.handle``, no
Noise and Yamux upgrade). Applied when a host with a QUIC transport is built
(:func:`streams_wait_as_over_yamux`; the transport's modules are imported only then,
``dms.network.deferred``), once a process (``libp2p_patches.apply_quic_patches``),
each only to the sources it was written against (their digests):

**A reset of the node's own wakes the stream's read and write.** py-libp2p's
``QUICStream.reset`` marks the stream reset but sets neither the event a read waits on
nor the one a write waits on (a reset from the peer sets both), so the idle watch's
reset of an idle dms stream left its handler in its read until the read's timeout:
each such stream held its place in the stream budgets (a peer's 64, all 4,096 with
many keys), as Yamux's resets did before ``libp2p_patches.yamux``'s wake.
:func:`resets_wake_the_streams_waiters` (``reset``, ``read`` and ``write`` as shipped).

**Reads and writes wait as over Yamux.** Its streams gave up a read after 30 s without
a byte and a write after 30 s without flow-control credit (``QUICTransportConfig``'s
``STREAM_READ_TIMEOUT``, ``STREAM_WRITE_TIMEOUT``), under the node's own deadlines: a
dms stream idle between two frames, a gossipsub stream between two messages, was reset
with an ERROR line at each, where over Yamux it waits until the node's idle watch
(``stream_idle_s``, ``protocol_idle_s``) or its caller's deadline ends it. Here they
wait as long as over Yamux: a read as long as its caller, a write for the peer's
acknowledgements ``YAMUX_WINDOW_WAIT_S`` (120 s), as a Yamux write waits for a window,
never for ever. Only with the wake above applied: a read waiting for ever that a reset
does not wake would hold its stream for good; without it both stay py-libp2p's 30 s.

**A receive buffer's overflow resets the stream.** py-libp2p's receiver grants QUIC
credit as bytes arrive, read or not, and ``handle_data_received`` dropped a chunk that
took the stream's buffer past ``MAX_STREAM_RECEIVE_BUFFER`` (2 MB) with a warning and
nothing else: a stream read slowly (dms paces its reads of a peer over its byte
budget) lost bytes mid-stream, and its reader took the next length prefix from the
wrong place. Now the stream is reset instead (:func:`overflows_reset_the_stream`): its
reader reads what came before the overflow, all of it as sent, then the reset; its
writer sees the reset; nothing is read that was not sent. The peer is asked to stop
sending on it (STOP_SENDING), and what it sent meanwhile is dropped: py-libp2p forgets
a stream once reset, and took each later chunk of a peer's stream for a new stream the
peer opened (a ghost, its bytes from the middle of the old one: 11 to 25 after one
overflow, each charged to the peer's new streams and two ERROR lines as its protocol's
negotiation wrote to a reset stream).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any

from dms.network.libp2p_patches import yamux
from dms.network.libp2p_patches.source import all_shipped

log = logging.getLogger("dms.network")

QUIC_TRANSPORT = "libp2p.transport.quic.transport"

# The sha256 of py-libp2p's QUICStream methods (their sources, dedented) the patches
# were written against. The wake sets ``_receive_event`` and ``_backpressure_event``:
# ``read`` waits on the first (and raises once the stream is reset), ``write`` on the
# second, ``reset`` sets neither. ``handle_data_received`` drops a chunk past
# ``MAX_RECEIVE_BUFFER_SIZE`` and does nothing on a reset stream.
RESET_SHA256 = "5f0c17b8c32b8472052bee914db80117a9a05e453bd804106d043b7a46678a60"
READ_SHA256 = "786851b3f6eb9782b1be7abfa2795524c4ee27eff0ee5d36c1b1c020b07e3d60"
WRITE_SHA256 = "2fd0aa33059731dd73bad0b9629edb9e3a26263085572b55cd8a0038fc5d6b34"
HANDLE_DATA_RECEIVED_SHA256 = "f26d840e7f1b9fccd1ef4c44ded8d9c8aae5f5acd27ebdd11ac05831e94f476f"
# QUICConnection's: each handler of a chunk takes one for a stream it does not hold
# (``_get_stream_fast``) for a new inbound stream (``_create_inbound_stream``); a reset
# from the peer is the stream's last event.
HANDLE_STREAM_DATA_SHA256 = "620c7f0ee266064dd1e265d97eab091141a39c36e7b378072488fa7347a2157f"
HANDLE_STREAM_DATA_BATCH_SHA256 = "7ad86b1e117536215c999fb30bd879d78a839f71a6a2bb0e1af5d7d055114015"
HANDLE_STREAM_RESET_SHA256 = "50238009fe1141da62f7fdde0e360cad3e7cbb069a0fa75926870fdc72eb0217"

# The application error code of a reset for an overflowing receive buffer (py-libp2p
# resets with 1 on any error of its own).
OVERFLOW_RESET_CODE = 1


def resets_wake_the_streams_waiters() -> bool:
    """``QUICStream.reset`` then sets the events its reads and writes wait on, as a
    reset from the peer does: they see the reset."""
    from libp2p.transport.quic.stream import QUICStream

    reset = QUICStream.reset
    if getattr(reset, "dms_wakes", False):
        return True
    if not all_shipped(
        (reset, RESET_SHA256),
        (QUICStream.read, READ_SHA256),
        (QUICStream.write, WRITE_SHA256),
    ):
        log.info(
            "py-libp2p's QUIC stream changed shape; a reset of the node's own wakes no "
            "read or write, which give up after py-libp2p's timeouts"
        )
        return False

    @functools.wraps(reset)
    async def waking(self: Any, error_code: int = 0) -> None:
        try:
            await reset(self, error_code)
        finally:
            self._receive_event.set()
            self._backpressure_event.set()

    waking.dms_wakes = True  # type: ignore[attr-defined]
    QUICStream.reset = waking  # type: ignore[method-assign]
    return True


def overflows_reset_the_stream() -> bool:
    """``QUICStream.handle_data_received`` resets the stream where it dropped a chunk
    that overflowed the receive buffer, asking the peer to stop sending on it; the
    connection drops what the peer sent on it meanwhile rather than take it for a new
    stream (``_overflowed``)."""
    from libp2p.transport.quic.connection import QUICConnection
    from libp2p.transport.quic.stream import QUICStream, StreamState

    handle = QUICStream.handle_data_received
    if getattr(handle, "dms_resets", False):
        return True
    data = QUICConnection._handle_stream_data
    batch = QUICConnection._handle_stream_data_batch
    reset = QUICConnection._handle_stream_reset
    if not all_shipped(
        (handle, HANDLE_DATA_RECEIVED_SHA256),
        (data, HANDLE_STREAM_DATA_SHA256),
        (batch, HANDLE_STREAM_DATA_BATCH_SHA256),
        (reset, HANDLE_STREAM_RESET_SHA256),
    ):
        log.info(
            "py-libp2p's QUIC stream changed shape; a chunk past its receive buffer is "
            "left to it (0.8.1 dropped it)"
        )
        return False

    @functools.wraps(handle)
    async def resetting(self: Any, data: bytes, end_stream: bool) -> None:
        # Called for one stream at a time, in the connection's order: the buffer only
        # shrinks (a read) between this check and the one ``handle`` makes.
        if (
            data
            and self._state != StreamState.RESET
            and len(self._receive_buffer) + len(data) > self.MAX_RECEIVE_BUFFER_SIZE
        ):
            log.debug(
                "QUIC stream %s reset: %d bytes unread and %d more past its %d-byte buffer",
                self.stream_id,
                len(self._receive_buffer),
                len(data),
                self.MAX_RECEIVE_BUFFER_SIZE,
            )
            if not end_stream:  # its last chunk otherwise: nothing comes after it
                _overflowed(self._connection).add(self._stream_id)
            with contextlib.suppress(Exception):  # STOP_SENDING, sent with the reset
                self._connection._quic.stop_stream(self._stream_id, OVERFLOW_RESET_CODE)
            try:
                await self.reset(error_code=OVERFLOW_RESET_CODE)
            finally:
                self._receive_event.set()
            return
        await handle(self, data, end_stream)

    @functools.wraps(data)
    async def data_of_streams_held(self: Any, event: Any) -> None:
        if not _rest_of_an_overflowed(self, event):
            await data(self, event)

    @functools.wraps(batch)
    async def batch_of_streams_held(self: Any, events_list: list[Any]) -> None:
        await batch(self, [e for e in events_list if not _rest_of_an_overflowed(self, e)])

    @functools.wraps(reset)
    async def reset_the_last(self: Any, event: Any) -> None:
        try:
            await reset(self, event)
        finally:
            _overflowed(self).discard(event.stream_id)

    resetting.dms_resets = True  # type: ignore[attr-defined]
    QUICStream.handle_data_received = resetting  # type: ignore[method-assign]
    QUICConnection._handle_stream_data = data_of_streams_held  # type: ignore[method-assign]
    QUICConnection._handle_stream_data_batch = batch_of_streams_held  # type: ignore[method-assign]
    QUICConnection._handle_stream_reset = reset_the_last  # type: ignore[method-assign]
    return True


def _overflowed(connection: Any) -> set[int]:
    """The streams of ``connection`` reset for an overflow whose peer may still send on
    them (until its reset or the end of the stream: QUIC never reuses a stream's id);
    a few ints, gone with the connection."""
    ids: set[int] | None = getattr(connection, "_dms_overflowed", None)
    if ids is None:
        ids = set()
        connection._dms_overflowed = ids
    return ids


def _rest_of_an_overflowed(connection: Any, event: Any) -> bool:
    """Whether ``event`` (a chunk received) is of a stream reset for an overflow: sent
    before the peer saw the reset, dropped (the stream is no longer held; taken, it
    would be a new inbound stream whose bytes start in the middle of this one's)."""
    ids = getattr(connection, "_dms_overflowed", None)
    if not ids or event.stream_id not in ids:
        return False
    if event.end_stream:
        ids.discard(event.stream_id)
    log.debug("QUIC stream %s: %d bytes after its reset dropped", event.stream_id, len(event.data))
    return True


def streams_wait_as_over_yamux(swarm: Any) -> None:
    """The QUIC transport of ``swarm``, if it has one: the QUIC patches applied (once a
    process), then, if a reset wakes its streams' waiters, its streams' reads wait as
    long as their callers do and its writes as long as a Yamux write waits for a
    window. Before its first connection (read per stream)."""
    for transport in swarm.transport_manager.get_transports():
        if type(transport).__module__ != QUIC_TRANSPORT:
            continue
        from libp2p.transport.quic.stream import QUICStream  # loaded with the transport

        from dms.network.libp2p_patches import apply_quic_patches

        apply_quic_patches()
        if getattr(QUICStream.reset, "dms_wakes", False):
            config = transport._config
            config.STREAM_READ_TIMEOUT = math.inf
            config.STREAM_WRITE_TIMEOUT = yamux.YAMUX_WINDOW_WAIT_S
