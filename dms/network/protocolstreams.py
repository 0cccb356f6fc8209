"""The streams of py-libp2p's own protocols (identify, ping, the DHT, DCUtR, ...).

:class:`ProtocolStreams`: beside the stream budgets of every stream
(:class:`~dms.network.streambudget.StreamBudget`), at most
``max_protocol_streams_per_peer`` streams of one protocol from one peer, and a
stream with no byte either way for ``protocol_idle_s`` is reset (an
:class:`~dms.network.idlewatch.IdleWatch`). Their handlers set no deadline of their
own on every wait (the DHT's reads none at all, and its 12 handler slots, for all
peers, were held for ever by idle streams). The budgets' shared terms, and the
others: ``dms.network.budgets``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from dms.network.budgets import Budget, Stake
from dms.network.idlewatch import IdleWatch, Watched
from dms.network.settings import NetworkSettings

log = logging.getLogger("dms.network")


class _Touching:
    """A stream whose reads and writes mark it active (``Watched.touch``); the rest is
    the stream's own."""

    def __init__(self, stream: INetStream, watched: Watched) -> None:
        self._stream = stream
        self._watched = watched

    async def read(self, n: int | None = None) -> bytes:
        data = await self._stream.read(n)
        self._watched.touch()
        return data

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)
        self._watched.touch()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


# py-libp2p protocols whose streams live as long as the connection by design (a quiet
# topic sends nothing): not reset when idle; bounded per peer, and by connections.
LONG_LIVED_PREFIXES = ("/meshsub/", "/floodsub/")
# Protocols py-libp2p serves only so many streams of at once, for all peers, resetting
# the rest: the DHT's 12 (KadDHT's inbound limiter). Full, the oldest stream of a peer
# the node has no stake in is reset for the newcomer, as connections are evicted.
PROTOCOL_SLOTS = {"/ipfs/kad/1.0.0": 12}
# How long a newcomer waits for the stream reset for it to give back its slot.
EVICTED_WAIT_S = 2.0


@dataclass
class _Serving:
    peer: ID
    stream: INetStream
    since: float
    ended: trio.Event = field(default_factory=trio.Event)
    evicted: bool = False  # chosen to make room: not chosen again while it ends


@dataclass
class ProtocolStreams:
    """The streams of py-libp2p's own protocols (identify, ping, the DHT, DCUtR, ...):
    at most ``max_protocol_streams_per_peer`` of one protocol from one peer at once
    (one more is reset, ``streams_full``), and one with no byte read or written for
    ``protocol_idle_s`` is reset (``stream_idle``), a long-lived one excepted
    (``LONG_LIVED_PREFIXES``). A protocol py-libp2p serves only so many streams of
    at once (``PROTOCOL_SLOTS``) evicts, when full, the oldest stream of a peer
    without a ``stake`` for a newcomer (``stream_evicted``), so idle or trickling
    streams cannot keep honest ones out. ``install`` wraps the handler of every
    protocol the host serves then, but those in ``own`` (protocols with budgets of
    their own: dms's actor and chunk streams, the relay's circuits). Streams in all
    are :class:`StreamBudget`'s."""

    settings: NetworkSettings
    refusals: Counter[str]
    idle: IdleWatch
    stake: Stake
    _by_peer: Counter[tuple[ID, str]] = field(default_factory=Counter)
    _serving: dict[str, dict[int, _Serving]] = field(default_factory=dict)
    watched: set[str] = field(default_factory=set)

    def install(self, host: Any, own: set[str]) -> None:
        for protocol, handler in list(host.get_mux().handlers.items()):
            if protocol in own or handler is None:
                continue
            host.set_stream_handler(protocol, self._wrap(str(protocol), handler))
            self.watched.add(str(protocol))

    def _wrap(
        self, protocol: str, handler: Callable[[INetStream], Awaitable[None]]
    ) -> Callable[[INetStream], Awaitable[None]]:
        long_lived = protocol.startswith(LONG_LIVED_PREFIXES)

        async def budgeted(stream: INetStream) -> None:
            key = (stream.muxed_conn.peer_id, protocol)
            limit = self.settings.max_protocol_streams_per_peer
            if self._by_peer[key] >= limit:
                self.refusals[Budget.STREAMS_FULL] += 1
                log.info(
                    "%s stream from %s reset: streams_full (%d of this protocol open from "
                    "it; at most %d, max_protocol_streams_per_peer)",
                    protocol,
                    key[0],
                    self._by_peer[key],
                    limit,
                )
                with contextlib.suppress(Exception):
                    await stream.reset()
                return
            serving = self._serving.setdefault(protocol, {})
            slots = PROTOCOL_SLOTS.get(protocol)
            # Decided and counted with no await between (see StreamBudget.install); the
            # evicted stream is waited for once this one holds its place.
            evicted = None
            if slots is not None and len(serving) >= slots:
                evicted = self._evict(protocol, serving, key[0])
                if evicted is None:
                    with contextlib.suppress(Exception):
                        await stream.reset()
                    return
            self._by_peer[key] += 1
            entry = serving[id(stream)] = _Serving(key[0], stream, time.monotonic())
            watched = None
            try:
                if evicted is not None:
                    with contextlib.suppress(Exception):
                        await evicted.stream.reset()
                    with trio.move_on_after(EVICTED_WAIT_S):
                        await evicted.ended.wait()
                watched = None if long_lived else self.idle.watch(stream.reset)
                await handler(stream if watched is None else _Touching(stream, watched))  # type: ignore[arg-type]
            finally:
                if watched is not None:
                    self.idle.forget(watched)
                serving.pop(id(stream), None)
                entry.ended.set()
                self._by_peer[key] -= 1
                if self._by_peer[key] <= 0:
                    del self._by_peer[key]

        return budgeted

    def _evict(self, protocol: str, serving: dict[int, _Serving], newcomer: ID) -> _Serving | None:
        """Room among ``serving`` for ``newcomer``: the oldest stream of a peer without a
        stake, not already chosen, to reset (and wait a little for its handler to give
        its slot back); None if there is none."""
        others = [
            e for e in serving.values() if not e.evicted and not self.stake(e.peer.to_base58())
        ]
        if not others:
            self.refusals[Budget.STREAMS_FULL] += 1
            log.info(
                "%s stream from %s reset: streams_full (the %d served at once are all of "
                "peers this node has a stake in)",
                protocol,
                newcomer,
                len(serving),
            )
            return None
        oldest = min(others, key=lambda e: e.since)
        oldest.evicted = True
        self.refusals[Budget.STREAM_EVICTED] += 1
        log.info(
            "%s stream of %s, open %.1f s, reset for one of %s: stream_evicted (at most %d "
            "served at once; the oldest of a peer this node has no stake in goes)",
            protocol,
            oldest.peer,
            time.monotonic() - oldest.since,
            newcomer,
            len(serving),
        )
        return oldest

    def usage(self) -> dict[str, tuple[int, int]]:
        return {
            "protocol_streams_per_peer": (
                max(self._by_peer.values(), default=0),
                self.settings.max_protocol_streams_per_peer,
            ),
            "protocol_streams_idle_watched": (len(self.idle), self.settings.max_streams),
        }
