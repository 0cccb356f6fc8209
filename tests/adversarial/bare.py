"""A bare py-libp2p gossipsub peer: no dms code on the wire, only the library.

With ``strict_signing=True`` it behaves as go- and js-libp2p do by default
(StrictSign: it signs its messages and drops any message without a valid
signature). With ``strict_signing=False`` it is a hostile peer that can hand
its router any message it builds (``forge``), a ``from`` that is not its own
included.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from libp2p import create_yamux_muxer_option, new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from dms.security import Identity

T = TypeVar("T")


class BarePeer:
    """A py-libp2p host with gossipsub on a trio thread of its own, dialed to ``addr``."""

    def __init__(self, addr: str, *, strict_signing: bool) -> None:
        self.identity = Identity.generate()
        self.peer_id = self.identity.peer_id
        self.heard: dict[str, list[rpc_pb2.Message]] = {}
        self._addr = addr
        self._strict = strict_signing
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self.pubsub: Pubsub | None = None
        self.router: GossipSub | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the bare peer did not start: {self._error!r}")

    async def _main(self) -> None:
        key_pair = create_new_key_pair(self.identity.private_bytes())
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt=create_yamux_muxer_option(),
        )
        router = GossipSub(
            protocols=[PROTOCOL_ID_V11],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=1,
            heartbeat_initial_delay=0.1,
            max_messages_per_topic_per_second=10_000,
        )
        pubsub = Pubsub(host, router, strict_signing=self._strict)
        self.pubsub, self.router = pubsub, router
        try:
            async with (
                host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]),
                background_trio_service(pubsub),
                background_trio_service(router),
            ):
                await pubsub.wait_until_ready()
                await host.connect(info_from_p2p_addr(Multiaddr(self._addr)))
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._token = trio.lowlevel.current_trio_token()
                    self._ready.set()
                    await trio.to_thread.run_sync(self._stop.wait)
                    nursery.cancel_scope.cancel()
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def subscribe(self, topic: str) -> None:
        heard = self.heard.setdefault(topic, [])

        async def go() -> None:
            assert self.pubsub is not None and self._nursery is not None
            subscription = await self.pubsub.subscribe(topic)

            async def pump() -> None:
                while True:
                    heard.append(await subscription.get())

            self._nursery.start_soon(pump)

        self.call(go)

    def publish(self, topic: str, data: bytes) -> None:
        async def go() -> None:
            assert self.pubsub is not None
            await self.pubsub.publish(topic, data)

        self.call(go)

    def forge(self, msg: rpc_pb2.Message) -> None:
        """Hand ``msg`` to the router as it is (no validation, no signature of ours):
        it goes to the peers subscribed to its topics."""

        async def go() -> None:
            assert self.pubsub is not None and self.router is not None
            await self.router.publish(self.pubsub.my_id, msg)

        self.call(go)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
