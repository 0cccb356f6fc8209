"""The locks py-libp2p takes around each frame: a free one is no schedule point, but one in 16 is.

**A free lock is no schedule point, but one in 16 is.** Every lock py-libp2p takes
around a frame (the stream's state lock, its write, window and close locks, Yamux's
write and streams locks, the TCP stream's read and write locks) is a ``trio.Lock`` (the
stream's write lock a ``trio.Semaphore``), whose ``acquire`` yields to the scheduler
even when the lock is free: a frame written cost its writer eight task steps (each a
pass of trio's scheduler, an ``epoll`` call with it), a frame read 4 of Yamux's
reader and 6 of the stream's task (an invoke's two frames: 36 steps). A free
one is now taken at once (``QuickLock``: still a cancel point), except every
``FREE_LOCKS_A_TURN``-th (16) free acquire of the trio run, which is trio's own, a full
checkpoint; a held one is waited for as before, in trio's own order. The bound
matters: those yields were the only schedule points of some loops. Yamux's reader
takes the frames of a Noise message already read with none of its own (a message
of 5,000 twelve-byte frames, one lock each, was one task step of 30-50 ms with every
free lock taken at once), and a reader of a stream whose Yamux buffer holds bytes
(py-libp2p's pubsub reader, Noise over a relayed stream) loops over them with none
(10,000 two-byte reads: one step of 120-150 ms); now a step takes at most 16 free
locks, 0.2-0.3 ms in both. Yamux's ``_write_frame`` no longer parses each header to
format a debug line nobody logs, nor yields again after the socket's send (a
writer of many frames still yields at one take of its write lock in 16). And
a frame that takes no lock at all (a ping's answer, a frame of an unknown type:
Yamux's reader handled a Noise message of 5,000 of them in one step of 30-40 ms,
patch or none) counts too: each frame Yamux's module reads (``read_exactly``,
patched by name) adds to the same counter, its turn shielded from cancellation
(no new cancel point between a header and its body). The patch checks that
each lock is, once its class has made it, the trio type it was written for,
that ``_write_frame`` is the source it replaces (by its digest,
``WRITE_FRAME_SHA256``) and that Yamux reads with py-libp2p's own
``read_exactly``; otherwise it is skipped.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from dms.network.libp2p_patches.source import shipped_source

log = logging.getLogger("dms.network")


# How many locks around frames a trio run takes at once (free, with no turn given to
# other tasks) for one taken with a full checkpoint: no task step takes more than this
# many without a schedule point, whatever loop takes them (Yamux's reader over one Noise
# message of many small frames, a reader of a stream whose buffer holds many messages).
FREE_LOCKS_A_TURN = 16
# The sha256 of py-libp2p's Yamux._write_frame (its source, dedented) that the patch
# replaces: the debug line, the write under ``_write_lock``, a checkpoint after.
WRITE_FRAME_SHA256 = "56aa70c624e6c2a7aef7ad1d3178ba6471b6699b7a690d329bfb8ccd59ad8286"

# The free acquires taken at once since the last one that was a turn, in this trio run
# (a list, one per run: hosts of one process run on several trio threads).
_TAKEN_AT_ONCE: trio.lowlevel.RunVar[list[int]] = trio.lowlevel.RunVar("dms_free_locks")


def _taken_at_once() -> list[int]:
    try:
        return _TAKEN_AT_ONCE.get()
    except LookupError:
        taken = [0]
        _TAKEN_AT_ONCE.set(taken)
        return taken


class QuickLock:
    """A ``trio.Lock`` or ``trio.Semaphore`` whose acquire, when it is free, takes it at
    once: a cancel point (``checkpoint_if_cancelled``), not a schedule point; but every
    ``FREE_LOCKS_A_TURN``-th free acquire of the trio run is trio's own, a full
    checkpoint, so a loop that takes only such locks still yields. Held, it is waited
    for by trio's own ``acquire`` (its queue, its order; the wait is the turn).
    Everything else is the wrapped lock's."""

    __slots__ = ("_lock",)

    def __init__(self, lock: Any) -> None:
        self._lock = lock

    async def acquire(self) -> None:
        taken = _taken_at_once()
        if taken[0] + 1 >= FREE_LOCKS_A_TURN:
            taken[0] = 0
            await self._lock.acquire()  # a full checkpoint, free or held
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            taken[0] = 0  # waited for: a turn
            await self._lock.acquire()
            return
        taken[0] += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lock, name)


# The locks taken around each frame, by the class whose __init__ makes them: module,
# attribute names, and the trio type each must be.
FRAME_LOCKS: dict[str, tuple[str, tuple[str, ...], type]] = {
    "NetStream": ("libp2p.network.stream.net_stream", ("_state_lock",), trio.Lock),
    "YamuxStream": ("libp2p.stream_muxer.yamux.yamux", ("window_lock", "close_lock"), trio.Lock),
    "Yamux": ("libp2p.stream_muxer.yamux.yamux", ("streams_lock", "_write_lock"), trio.Lock),
    "TrioTCPStream": ("libp2p.io.trio", ("read_lock", "write_lock"), trio.Lock),
    # A Yamux stream's writer: ``rw_lock.write_lock()`` around each frame it writes.
    "ReadWriteLock": ("libp2p.stream_muxer.rw_lock", ("_writer_lock",), trio.Semaphore),
}


class _Probe:
    """What the frame classes' ``__init__`` read of their arguments: a connection, a
    muxed stream with its connection, a peer."""

    is_initiator = True

    def __init__(self) -> None:
        self.muxed_conn = self


def _probe(cls: Any) -> Any:
    """An instance of one of FRAME_LOCKS' classes, made by its ``__init__``."""
    name = cls.__name__
    if name == "NetStream":
        return cls(_Probe(), None, None)
    if name == "YamuxStream":
        return cls(1, _Probe(), True)
    if name == "Yamux":
        return cls(_Probe(), _Probe(), is_initiator=True)
    if name == "TrioTCPStream":
        return cls(_Probe())
    return cls()


def frame_locks_off_shape() -> list[str]:
    """What differs from the shape ``free_locks_do_not_yield`` counts on: each of
    FRAME_LOCKS' classes, made, must hold each named lock as a lock of its trio type (or
    one this patch already wraps); and Yamux's ``_write_frame`` (as shipped) must be the
    source whose digest is WRITE_FRAME_SHA256. Empty when all hold."""
    import importlib

    off: list[str] = []
    for cls_name, (module_name, names, kind) in FRAME_LOCKS.items():
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
            made = _probe(cls)
        except Exception as exc:
            off.append(f"{cls_name}: not made ({type(exc).__name__}: {exc})")
            continue
        for name in names:
            lock = getattr(made, name, None)
            inner = lock._lock if isinstance(lock, QuickLock) else lock
            if type(inner) is not kind:
                off.append(f"{cls_name}.{name}: {type(inner).__name__}, not {kind.__name__}")
    try:
        from libp2p.stream_muxer.yamux import yamux

        write_frame = getattr(yamux.Yamux._write_frame, "__wrapped__", yamux.Yamux._write_frame)
    except (AttributeError, ImportError) as exc:
        off.append(f"Yamux._write_frame: not found ({exc})")
    else:
        if shipped_source(write_frame, WRITE_FRAME_SHA256) is None:
            off.append("Yamux._write_frame: another source than the one replaced")
    try:
        from libp2p.io import utils
        from libp2p.stream_muxer.yamux import yamux

        reads = getattr(yamux.read_exactly, "__wrapped__", yamux.read_exactly)
        if reads is not utils.read_exactly:
            off.append("Yamux's module reads its frames with another read_exactly")
    except (AttributeError, ImportError) as exc:
        off.append(f"Yamux's read_exactly: {exc}")
    return off


def quick_locks(obj: Any, names: tuple[str, ...], kind: type) -> None:
    """Wrap each named lock of ``obj`` (of trio type ``kind``) in a QuickLock."""
    for name in names:
        lock = getattr(obj, name, None)
        if type(lock) is kind:
            setattr(obj, name, QuickLock(lock))


def free_locks_do_not_yield() -> bool:
    import importlib

    from libp2p.stream_muxer.yamux import yamux

    off = frame_locks_off_shape()
    if off:
        log.info("py-libp2p's locks changed shape (%s); each is a schedule point", "; ".join(off))
        return False

    def wrapping(cls: Any, names: tuple[str, ...], kind: type) -> None:
        init = cls.__init__

        def init_with_quick_locks(obj: Any, *args: Any, **kwargs: Any) -> None:
            # A function patched in as __init__: ``obj`` is py-libp2p's instance.
            init(obj, *args, **kwargs)
            quick_locks(obj, names, kind)

        init_with_quick_locks.__wrapped__ = init  # type: ignore[attr-defined]
        cls.__init__ = init_with_quick_locks

    for cls_name, (module_name, names, kind) in FRAME_LOCKS.items():
        wrapping(getattr(importlib.import_module(module_name), cls_name), names, kind)
    yamux_log = yamux.logger
    write_frame_as_shipped = yamux.Yamux._write_frame

    async def write_frame(muxer: Any, data: bytes) -> None:
        # A function patched in as Yamux._write_frame: ``muxer`` is py-libp2p's. Its
        # debug line (the header parsed to format it) only when it is logged; no
        # checkpoint after the socket's send, itself one. The write lock is a
        # QuickLock: a writer of many frames still yields every FREE_LOCKS_A_TURN.
        if yamux_log.isEnabledFor(logging.DEBUG):
            await write_frame_as_shipped(muxer, data)
            return
        async with muxer._write_lock:
            await muxer.secured_conn.write(data)

    write_frame.__wrapped__ = write_frame_as_shipped  # type: ignore[attr-defined]
    yamux.Yamux._write_frame = write_frame
    read_exactly = yamux.read_exactly

    async def read_exactly_counted(reader: Any, n: int, *args: Any, **kwargs: Any) -> bytes:
        # Patched in as the name Yamux's module reads each header (and body) with. A
        # frame that takes no lock (a ping's answer, a frame of an unknown type) still
        # counts toward the run's turn: read from a Noise message already in hand, a
        # message of 5,000 of them was one task step (30-40 ms), patch or none. The
        # turn is shielded: no new cancel point between a header and its body.
        data = await read_exactly(reader, n, *args, **kwargs)
        taken = _taken_at_once()
        taken[0] += 1
        if taken[0] >= FREE_LOCKS_A_TURN:
            taken[0] = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    read_exactly_counted.__wrapped__ = read_exactly  # type: ignore[attr-defined]
    yamux.read_exactly = read_exactly_counted
    return True
