"""Two bare py-libp2p hosts on loopback, for the floors the benches compare against.

:class:`HostPair` runs a server host that answers one protocol and a client host
connected to it, each on a trio thread of its own, with the noise and yamux options
the node uses and none of its layers (no envelope, no actor, no budgets).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from multiaddr import Multiaddr

LOOPBACK = Multiaddr("/ip4/127.0.0.1/tcp/0")
READY_S = 30.0


def bare_host() -> IHost:
    key_pair = create_new_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt=create_yamux_muxer_option(),
    )


async def read_exactly(stream: INetStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.read(size - len(data))
        if not chunk:
            raise EOFError("stream closed")
        data += chunk
    return bytes(data)


class HostPair:
    """``handler`` answers ``protocol`` on the server. ``on_client(pair, nursery)``, if
    given, runs on the client's loop once it is connected (open streams, start tasks
    in ``nursery``: they are cancelled at :meth:`close`). :meth:`run` calls an async
    function on the client's loop from any thread."""

    def __init__(
        self,
        protocol: TProtocol,
        handler: Callable[[INetStream], Awaitable[None]],
        on_client: Callable[[HostPair, trio.Nursery], Awaitable[None]] | None = None,
    ) -> None:
        self.protocol, self._handler, self._on_client = protocol, handler, on_client
        self.client: IHost | None = None
        self.peer: ID | None = None
        self._addr: str | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        for side in (self._server, self._client):
            self._ready.clear()
            threading.Thread(target=trio.run, args=(side,), daemon=True).start()
            if not self._ready.wait(READY_S):
                raise RuntimeError(f"the bare {side.__name__.strip('_')} did not start")

    async def new_stream(self) -> INetStream:
        assert self.client is not None and self.peer is not None
        return await self.client.new_stream(self.peer, [self.protocol])

    def run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        self._stop.set()

    async def _server(self) -> None:
        host = bare_host()
        async with host.run([LOOPBACK]):
            host.set_stream_handler(self.protocol, self._handler)
            self._addr = f"{host.get_addrs()[0]}"
            if "/p2p/" not in self._addr:
                self._addr += f"/p2p/{host.get_id().to_base58()}"
            self._ready.set()
            await trio.to_thread.run_sync(self._stop.wait)

    async def _client(self) -> None:
        host = bare_host()
        async with host.run([LOOPBACK]):
            assert self._addr is not None
            info = info_from_p2p_addr(Multiaddr(self._addr))
            await host.connect(info)
            self.client, self.peer = host, info.peer_id
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                if self._on_client is not None:
                    await self._on_client(self, nursery)
                self._ready.set()
                await trio.to_thread.run_sync(self._stop.wait)
                nursery.cancel_scope.cancel()
