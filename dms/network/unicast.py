"""Unicast: frames to and from one peer on reused streams (``/dms/actor/1.0.0``).

A stream carries ``u32 length | envelope`` frames (``dms.network.frames``). Sending
them, one outbound stream per peer and its writer, is ``dms.network.outbound``
(``Sending``); here inbound streams are read frame by frame, within each peer's
and all peers' rate limits, and every frame is handed to the actor system's
receiver. Bulk chunks travel on streams of their own (``/dms/chunks/1.0.0``,
``dms.network.transfer``), never in front of control frames. See
specs/network.md, "Unicast" and "Bulk transfer".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from dms.actor.codes import ErrorCode, Refusal, Unreachable
from dms.actor.envelope import REPLY_PREFIX, make_envelope, now_ns, peek, seal
from dms.actor.handle import ROOT_INBOX, Address, Handle
from dms.actor.ratelimit import PeerRates
from dms.actor.system import REFUSAL_TTL_S, reply_payload
from dms.actor.transport import Receiver
from dms.network.discovery import peer_id_of
from dms.network.frames import PREFIX, FrameError, FrameReader
from dms.network.idlewatch import IdleWatch
from dms.network.loop import NetworkError, why
from dms.network.outbound import Sending
from dms.network.paced import ByteBudget, StreamOpens
from dms.network.transfer import (
    CHUNK_PROTOCOL,
    Offers,
    TransferBudget,
    read_chunks,
    serve_chunks,
)
from dms.security.identity import Identity

log = logging.getLogger("dms.network")


class Unicast(Sending):
    """Sending frames to a peer (``Sending``), and reading the frames peers send (a
    transport part)."""

    _receiver: Receiver | None
    offers: Offers | None
    tap: Callable[[str, bytes], None] | None
    frames_in: int
    frames_refused: int
    identity: Identity
    _rates: PeerRates
    _idle: IdleWatch
    _bytes: ByteBudget
    _opens: StreamOpens
    _transfers: TransferBudget

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
