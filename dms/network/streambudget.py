"""Inbound streams open at once, per peer and in total.

:class:`StreamBudget`: one over its peer's cap is reset at once; with the total
full, the unstaked peer holding the most loses its oldest stream to the newcomer.
The budgets' shared terms, and the others: ``dms.network.budgets``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from libp2p.abc import INetStream
from libp2p.peer.id import ID

from dms.network.budgets import Budget, Stake
from dms.network.settings import NetworkSettings

log = logging.getLogger("dms.network")


@dataclass
class StreamBudget:
    """Inbound streams open at once, per peer and in total (wraps the host's stream
    handler: a stream counts from its arrival until its handler returns).

    When the total is full, a newcomer is not simply refused (keys and connections
    are cheap, so a few hundred keys would keep every honest stream out): the
    oldest stream of the peer without a ``stake`` that holds the most is reset for
    it (``stream_evicted``). One over its own per-peer cap is reset (``streams_full``),
    and so is a newcomer when every stream open is a staked peer's."""

    settings: NetworkSettings
    refusals: Counter[str]
    stake: Stake = lambda peer: False
    _by_peer: Counter[ID] = field(default_factory=Counter)
    _streams: dict[ID, dict[int, tuple[float, INetStream]]] = field(default_factory=dict)
    _open: int = 0

    def install(self, swarm: Any) -> None:
        handler: Callable[[INetStream], Awaitable[None]] = swarm.common_stream_handler

        async def counted(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
            s = self.settings
            over = self._by_peer[peer] >= s.max_streams_per_peer
            # Decided and counted with no await between: the eviction's reset is awaited
            # only once this stream holds its place (else a peer's streams arriving
            # meanwhile all passed its cap before any was counted).
            evicted = None if over or self._open < s.max_streams else self._evict_for(peer)
            if over or (self._open >= s.max_streams and evicted is None):
                self.refusals[Budget.STREAMS_FULL] += 1
                log.info(
                    "stream from %s reset: streams_full (%d open from it, %d in all; at most "
                    "%d and %d%s)",
                    peer,
                    self._by_peer[peer],
                    self._open,
                    s.max_streams_per_peer,
                    s.max_streams,
                    "" if over else ", all of peers this node has a stake in",
                )
                with contextlib.suppress(Exception):
                    await stream.reset()
                return
            self._by_peer[peer] += 1
            self._open += 1
            mine = self._streams.setdefault(peer, {})
            mine[id(stream)] = (time.monotonic(), stream)
            try:
                if evicted is not None:
                    with contextlib.suppress(Exception):
                        await evicted.reset()
                await handler(stream)
            finally:
                self._open -= 1
                mine.pop(id(stream), None)
                self._by_peer[peer] -= 1
                if self._by_peer[peer] <= 0:
                    del self._by_peer[peer]
                    self._streams.pop(peer, None)

        swarm.common_stream_handler = counted

    def _evict_for(self, newcomer: ID) -> INetStream | None:
        """The oldest stream of the unstaked peer holding the most, to reset for
        ``newcomer``; None if every stream is a staked peer's. The newcomer is admitted
        at once: the evicted stream's handler gives its count back as it ends."""
        holders = [
            peer
            for peer, streams in self._streams.items()
            if streams and peer != newcomer and not self.stake(peer.to_base58())
        ]
        if not holders:
            return None
        heaviest = max(holders, key=lambda peer: len(self._streams[peer]))
        key, (since, oldest) = min(self._streams[heaviest].items(), key=lambda kv: kv[1][0])
        del self._streams[heaviest][key]  # not chosen twice while it ends
        self.refusals[Budget.STREAM_EVICTED] += 1
        log.info(
            "stream of %s (it holds %d), open %.0f s, reset for one of %s: stream_evicted "
            "(max_streams %d full; the peer without a stake that holds the most goes first)",
            heaviest,
            self._by_peer[heaviest],
            time.monotonic() - since,
            newcomer,
            self.settings.max_streams,
        )
        return oldest

    def usage(self) -> dict[str, tuple[int, int]]:
        s = self.settings
        return {
            "streams": (self._open, s.max_streams),
            "streams_per_peer": (max(self._by_peer.values(), default=0), s.max_streams_per_peer),
        }
