"""The Yamux receive window, enforced, and the bytes all streams of a process hold, bounded.

**The receive window, enforced.** py-libp2p's Yamux notes when a peer sends
past a stream's receive window, sets the window to 0 and buffers the bytes
anyway: a peer that pushes 256 MiB on a stream the node does not read (its own
outbound stream, say) grew the node by 257 MB. Now the bytes past the window
(``target_recv_window``: what the node granted) are dropped, the stream is
reset (``window_exceeded``) and its buffer freed; the bytes buffered in all
streams of the process are bounded too (:func:`set_buffer_budget`), past which
the stream that would overrun it is reset the same way. A connection whose
streams overrun their window ``OVERRUNS_BEFORE_CLOSE`` times is closed
(go-yamux closes it at the first): the node must decrypt every byte a peer
sends, so one that ignores windows is not kept.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("dms.network")


# Streams a connection may overrun (each reset) before the connection is closed.
OVERRUNS_BEFORE_CLOSE = 3


@dataclass
class BufferBudget:
    """Bytes buffered by Yamux streams of this process, unread: at most ``limit``."""

    limit: int = 256 * 1024 * 1024
    held: int = 0
    overruns: int = 0  # streams reset for sending past their window or the limit
    # Who hears of a reset on a host's connections: (peer id, reason), by swarm.
    listeners: weakref.WeakKeyDictionary[Any, Callable[[str, str], None]] = field(
        default_factory=weakref.WeakKeyDictionary
    )


BUFFERS = BufferBudget()


def set_buffer_budget(
    limit: int, swarm: Any = None, on_overrun: Callable[[str, str], None] | None = None
) -> None:
    """The most bytes Yamux may hold unread in this process; ``on_overrun`` hears of
    each stream of ``swarm``'s connections reset for overrunning."""
    BUFFERS.limit = limit
    if swarm is not None and on_overrun is not None:
        BUFFERS.listeners[swarm] = on_overrun


class _Window(bytearray):
    """A stream's receive buffer that refuses bytes past the stream's window."""

    __slots__ = ("_conn", "_dead", "_sid")

    def __init__(self, conn: Any, sid: int) -> None:
        super().__init__()
        self._conn, self._sid, self._dead = conn, sid, False

    def extend(self, data: Any) -> None:
        size = len(data)
        if self._dead:
            return
        stream = self._conn.streams.get(self._sid)
        window = stream.target_recv_window if stream is not None else 0
        if len(self) + size > window or BUFFERS.held + size > BUFFERS.limit:
            self._overrun(stream, size, window)
            return
        BUFFERS.held += size
        bytearray.extend(self, data)

    def clear(self) -> None:
        BUFFERS.held -= len(self)
        bytearray.clear(self)

    def __delitem__(self, key: Any) -> None:
        before = len(self)
        bytearray.__delitem__(self, key)
        BUFFERS.held -= before - len(self)

    def _overrun(self, stream: Any, size: int, window: int) -> None:
        """Drop the bytes and the buffer, and reset the stream (from a task: the
        caller holds the connection's streams lock)."""
        past_window = len(self) + size > window
        self._dead = True
        self.clear()
        peer = str(self._conn.peer_id)
        if past_window:
            reason = f"sent {size} bytes past the {window}-byte receive window it was granted"
        else:
            reason = f"the {BUFFERS.limit}-byte budget of unread bytes of all streams is full"
        BUFFERS.overruns += 1
        log.warning("stream %d from %s reset: window_exceeded: %s", self._sid, peer, reason)
        swarm = getattr(self._conn, "swarm", None)
        listener = BUFFERS.listeners.get(swarm) if swarm is not None else None
        if listener is not None:
            with contextlib.suppress(Exception):
                listener(peer, reason)
        if stream is None:
            return
        stream.closed = stream.recv_closed = stream.send_closed = True
        stream.reset_received = True
        event = self._conn.stream_events.get(self._sid)
        if event is not None:
            event.set()
        nursery = getattr(self._conn, "_nursery", None)
        if nursery is None:
            return
        nursery.start_soon(_send_reset, self._conn, stream)
        buffers = self._conn.stream_buffers
        if past_window and isinstance(buffers, _Buffers):
            # A peer that keeps breaking the protocol loses the connection (go-yamux
            # closes it at the first): else it makes the node decrypt all it sends.
            buffers.overruns += 1
            if buffers.overruns == OVERRUNS_BEFORE_CLOSE:
                log.warning(
                    "connection from %s closed: window_exceeded on %d streams",
                    peer,
                    OVERRUNS_BEFORE_CLOSE,
                )
                nursery.start_soon(_close_connection, self._conn)

    def release(self) -> None:
        BUFFERS.held -= len(self)


async def _close_connection(conn: Any) -> None:
    from libp2p.stream_muxer.yamux.yamux import GO_AWAY_PROTOCOL_ERROR

    with contextlib.suppress(Exception):
        await conn.close(GO_AWAY_PROTOCOL_ERROR)


async def _send_reset(conn: Any, stream: Any) -> None:
    from libp2p.stream_muxer.yamux.yamux import FLAG_RST, TYPE_WINDOW_UPDATE, YAMUX_HEADER_FORMAT

    with contextlib.suppress(Exception):
        header = struct.pack(
            YAMUX_HEADER_FORMAT, 0, TYPE_WINDOW_UPDATE, FLAG_RST, stream.stream_id, 0
        )
        await conn._write_frame(header)
    with contextlib.suppress(Exception):
        await conn._finalize_stream(stream, fully_closed=True)


class _Buffers(dict[int, bytearray]):
    """A connection's ``stream_buffers``: every buffer a :class:`_Window`."""

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self._conn = conn
        self.overruns = 0  # streams of this connection reset for overrunning their window

    def __setitem__(self, sid: int, value: bytearray) -> None:
        old = dict.get(self, sid)
        if isinstance(old, _Window):
            old.release()
        window = _Window(self._conn, sid)
        if value:
            window.extend(value)
        dict.__setitem__(self, sid, window)

    def __delitem__(self, sid: int) -> None:
        old = dict.pop(self, sid)
        if isinstance(old, _Window):
            old.release()

    def pop(self, sid: int, *default: Any) -> Any:  # type: ignore[override]
        old = dict.pop(self, sid, *default)
        if isinstance(old, _Window):
            old.release()
        return old

    def clear(self) -> None:
        for old in dict.values(self):
            if isinstance(old, _Window):
                old.release()
        dict.clear(self)


def enforce_yamux_receive_window() -> bool:
    from libp2p.stream_muxer.yamux import yamux

    needed = ("FLAG_RST", "TYPE_WINDOW_UPDATE", "YAMUX_HEADER_FORMAT", "GO_AWAY_PROTOCOL_ERROR")
    conn_needed = ("_write_frame", "_finalize_stream", "handle_incoming")
    if not all(hasattr(yamux, n) for n in needed) or not all(
        hasattr(yamux.Yamux, n) for n in conn_needed
    ):
        log.info("py-libp2p's Yamux changed shape; its receive window is not enforced")
        return False
    init = yamux.Yamux.__init__

    def init_with_windows(muxer: Any, *args: Any, **kwargs: Any) -> None:
        # A function patched in as Yamux.__init__: ``muxer`` is py-libp2p's instance,
        # whose shape is checked (not assumed) before its buffers are replaced.
        init(muxer, *args, **kwargs)
        if not isinstance(getattr(muxer, "stream_buffers", None), dict):
            return
        muxer.stream_buffers = _Buffers(muxer)

    yamux.Yamux.__init__ = init_with_windows
    return True
