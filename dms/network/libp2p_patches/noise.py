"""A patch to py-libp2p's Noise writer.

**A Noise message goes out whole, cancelled or not.** py-libp2p encrypts a message
(spending its nonce) and then takes the TCP stream's write lock and sends, both
cancel points: a write whose deadline passed in between (a dial's or new stream's
``dial_timeout_s``, a loaded node's yield at a lock) dropped the message, and every
later one on the connection failed to decrypt at the peer, which closed it (quietly:
py-libp2p logs that at debug), every stream of it reset. A loaded daemon reading a
flood of 100 keys gave up on new streams to some of them so, and two keys of a run
lost their connection mid-test. A cancel now lands before the encryption; once
encrypted, the message is sent shielded from it (the caller's cancel comes at its
next checkpoint), within ``NOISE_SEND_LIMIT_S`` (30 s; go-yamux closes a connection
whose write takes 10 s): past it, part of the message may be on the wire, so the
connection is closed and the write fails. The common case opens no cancel scope
(one cost 14% of a 200-byte round trip's CPU): the TCP write lock free, it is
taken, the message encrypted under it and handed to the socket with no checkpoint
between; only what the socket does not take at once is sent shielded.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, NoReturn

import trio

log = logging.getLogger("dms.network")


# How long a Noise message, once encrypted, may take to reach the socket, cancelled or
# not; past it the connection is closed (go-yamux's ConnectionWriteTimeout is 10 s).
NOISE_SEND_LIMIT_S = 30.0


def noise_messages_go_whole() -> bool:
    from libp2p.io.exceptions import ConnectionClosedError
    from libp2p.security.noise import io as noise_io

    writer = getattr(noise_io, "BaseNoiseMsgReadWriter", None)
    if (
        writer is None
        or not callable(getattr(writer, "write_msg", None))
        or not callable(getattr(writer, "encrypt", None))
        or not callable(getattr(writer, "close", None))
    ):
        log.info("py-libp2p's Noise writer changed shape; a cancelled write may break it")
        return False
    write_msg = writer.write_msg
    from libp2p.io.trio import TrioTCPStream
    from libp2p.network.connection.raw_connection import RawConnection

    packets = noise_io.NoisePacketReadWriter
    most = getattr(noise_io, "MAX_PLAINTEXT_LENGTH", 0)
    fast = callable(getattr(packets, "encode_msg", None)) and isinstance(most, int)

    async def write_whole(self: Any, msg: bytes, prefix_encoded: bool = False) -> None:
        # A function patched in as BaseNoiseMsgReadWriter.write_msg. A cancel lands here,
        # before the message's nonce is spent; once encrypted, it goes out whole.
        await trio.lowlevel.checkpoint_if_cancelled()
        packet = self.read_writer
        raw = getattr(packet, "read_write_closer", None)
        tcp = getattr(raw, "stream", None)
        if (
            fast
            and not prefix_encoded
            and len(msg) <= most
            and type(packet) is packets
            and type(raw) is RawConnection
            and type(tcp) is TrioTCPStream
            and not tcp.write_lock.locked()
            and hasattr(getattr(tcp.stream, "socket", None), "_sock")  # trio's own
        ):
            # The common case, without a cancel scope (a third of a small frame's
            # write): the TCP write lock taken, the message encrypted under it and
            # handed to the socket at once, no checkpoint in between; only what the
            # socket does not take at once is sent shielded, as below.
            tcp.write_lock.acquire_nowait()
            try:
                data = packet.encode_msg(self.encrypt(msg))
                sock = tcp.stream.socket
                if sock.fileno() == -1:
                    return  # closed here: py-libp2p's write returns so too
                try:
                    sent = sock._sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise ConnectionClosedError(f"TCP connection broken: {exc}") from exc
                if sent < len(data):
                    await _send_rest(self, tcp.stream, memoryview(data)[sent:])
                    return
            finally:
                tcp.write_lock.release()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        limit = trio.current_time() + NOISE_SEND_LIMIT_S
        with trio.CancelScope(shield=True, deadline=limit) as sending:
            await write_msg(self, msg, prefix_encoded)
        if sending.cancelled_caught:
            await _close_unsent(self)

    async def _send_rest(self: Any, stream: Any, rest: memoryview) -> None:
        limit = trio.current_time() + NOISE_SEND_LIMIT_S
        with trio.CancelScope(shield=True, deadline=limit) as sending:
            try:
                await stream.send_all(rest)
            except trio.ClosedResourceError:
                return
            except trio.BrokenResourceError as exc:
                raise ConnectionClosedError(f"TCP connection broken: {exc}") from exc
        if sending.cancelled_caught:
            await _close_unsent(self)

    async def _close_unsent(self: Any) -> NoReturn:
        # Part of the message may be on the wire: the connection cannot carry another.
        closing = trio.CancelScope(shield=True, deadline=trio.current_time() + 1)
        with closing, contextlib.suppress(Exception):
            await self.close()
        raise ConnectionClosedError(
            f"a Noise message not sent within {NOISE_SEND_LIMIT_S:g} s: connection closed"
        )

    writer.write_msg = write_whole
    return True
