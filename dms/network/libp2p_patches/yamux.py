"""Patches to py-libp2p's Yamux: its credit, settings, pings, resets and window waits.

**Yamux credit, batched** (go-yamux semantics). py-libp2p sends a
WINDOW_UPDATE after *every* read, even a 1-byte read of a varint prefix, so a
gossip RPC costs about three extra Yamux frames (each Noise-encrypted,
written, read, decrypted and parsed by the peer). go-yamux sends credit only
once half the receive window is consumed; we do the same, which keeps the
window's flow control (a sender still stops at a full window, and resumes when
half of it is read) and removes ~70 % of the frames on an idle gossip network.

**Yamux's per-frame settings and body reads, cheaper.** py-libp2p reads its
``PY_YAMUX_*`` tuning variables from the environment on every frame (two to
four ``os.getenv`` calls each), and reads every DATA frame's body under a
fresh 60 s ``fail_after`` cancel scope, although the sender wrote header and
body as one Noise message, so the body is already in the session's buffer
when the header has been read. The variables are now read once, when the
patch is applied (a daemon's environment does not change under it), and a
body already buffered in full is taken from the buffer directly; one that is
not is read as before, under its timeout. Together ~5 % of a busy node's
network thread.

**An idle connection's RTT, measured every 5 minutes.** py-libp2p's Yamux pings
every connection every 30 s from both ends, to measure the round trip time it
tunes receive windows by (its only use): on an idle node with 20 connections the
pings and pongs were one frame in seven it sent and read. It still measures at
once on a new connection, then every ``YAMUX_RTT_EVERY_S``.

**A reset wakes the stream's reader.** py-libp2p's Yamux marks a stream it resets
itself as reset but leaves a task waiting to read it asleep for as long as the
connection lives: the stream's handler never returned. Every stream the node
reset for being idle (``stream_idle``) still held its slot in the stream budgets
(a peer's 64 streams, idle-reset, blocked it for good; many keys, all 4,096),
and its handler's task and buffers; the DHT's 12 handler slots were held so.
Now a reset sets the stream's event, as one from the peer does, so the reader
raises and the handler ends.

**A write waits for a window as long as its caller does.** py-libp2p's Yamux
write gave up after 5 s without a window (``MuxedStreamError``), under every
deadline of the node's own (a unicast write's ``stream_idle_s``, 120 s, past which
it is ``write_stalled``; a chunk's ``idle_s`` plus its size at
``min_bytes_per_s``): a slow but honest reader (a loaded node, one throttling a
peer's bytes) broke the stream. The wait is now ``YAMUX_WINDOW_WAIT_S`` (120 s);
the caller's deadline governs. Applied only to the ``YamuxStream.write`` it was
written against (its source's digest, ``YAMUX_WRITE_SHA256``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from dms.network.libp2p_patches.source import shipped_source

log = logging.getLogger("dms.network")


# How often Yamux measures a connection's round trip time after the first (py-libp2p:
# 30 s, from both ends); it only tunes receive windows.
YAMUX_RTT_EVERY_S = 300.0


# How long a Yamux write waits for a window (py-libp2p: 5 s); the node's own deadlines
# (stream_idle_s, 120 s by default: write_stalled) end it first.
YAMUX_WINDOW_WAIT_S = 120.0
# The sha256 of py-libp2p's YamuxStream.write (its source, dedented) whose 5 s window
# wait the patch lengthens; any other source is left as it is.
YAMUX_WRITE_SHA256 = "457cb7d40aa46d7c65cd7ff16798b49f4fa461778c047c5ba0afff9e87b06cb0"


def batch_yamux_window_updates() -> bool:
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    needed = ("_grow_threshold", "_grow_to_delta", "_apply_autotune_epoch", "send_window_update")
    if not all(hasattr(YamuxStream, name) for name in needed) or not hasattr(
        YamuxStream, "_auto_tune_and_send_window_update"
    ):
        log.info("py-libp2p's Yamux changed shape; its window updates are left as they are")
        return False

    async def send_credit_at_half_window(self: Any, *, bytes_read: int = 0) -> None:
        # The window is what the peer may still send: target - (granted + unread).
        # Credit goes back only when half of it is used up, in one update.
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            used = self.target_recv_window - (self.recv_window + buffered)
            if used <= 0 or used < self._grow_threshold():
                return
            credit = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        # Never hold window_lock across the write (py-libp2p's own rule: the
        # inbound WINDOW_UPDATE handler needs the lock meanwhile).
        if credit > 0:
            await self.send_window_update(credit, skip_lock=True)

    YamuxStream._auto_tune_and_send_window_update = send_credit_at_half_window
    return True


def measure_rtt_less_often() -> bool:
    from libp2p.stream_muxer.yamux import yamux

    if not isinstance(getattr(yamux, "RTT_MEASURE_INTERVAL", None), int | float) or not (
        hasattr(yamux.Yamux, "_measure_rtt_loop")
    ):
        log.info("py-libp2p's Yamux changed shape; it measures RTT as often as before")
        return False
    # The loop reads the module's constant at each wait.
    yamux.RTT_MEASURE_INTERVAL = YAMUX_RTT_EVERY_S  # type: ignore[assignment]
    return True


def cheaper_yamux_reads() -> bool:
    from libp2p.security.secure_session import SecureSession
    from libp2p.stream_muxer.yamux import yamux

    needed = ("_py_yamux_env", "_py_yamux_env_set")
    session_needed = ("_drain", "read")
    if (
        not all(callable(getattr(yamux, n, None)) for n in needed)
        or not hasattr(yamux.Yamux, "_read_data_body")
        or not all(hasattr(SecureSession, n) for n in session_needed)
    ):
        log.info("py-libp2p's Yamux changed shape; its settings are read on every frame")
        return False
    settings = {k: v for k, v in os.environ.items() if k.startswith("PY_YAMUX_")}

    def setting(name: str, default: str = "") -> str:
        return settings.get(f"PY_YAMUX_{name}", default)

    def setting_set(name: str) -> bool:
        return f"PY_YAMUX_{name}" in settings

    yamux._py_yamux_env = setting
    yamux._py_yamux_env_set = setting_set
    read_body = yamux.Yamux._read_data_body

    async def read_buffered_body(muxer: Any, length: int) -> bytes:
        # A function patched in as Yamux._read_data_body: ``muxer`` is py-libp2p's.
        conn = getattr(muxer, "secured_conn", None)
        if isinstance(conn, SecureSession):
            low, high = getattr(conn, "low_watermark", None), getattr(conn, "high_watermark", None)
            if isinstance(low, int) and isinstance(high, int) and high - low >= length:
                return conn._drain(length)  # all there: nothing to wait for
        return await read_body(muxer, length)

    yamux.Yamux._read_data_body = read_buffered_body
    return True


def wake_readers_on_reset() -> bool:
    from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

    if not hasattr(YamuxStream, "reset") or not hasattr(Yamux, "_finalize_stream"):
        log.info("py-libp2p's Yamux changed shape; a reset stream's reader is not woken")
        return False
    reset = YamuxStream.reset

    async def reset_and_wake(stream: Any) -> None:
        # A function patched in as YamuxStream.reset: ``stream`` is py-libp2p's.
        # The event is taken first: finalizing the stream drops it from the map.
        events = getattr(stream.conn, "stream_events", None)
        event = events.get(stream.stream_id) if isinstance(events, dict) else None
        try:
            await reset(stream)
        finally:
            if event is not None:
                event.set()

    YamuxStream.reset = reset_and_wake
    return True


def yamux_writes_wait_for_a_window() -> bool:
    from libp2p.stream_muxer.yamux import yamux

    write = yamux.YamuxStream.write
    if getattr(write, "__wrapped__", None) is not None:  # applied before
        return True
    source = shipped_source(write, YAMUX_WRITE_SHA256)
    if source is None:
        log.info("py-libp2p's Yamux write changed; it waits 5 s for a window")
        return False
    source = source.replace(
        "trio.move_on_after(5.0)", "trio.move_on_after(_dms_patches.YAMUX_WINDOW_WAIT_S)"
    ).replace(
        '"Timed out waiting for window update after 5 seconds."',
        'f"Timed out waiting for window update after {_dms_patches.YAMUX_WINDOW_WAIT_S:g} s."',
    )
    # Defined in Yamux's module (its names, as patched), then taken out of it.
    scope = vars(yamux)
    scope["_dms_patches"] = sys.modules[__name__]
    exec(compile(source, yamux.__file__, "exec"), scope)
    waiting = scope.pop("write")
    waiting.__qualname__ = write.__qualname__
    waiting.__wrapped__ = write
    yamux.YamuxStream.write = waiting
    return True
