"""Unicast: frames to and from one peer on reused streams (``/dms/actor/1.0.0``).

A stream carries ``u32 length | envelope`` frames (``dms.network.frames``). Each
peer gets one outbound stream, opened on first use and written by one writer
task that drains its outbox (``dms.network.outbox``); frames sent while it opens
wait in one queue per peer, in order, and go into the outbox before any frame sent
after them (each thread's frames leave in the order it sent them); inbound streams are read
frame by frame and every frame is handed to the actor system's receiver. Bulk
chunks travel on streams of their own (``/dms/chunks/1.0.0``,
``dms.network.transfer``), never in front of control frames. See
specs/network.md, "Unicast" and "Bulk transfer".
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
from libp2p.peer.id import ID

from dms.actor.codes import ErrorCode, Refusal, Unreachable
from dms.actor.envelope import REPLY_PREFIX, make_envelope, now_ns, peek, seal
from dms.actor.handle import ROOT_INBOX, Address, Handle
from dms.actor.ratelimit import PeerRates
from dms.actor.system import REFUSAL_TTL_S, reply_payload
from dms.actor.transport import Receiver, Undeliverable
from dms.network.budgets import Budget, ByteBudget, IdleWatch, StreamOpens
from dms.network.discovery import Discovery, peer_id_of
from dms.network.frames import PREFIX, FrameError, FrameReader, encode_frame
from dms.network.loop import NetworkError, why
from dms.network.outbox import Outbox, OutboxFull
from dms.network.settings import NetworkSettings
from dms.network.transfer import (
    CHUNK_PROTOCOL,
    Offers,
    TransferBudget,
    read_chunks,
    serve_chunks,
)
from dms.security.identity import Identity

log = logging.getLogger("dms.network")

ACTOR_PROTOCOL = TProtocol("/dms/actor/1.0.0")


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
    (``Unicast._open_and_drain``) opens the stream and moves them into its outbox.
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


class Unicast(Discovery):
    """Sending frames to a peer, and reading the frames peers send (a transport part)."""

    settings: NetworkSettings
    _host: IHost | None
    _receiver: Receiver | None
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
    offers: Offers | None
    tap: Callable[[str, bytes], None] | None
    frames_in: int
    frames_refused: int
    refusals: Counter[str]
    identity: Identity
    _rates: PeerRates
    _idle: IdleWatch
    _bytes: ByteBudget
    _opens: StreamOpens
    _transfers: TransferBudget

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
            raise Unreachable("the network is stopped")
        self._count(peer_id, 1)
        try:
            self._token.run_sync_soon(self._send_here, peer_id, data, True)
        except trio.RunFinishedError:
            self._count(peer_id, -1)
            raise Unreachable("the network is stopped") from None

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
        elif waiting is None and len(self._waiting) >= s.max_waiting_peers:
            self._waiting_full(data, f"max_waiting_peers {s.max_waiting_peers}")
        elif (waiting := self._waiting_for(peer_id)) is None:
            self._report([data], "the network is stopped")
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
        reason = "the network is stopped"
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
        try:
            batch: list[bytes] = []
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
            if failed is not None:
                self._write_failed(outbound, batch, failed)
        finally:
            outbound.outbox.release()

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
            self._report(batch, "the network is stopped")
            return
        # Over the bounds if need be (bytes, peers): they were accepted.
        self._wait(outbound.peer_id, waiting, batch, front=True)
        waiting.retry = True

    def _close(self, outbound: _Outbound) -> None:
        outbound.outbox.close()
        if self._outbound.get(outbound.peer_id) is outbound:
            del self._outbound[outbound.peer_id]

    def _forget_if_disconnected(self, pid: ID) -> None:
        if self._host is None or self._host.get_network().get_connections(pid):
            return
        peer = pid.to_base58()
        self._rates.forget(peer)
        self._bytes.forget()
        self._opens.forget()
        outbound = self._outbound.get(peer)
        if outbound is not None:
            self._close(outbound)

    def remote_ip(self, peer_id: str) -> str | None:
        """The IP address of a connection ``peer_id`` holds to this node, or None if it
        holds none (``dms.actor.transport.RemoteAddresses``: the admission budgets give
        the peers of one address a share, ``ip_share``). Called on the trio thread."""
        if self._host is None:
            return None
        try:
            for conn in self._host.get_network().get_connections(ID.from_base58(peer_id)):
                address = conn.muxed_conn.get_remote_address()
                if address:
                    return str(address[0])
        except Exception:  # a peer id that is not one, a connection closing
            return None
        return None

    # ---- inbound ---------------------------------------------------------------------

    async def _on_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        reader = FrameReader(stream, self.settings.max_frame_bytes)
        watched = self._idle.watch(stream.reset)  # reset after stream_idle_s with no frame
        try:
            while True:
                frame = await reader.next()
                watched.active = True
                self.frames_in += 1
                over = self._over_frame_rate(peer)
                if over is None:
                    self._deliver(frame, peer)
                else:
                    self._rate_limited(frame, peer, over)
                # Over its bytes a second, the peer's streams are read more slowly (no
                # window granted: it cannot send more). Otherwise, let every other task
                # run between two frames: a read returns as many frames as the peer had
                # sent, and handling them all in one go kept every other peer's frames
                # waiting behind one peer's backlog.
                await self._bytes.pace(peer, PREFIX.size + len(frame))
        except FrameError as err:
            self.frames_refused += 1
            log.warning("dropped stream from %s: %s", peer, err)
            with contextlib.suppress(Exception):
                await stream.reset()
        except EOFError:
            with contextlib.suppress(Exception):
                await stream.close()
        except Exception as exc:  # a reset or a closed connection ends the stream
            log.debug("stream from %s ended: %s", peer, exc)
        finally:
            self._idle.forget(watched)

    def _over_frame_rate(self, peer: str) -> str | None:
        """Why a frame of ``peer`` is over its frame budget, or that of all peers without
        a stake together (None: within both). A peer with a stake has only its own."""
        s = self.settings
        flooding = self._rates.is_flooding(peer)
        if flooding and self._bytes.has_stake(peer):
            self._rates.pardon(peer)  # a stake since it was found flooding: its budget only
            flooding = False
        if not self._rates.allow(peer):
            if flooding:
                return (
                    f"more than {min(s.flooder_frames_per_s, s.max_frames_per_s):g} frames "
                    f"a second from {peer}, found flooding (flooder_frames_per_s, until "
                    f"{s.flooder_cooldown_s:g} s after its last frame refused)"
                )
            if not self._bytes.has_stake(peer):
                self._rates.flooding(peer)
            return (
                f"more than {s.max_frames_per_s:g} frames a second (burst {s.frame_burst}) "
                f"from {peer}"
            )
        if not self._bytes.has_stake(peer) and not self._rates.allow_shared(peer):
            return (
                f"more than {s.max_unknown_frames_per_s:g} frames a second (burst "
                f"{s.unknown_frame_burst}) from the peers this node has no stake in, "
                "together (max_unknown_frames_per_s; a peer past its share of it is "
                "refused once it is half spent)"
            )
        return None

    def _rate_limited(self, frame: bytes, peer: str, reason: str) -> None:
        """A frame over ``peer``'s budget: refused undecoded, counted, logged once a
        second per peer, and answered (a few a second) if it asks for a reply."""
        if self.tap is not None:
            self.tap(peer, frame)
        self.refusals[ErrorCode.RATE_LIMITED] += 1
        count = self._rates.refused(peer)
        if count:
            log.warning("refused %d frame(s): rate_limited: %s", count, reason)
        if self._rates.may_answer(peer):
            self._answer_refusal(frame, peer, Refusal(ErrorCode.RATE_LIMITED, reason))

    def _answer_refusal(self, frame: bytes, peer: str, refusal: Refusal) -> None:
        """An error reply, signed by the node key as any refusal before an actor, to a
        request from ``peer`` itself (never to a host the frame merely names)."""
        env = peek(frame)
        if (
            env is None
            or env.to is None
            or env.reply_to is None
            or env.behaviour.startswith(REPLY_PREFIX)
            or env.sender.address.host != peer
        ):
            return
        self._rates.answered(peer)
        ttl_s = max((env.expiry - now_ns()) / 1e9, REFUSAL_TTL_S)
        me = Handle(
            id=self.identity.public_key,
            address=Address(host=self.identity.peer_id, inbox=ROOT_INBOX),
        )
        reply = make_envelope(
            me,
            self.identity.public_key,
            env.reply_to,
            reply_payload(error=refusal),
            to=env.sender,
            ttl_s=ttl_s,
        )
        with contextlib.suppress(Unreachable):  # stopping
            self.send(peer, seal(reply, self.identity))

    def _deliver(self, frame: bytes, peer: str | None, *, signature_checked: bool = False) -> None:
        assert self._receiver is not None
        if self.tap is not None:
            self.tap(peer or "", frame)
        try:
            self._receiver(frame, peer, signature_checked=signature_checked)
        except Exception:
            log.exception("receiver failed on a frame from %s", peer)

    # ---- bulk transfer (dms.network.transfer) ----------------------------------------

    async def _on_chunk_stream(self, stream: INetStream) -> None:
        if self.offers is None:
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        await serve_chunks(stream, self.offers, budget=self._transfers)

    def fetch_chunks(
        self, peer_id: str, manifest_id: str, hashes: list[str], max_chunk_bytes: int
    ) -> list[tuple[str, bytes]]:
        """Pull chunks of a manifest from ``peer_id`` on a stream of their own (blocking;
        not from an actor's mailbox). Returns what arrived, in order, possibly fewer."""
        return self._call(self._fetch_chunks, peer_id, manifest_id, hashes, max_chunk_bytes)

    async def _fetch_chunks(
        self, peer_id: str, manifest_id: str, hashes: list[str], max_chunk_bytes: int
    ) -> list[tuple[str, bytes]]:
        pid = peer_id_of(peer_id)
        assert self._host is not None
        try:
            with trio.fail_after(self.settings.dial_timeout_s):
                await self._ensure_connected(pid)
                stream = await self._host.new_stream(pid, [CHUNK_PROTOCOL])
        except trio.TooSlowError:
            raise NetworkError(f"peer {peer_id} is unreachable for chunks") from None
        except NetworkError:
            raise
        except Exception as exc:
            raise NetworkError(f"peer {peer_id} is unreachable: {why(exc)}") from None
        try:
            arrived = await read_chunks(
                stream, manifest_id, hashes, max_chunk_bytes, self._transfers
            )
        finally:
            with contextlib.suppress(Exception):
                await stream.close()
        if self.tap is not None:
            for _, data in arrived:
                self.tap(peer_id, data)
        return arrived
