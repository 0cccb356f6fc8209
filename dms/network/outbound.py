"""Outbound unicast: frames to one peer on a reused stream (``/dms/actor/1.0.0``).

Each peer gets one outbound stream, opened on first use and written by one writer
task that drains its outbox (``dms.network.outbox``); frames sent while it opens
wait in one queue per peer, in order, and go into the outbox before any frame sent
after them (each thread's frames leave in the order it sent them). A stream that
breaks has its frames retried once on a fresh one. The frames waiting for streams
are bounded per peer and for all peers together (bytes, and peers). Reading what
peers send is ``dms.network.unicast``. See specs/network.md, "Unicast".
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from dms.actor.codes import ErrorCode, Unreachable
from dms.actor.transport import Undeliverable
from dms.network.budgets import Budget
from dms.network.closing import CLOSE_GRACE_S, cut
from dms.network.discovery import Discovery, peer_id_of
from dms.network.frames import PREFIX, encode_frame
from dms.network.loop import NetworkError, why
from dms.network.outbox import Outbox, OutboxFull
from dms.network.settings import NetworkSettings

log = logging.getLogger("dms.network")

ACTOR_PROTOCOL = TProtocol("/dms/actor/1.0.0")
# Why a frame fails once its host stops: raised by ``send``, or reported.
STOPPED = "the network is stopped"


@dataclass
class _Outbound:
    """One reused stream to a peer and the frames its writer task drains.

    The writer coalesces whatever frames are queued into one stream write, so
    a burst of sends costs one Yamux frame and one Noise message, not one each.
    """

    peer_id: str
    stream: INetStream
    outbox: Outbox
    # Opened to retry frames of a stream that broke: if it breaks before a write
    # succeeds, its frames are reported, not retried again.
    retry: bool = False
    # As the host stops: its writer still runs, its close is under way, its socket was
    # cut (``Sending._cut_held``).
    writing: bool = True
    closing: bool = False
    cut: bool = False

    @property
    def closed(self) -> bool:
        return self.outbox.closed

    @property
    def usable(self) -> bool:
        """Open, and its connection not closed under it (the peer stopped or restarted)."""
        conn = self.stream.muxed_conn
        return not self.closed and not getattr(conn, "is_closed", False)


@dataclass
class _Waiting:
    """A peer's frames waiting for its stream, in the order they were sent; one task
    (``Sending._open_and_drain``) opens the stream and moves them into its outbox.
    Bounded as an outbox is: ``max_outbound_frames`` and ``max_outbound_bytes`` (one
    larger frame alone); all peers' together, ``max_waiting_bytes``, and at most
    ``max_waiting_peers`` peers have frames waiting (a task and a dial each)."""

    frames: deque[bytes] = field(default_factory=deque)
    nbytes: int = 0
    # The first frames are those of a stream that broke: the fresh stream is a retry.
    retry: bool = False

    def add(self, batch: list[bytes], front: bool = False) -> int:
        """``batch`` behind the waiting frames, or in front of them (``front``: a broken
        stream's frames, sent before them), in its order. Returns its bytes."""
        if front:
            self.frames.extendleft(reversed(batch))
        else:
            self.frames.extend(batch)
        added = sum(map(len, batch))
        self.nbytes += added
        return added


class Sending(Discovery):
    """Sending frames to a peer: its stream, its writer, and the frames that wait for
    them (a transport part; ``dms.network.unicast.Unicast`` reads what peers send)."""

    settings: NetworkSettings
    _host: IHost | None
    _undeliverable: Undeliverable | None
    _outbound: dict[str, _Outbound]
    _waiting: dict[str, _Waiting]  # frames waiting for a stream to their peer
    # Frames of a peer on their way to its outbox (trio's entry queue, _waiting): while
    # any are, a frame of another thread goes after them. Read by any thread; changed
    # under _queued_lock.
    _queued: dict[str, int]
    _queued_lock: threading.Lock
    _waiting_bytes: int  # bytes of all peers' waiting frames (max_waiting_bytes)
    # (len(_waiting): the peers with frames waiting, max_waiting_peers)
    refusals: Counter[str]
    _has_stake: Callable[[str], bool]  # dms.network.host.Libp2pTransport._has_stake

    def send(self, peer_id: str, frame: bytes) -> None:
        """Queue a frame for ``peer_id`` without waiting: never blocks the calling actor.

        With no stream open yet, the stream is opened (dialing if needed, bounded
        by ``dial_timeout_s``) on the trio thread; if that fails, or a write on an
        open stream fails twice, the frame is reported through the
        ``undeliverable`` callback given to :meth:`start`, which fails a pending
        invoke at once with ``unreachable`` and the reason. Raises ``Unreachable``
        only when the network is stopped.

        Frames to one peer leave in the order each thread sent them: while frames of
        the peer are on their way to its outbox (in trio's entry queue, or waiting for
        its stream), a frame goes after them, never straight into the outbox.
        """
        data = encode_frame(frame)
        if self._on_trio_thread():
            # Refusals are sent from the receive path, which runs on the trio thread.
            self._send_here(peer_id, data)
            return
        # The common case needs no trip through trio's entry queue: the writer task
        # wakes on the outbox's descriptor.
        outbound = self._outbound.get(peer_id)
        if outbound is not None and not self._queued.get(peer_id) and outbound.usable:
            try:
                if outbound.outbox.put(data):
                    return
            except OutboxFull as full:
                self._outbox_full(peer_id, data, str(full))
                return
        if self._token is None or self._stopped:
            raise Unreachable(STOPPED)
        self._count(peer_id, 1)
        try:
            self._token.run_sync_soon(self._send_here, peer_id, data, True)
        except trio.RunFinishedError:
            self._count(peer_id, -1)
            raise Unreachable(STOPPED) from None

    def _count(self, peer_id: str, delta: int) -> None:
        """``delta`` more (or fewer) frames of ``peer_id`` on their way to its outbox:
        in trio's entry queue or waiting for its stream (``_queued``; any thread)."""
        with self._queued_lock:
            left = self._queued.get(peer_id, 0) + delta
            if left > 0:
                self._queued[peer_id] = left
            else:
                self._queued.pop(peer_id, None)

    def _send_here(self, peer_id: str, data: bytes, counted: bool = False) -> None:
        """On the trio thread: into the peer's outbox if its stream is open and none of
        its frames wait for one; else behind those that wait, within the queue's bounds.
        ``counted``: the frame came through trio's entry queue, counted in ``_queued``."""
        outbound = self._outbound.get(peer_id)
        if outbound is not None and peer_id not in self._waiting:
            if outbound.usable:
                self._put(outbound, data)
                if counted:
                    self._count(peer_id, -1)
                return
            self._close(outbound)
        s = self.settings
        waiting = self._waiting.get(peer_id)
        if (
            waiting is not None
            and waiting.frames
            and (
                len(waiting.frames) >= s.max_outbound_frames
                or waiting.nbytes + len(data) > s.max_outbound_bytes
            )
        ):
            self._outbox_full(
                peer_id,
                data,
                f"{len(waiting.frames)} frames already wait for a stream ({waiting.nbytes} bytes)",
            )
        # Both checked before a task or a dial is started for it: a refused frame starts
        # none.
        elif self._waiting_bytes and self._waiting_bytes + len(data) > s.max_waiting_bytes:
            self._waiting_full(data, f"max_waiting_bytes {s.max_waiting_bytes}")
        elif (
            waiting is None
            and len(self._waiting) >= s.max_waiting_peers
            and self._dialed_for_frames(peer_id)
        ):
            self._waiting_full(data, f"max_waiting_peers {s.max_waiting_peers}")
        elif (waiting := self._waiting_for(peer_id)) is None:
            self._stopped_with([data])
        else:
            self._wait(peer_id, waiting, [data], counted=counted)
            return
        if counted:
            self._count(peer_id, -1)

    def _wait(
        self,
        peer_id: str,
        waiting: _Waiting,
        batch: list[bytes],
        *,
        front: bool = False,
        counted: bool = False,
    ) -> None:
        """``batch`` joins the frames waiting for ``peer_id``'s stream (``_Waiting.add``),
        in the bytes of all peers' and the frames on their way to its outbox (``_queued``;
        ``counted``: one frame that came through trio's entry queue, counted already)."""
        self._waiting_bytes += waiting.add(batch, front)
        if not counted:
            self._count(peer_id, len(batch))

    def _dialed_for_frames(self, peer_id: str) -> bool:
        """Whether ``peer_id``'s waiting frames take one of ``max_waiting_peers``: not if
        the node has a stake in it (as many as its stakes), nor if it is connected (as
        many as its connections; its stream opens on one, no dial): else many keys that
        never answer refused every frame to those until their dials ended."""
        if self._has_stake(peer_id):
            return False
        try:
            pid = peer_id_of(peer_id)
        except NetworkError:
            return True
        return self._host is None or not self._host.get_network().get_connections(pid)

    def _waiting_for(self, peer_id: str) -> _Waiting | None:
        """The frames waiting for ``peer_id``'s stream, and the one task that opens it
        started if there were none; None once the network has stopped."""
        waiting = self._waiting.get(peer_id)
        if waiting is None:
            waiting = _Waiting()
            if not self._start_soon(self._open_and_drain, peer_id, waiting):
                return None
            self._waiting[peer_id] = waiting
        return waiting

    async def _open_and_drain(self, peer_id: str, waiting: _Waiting) -> None:
        """Open ``peer_id``'s stream, then move its waiting frames into the stream's
        outbox in their order, in one step: a frame sent after that goes in behind them.
        If the stream cannot be opened (or the host stops), they are reported
        undeliverable with the reason."""
        reason = STOPPED
        outbound: _Outbound | None = None
        try:
            outbound = await self._outbound_to(peer_id)
        except NetworkError as err:
            reason = str(err)
        finally:
            # No checkpoint from here on: no frame joins or overtakes these meanwhile.
            if self._waiting.get(peer_id) is waiting:
                del self._waiting[peer_id]
            frames = list(waiting.frames)
            waiting.frames.clear()
            self._waiting_bytes -= waiting.nbytes
            if outbound is None:
                self._report(frames, reason)
            else:
                outbound.retry = outbound.retry or waiting.retry
                for data in frames:
                    self._put(outbound, data)
            # Only now may other threads put straight into the outbox again.
            self._count(peer_id, -len(frames))

    def _put(self, outbound: _Outbound, data: bytes) -> None:
        """Into an open stream's outbox, on the trio thread (never closed meanwhile)."""
        try:
            if not outbound.outbox.put(data):
                self._report([data], f"the stream to {outbound.peer_id} closed")
        except OutboxFull as full:
            self._outbox_full(outbound.peer_id, data, str(full))

    def _outbox_full(self, peer_id: str, data: bytes, why_full: str) -> None:
        """The queue to ``peer_id`` is full: the frame fails now (its invoke with
        ``unreachable`` and this reason), counted as ``outbox_full``."""
        self.refusals[ErrorCode.OUTBOX_FULL] += 1
        self._report(
            [data],
            f"the outbound queue to {peer_id} is full ({why_full}; at most "
            f"{self.settings.max_outbound_frames} frames, "
            f"{self.settings.max_outbound_bytes} bytes): the peer is not reading",
        )

    def _waiting_full(self, data: bytes, bound: str) -> None:
        """The frames waiting for streams to all peers together hold ``max_waiting_bytes``,
        or ``max_waiting_peers`` peers have frames waiting (``bound``: which, and its
        value): the frame fails now (its invoke with ``unreachable`` and this reason),
        counted as ``waiting_full``. Many keys can each make the node send to them; each
        peer's own bound does not bound them all, nor the bytes the tasks and dials."""
        self.refusals[Budget.WAITING_FULL] += 1
        self._report(
            [data],
            f"{self._waiting_bytes} bytes already wait for streams to {len(self._waiting)} "
            f"peers being dialed ({bound}): too many peers being dialed at once",
        )

    def _stopped_with(self, frames: list[bytes]) -> None:
        """The host stopped with ``frames`` it will never write: waiting for their
        stream, or queued in an outbox or being written when its writer ended. Each is
        reported undeliverable, as every frame the host can no longer carry."""
        self._report(frames, STOPPED)

    def _report(self, batch: list[bytes], reason: str) -> None:
        log.info("%d frame(s) undeliverable: %s", len(batch), reason)
        if self._undeliverable is None:
            return
        for data in batch:
            try:
                self._undeliverable(data[PREFIX.size :], reason)
            except Exception:
                log.exception("undeliverable callback failed")

    async def _outbound_to(self, peer_id: str) -> _Outbound:
        """``peer_id``'s open stream, opened now (dialing if needed) if it has none.
        Only the task draining the peer's waiting frames calls it: one at a time."""
        outbound = self._outbound.get(peer_id)
        if outbound is not None and outbound.usable:
            return outbound
        if outbound is not None:
            self._close(outbound)
        pid = peer_id_of(peer_id)
        assert self._host is not None and self._nursery is not None
        try:
            with trio.fail_after(self.settings.dial_timeout_s):
                await self._ensure_connected(pid)
                stream = await self._host.new_stream(pid, [ACTOR_PROTOCOL])
        except trio.TooSlowError:
            raise NetworkError(
                f"peer {peer_id} is unreachable: no connection within "
                f"{self.settings.dial_timeout_s:g} s"
            ) from None
        except NetworkError:
            raise
        except Exception as exc:
            raise NetworkError(f"peer {peer_id} is unreachable: {why(exc)}") from None
        outbox = Outbox(self.settings.max_outbound_frames, self.settings.max_outbound_bytes)
        outbound = _Outbound(peer_id, stream, outbox)
        self._outbound[peer_id] = outbound
        self._nursery.start_soon(self._write_loop, outbound)
        return outbound

    async def _write_loop(self, outbound: _Outbound) -> None:
        batch: list[bytes] = []  # the frames being written (none while it waits)
        try:
            failed: Exception | None = None
            # A peer that grants no window holds a write for ever: past stream_idle_s
            # the stream counts as broken (retried once, below). One cancel scope for
            # the loop, its deadline set around each write: a scope entered and left
            # per write cost the trio thread more than the rest of the loop. A deadline
            # that passed as a write was done (in the shielded turn ending a socket's
            # send) still cancelled the scope for good: it is then left for a new one,
            # or the next write, or the wait for it, was cancelled and the stream broken.
            spent = True
            while spent:
                spent = False
                with trio.CancelScope() as stall:
                    while batch := await outbound.outbox.take():
                        stall.deadline = trio.current_time() + self.settings.stream_idle_s
                        try:
                            await outbound.stream.write(b"".join(batch))
                        except Exception as exc:
                            failed = exc
                            break
                        finally:
                            stall.deadline = math.inf
                        if outbound.cut:  # a write on a cut connection returns, unsent
                            self._writer_stopped(outbound, batch)
                            return
                        batch = []
                        outbound.retry = False
                        if stall.cancel_called:
                            spent = True
                            break
            if stall.cancelled_caught:
                self.refusals[Budget.WRITE_STALLED] += 1
                failed = NetworkError(
                    f"{outbound.peer_id} read nothing for "
                    f"{self.settings.stream_idle_s:g} s (write_stalled)"
                )
            if failed is not None and outbound.cut:  # or fails (a relay stream reset)
                self._writer_stopped(outbound, batch)
            elif failed is not None:
                self._write_failed(outbound, batch, failed)
        except trio.Cancelled:
            # The host stops (only its stop cancels its nursery).
            self._writer_stopped(outbound, batch)
            raise
        finally:
            outbound.writing = False
            outbound.outbox.release()

    def _writer_stopped(self, outbound: _Outbound, batch: list[bytes]) -> None:
        """The host stopped ``outbound``'s writer as it wrote ``batch`` (or waited):
        its outbox closed first, a frame put on the fast path meanwhile is either taken
        here or refused (``send`` raises ``Unreachable``), never left behind unseen.
        The batch may have been read in part: it is reported whole."""
        outbound.outbox.release()
        self._stopped_with(batch + outbound.outbox.take_nowait())

    def _write_failed(self, outbound: _Outbound, batch: list[bytes], exc: Exception) -> None:
        """The peer restarted or the connection dropped: retry once on a fresh stream (a
        peer that resets every stream would otherwise have the same frames redialed for
        ever). They go first among the peer's waiting frames: every frame sent since
        came after them."""
        self._close(outbound)
        batch += outbound.outbox.take_nowait()
        if outbound.retry:
            self._report(batch, f"the stream to {outbound.peer_id} broke again: {why(exc)}")
            return
        log.info("stream to %s broke (%s); redialing", outbound.peer_id, why(exc))
        waiting = self._waiting_for(outbound.peer_id)
        if waiting is None:
            self._stopped_with(batch)
            return
        # Over the bounds if need be (bytes, peers): they were accepted.
        self._wait(outbound.peer_id, waiting, batch, front=True)
        waiting.retry = True

    async def _cut_held(
        self, outbounds: list[_Outbound], held: Callable[[_Outbound], bool]
    ) -> None:
        """``CLOSE_GRACE_S`` into a step of the host's stop, each of ``outbounds`` still
        ``held`` by its peer (its writer, or its stream's close, waits on a send the peer
        never takes: the socket full, a Noise message sent shielded up to
        ``NOISE_SEND_LIMIT_S``, which no deadline of the caller's ends) has its
        connection cut (``closing.cut``: its socket closed, or a relayed one's stream to
        the relay reset): the send ends at once, and the stop goes on."""
        await trio.sleep(CLOSE_GRACE_S)
        async with trio.open_nursery() as nursery:
            for outbound in outbounds:
                if held(outbound):
                    nursery.start_soon(self._cut, outbound)

    async def _cut(self, outbound: _Outbound) -> None:
        # Marked first: the send it ends returns (or fails) before ``cut`` does.
        outbound.cut = True
        if await cut(outbound.stream.muxed_conn):
            log.info("stream to %s held the stop: its connection cut", outbound.peer_id)
        else:
            outbound.cut = False

    async def _close_streams(self) -> None:
        """The host stops, its writers ended: every outbound stream closed, side by
        side; one whose close is still held ``CLOSE_GRACE_S`` in is cut (``_cut_held``)
        and reset."""
        outbounds = list(self._outbound.values())
        async with trio.open_nursery() as cutter:
            cutter.start_soon(self._cut_held, outbounds, lambda outbound: outbound.closing)
            async with trio.open_nursery() as nursery:
                for outbound in outbounds:
                    self._close(outbound)
                    outbound.closing = True
                    nursery.start_soon(self._close_stream, outbound)
            cutter.cancel_scope.cancel()

    async def _close_stream(self, outbound: _Outbound) -> None:
        with contextlib.suppress(Exception):
            await outbound.stream.close()
        outbound.closing = False
        if outbound.cut:
            with contextlib.suppress(Exception):
                await outbound.stream.reset()

    def _close(self, outbound: _Outbound) -> None:
        outbound.outbox.close()
        if self._outbound.get(outbound.peer_id) is outbound:
            del self._outbound[outbound.peer_id]
