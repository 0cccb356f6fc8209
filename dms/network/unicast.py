"""Unicast: frames to and from one peer on reused streams (``/dms/actor/1.0.0``).

A stream carries ``u32 length | envelope`` frames (``dms.network.frames``). Each
peer gets one outbound stream, opened on first use and written by one writer
task that drains its outbox (``dms.network.outbox``); inbound streams are read
frame by frame and every frame is handed to the actor system's receiver. Bulk
chunks travel on streams of their own (``/dms/chunks/1.0.0``,
``dms.network.transfer``), never in front of control frames. See
specs/network.md, "Unicast" and "Bulk transfer".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dms.actor.codes import Unreachable
from dms.actor.transport import Receiver, Undeliverable
from dms.network.discovery import Discovery, peer_id_of
from dms.network.frames import PREFIX, FrameError, FrameReader, encode_frame
from dms.network.loop import NetworkError, why
from dms.network.outbox import Outbox
from dms.network.settings import NetworkSettings
from dms.network.transfer import CHUNK_PROTOCOL, Offers, read_chunks, serve_chunks

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

    @property
    def closed(self) -> bool:
        return self.outbox.closed

    @property
    def usable(self) -> bool:
        """Open, and its connection not closed under it (the peer stopped or restarted)."""
        conn = self.stream.muxed_conn
        return not self.closed and not getattr(conn, "is_closed", False)


class Unicast(Discovery):
    """Sending frames to a peer, and reading the frames peers send (a transport part)."""

    settings: NetworkSettings
    _host: IHost | None
    _receiver: Receiver | None
    _undeliverable: Undeliverable | None
    _outbound: dict[str, _Outbound]
    _dialing: dict[str, trio.Lock]
    offers: Offers | None
    tap: Callable[[str, bytes], None] | None
    frames_in: int
    frames_refused: int

    def send(self, peer_id: str, frame: bytes) -> None:
        """Queue a frame for ``peer_id`` without waiting: never blocks the calling actor.

        With no stream open yet, the stream is opened (dialing if needed, bounded
        by ``dial_timeout_s``) on the trio thread; if that fails, or a write on an
        open stream fails twice, the frame is reported through the
        ``undeliverable`` callback given to :meth:`start`, which fails a pending
        invoke at once with ``unreachable`` and the reason. Raises ``Unreachable``
        only when the network is stopped.
        """
        data = encode_frame(frame)
        outbound = self._outbound.get(peer_id)
        if self._on_trio_thread():
            # Refusals are sent from the receive path, which runs on the trio thread.
            if outbound is not None and outbound.usable:
                self._enqueue(outbound, data)
            else:
                self._send_soon(peer_id, data)
            return
        # The common case needs no trip through trio's entry queue: the writer task
        # wakes on the outbox's descriptor.
        if outbound is not None and outbound.usable and outbound.outbox.put(data):
            return
        if self._token is None or self._stopped:
            raise Unreachable("the network is stopped")
        try:
            self._token.run_sync_soon(self._start_send, peer_id, data)
        except trio.RunFinishedError:
            raise Unreachable("the network is stopped") from None

    def _start_send(self, peer_id: str, data: bytes) -> None:
        outbound = self._outbound.get(peer_id)
        if outbound is not None and outbound.usable:
            self._enqueue(outbound, data)
        else:
            self._send_soon(peer_id, data)

    def _send_soon(self, peer_id: str, data: bytes) -> None:
        if not self._start_soon(self._send_or_report, peer_id, data):
            self._report([data], "the network is stopped")

    def _enqueue(self, outbound: _Outbound, data: bytes) -> None:
        if not outbound.usable:
            if not outbound.closed:
                self._close(outbound)
            self._send_soon(outbound.peer_id, data)
        elif not outbound.outbox.put(data):
            self._send_soon(outbound.peer_id, data)

    async def _send(self, peer_id: str, data: bytes) -> None:
        outbound = await self._outbound_to(peer_id)
        self._enqueue(outbound, data)

    async def _send_or_report(self, peer_id: str, data: bytes) -> None:
        try:
            await self._send(peer_id, data)
        except NetworkError as err:
            self._report([data], str(err))

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
        outbound = self._outbound.get(peer_id)
        if outbound is not None and outbound.usable:
            return outbound
        lock = self._dialing.setdefault(peer_id, trio.Lock())
        try:
            async with lock:
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
                outbound = _Outbound(peer_id, stream, Outbox())
                self._outbound[peer_id] = outbound
                self._nursery.start_soon(self._write_loop, outbound)
                return outbound
        finally:
            # One lock per peer being dialed, not per peer id ever seen (users type ids).
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._dialing.pop(peer_id, None)

    async def _write_loop(self, outbound: _Outbound) -> None:
        try:
            while batch := await outbound.outbox.take():
                try:
                    await outbound.stream.write(b"".join(batch))
                except Exception as exc:
                    # The peer restarted or the connection dropped: retry once on a fresh
                    # stream.
                    self._close(outbound)
                    batch += outbound.outbox.take_nowait()
                    log.info("stream to %s broke (%s); redialing", outbound.peer_id, why(exc))
                    try:
                        fresh = await self._outbound_to(outbound.peer_id)
                    except NetworkError as err:
                        self._report(batch, str(err))
                        return
                    for item in batch:
                        self._enqueue(fresh, item)
                    return
        finally:
            outbound.outbox.release()

    def _close(self, outbound: _Outbound) -> None:
        outbound.outbox.close()
        if self._outbound.get(outbound.peer_id) is outbound:
            del self._outbound[outbound.peer_id]

    def _forget_if_disconnected(self, pid: ID) -> None:
        outbound = self._outbound.get(pid.to_base58())
        if outbound is None or self._host is None:
            return
        if not self._host.get_network().get_connections(pid):
            self._close(outbound)

    # ---- inbound ---------------------------------------------------------------------

    async def _on_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        reader = FrameReader(stream, self.settings.max_frame_bytes)
        try:
            while True:
                frame = await reader.next()
                self.frames_in += 1
                self._deliver(frame, peer)
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
        await serve_chunks(stream, self.offers)

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
            arrived = await read_chunks(stream, manifest_id, hashes, max_chunk_bytes)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()
        if self.tap is not None:
            for _, data in arrived:
                self.tap(peer_id, data)
        return arrived
