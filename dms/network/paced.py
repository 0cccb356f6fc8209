"""Budgets a second, enforced by backpressure: bytes read and new streams.

:class:`PacedBudget`: units each peer may make the node take a second, and all
peers without a stake together; over either, the next unit waits (nothing is
refused or lost).

- **Bytes read** (:class:`ByteBudget`): the bytes of frames a peer sends on its
  actor streams. A peer over either budget is read more slowly (its streams pause,
  so Yamux grants it no window and it cannot send more), not refused: no frame is
  lost, and the node's work on one peer's bytes, which cross Noise and Yamux
  whatever they hold, is bounded.
- **Stream openings** (:class:`StreamOpens`): new inbound streams, paced on the
  connection (its next stream is taken later): every stream opened costs the
  node's network thread its Yamux, multistream-select and Noise work whatever its
  handler then does, so a few keys opening thousands of streams (held, refused or
  reset) no longer keep it busy.

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

import trio
from libp2p.network.exceptions import SwarmException

from dms.actor.ratelimit import ShareMeter
from dms.network.budgets import Budget, Stake
from dms.network.loop import why
from dms.network.settings import NetworkSettings

log = logging.getLogger("dms.network")


@dataclass
class _Bucket:
    """A token bucket that may go below zero: what overdraws it (a frame, a stream) is
    never split or refused, and the next one waits until it is paid back."""

    tokens: float
    stamp: float

    def refill(self, rate: float, burst: float, now: float) -> None:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now

    def wait_s(self, rate: float, floor: float = 0.0) -> float:
        """Seconds until the bucket is back at ``floor`` (0: it is there)."""
        return (floor - self.tokens) / rate if self.tokens < floor else 0.0


@dataclass(frozen=True)
class Rates:
    """What a :class:`PacedBudget` allows: units a second and at once for each peer, and
    for all peers without a stake together."""

    per_peer: float
    peer_burst: float
    unknown: float
    unknown_burst: float


@dataclass
class PacedBudget:
    """Units a second (bytes, new streams) each peer may make the node take, and all
    peers the node has no stake in together (``stake``), enforced by backpressure:
    after a unit that overdraws a bucket, the next waits until it is paid back
    (:meth:`charge` says how long). Subclasses name the units (``rates``, ``code``,
    ``gauge``, ``what``, ``settings_named``).

    One trio thread uses it (no lock). ``forget`` a peer when its last connection
    closes; its entry goes once its bucket is full again (no fresh burst by
    reconnecting).
    """

    settings: NetworkSettings
    refusals: Counter[str]
    stake: Stake
    clock: Callable[[], float] = time.monotonic
    _peers: dict[str, _Bucket] = field(default_factory=dict)
    _unknown: _Bucket | None = None
    _meter: ShareMeter | None = None  # who draws on _unknown, and whether over its share
    _logged: dict[str, float] = field(default_factory=dict)
    _staked: dict[str, tuple[bool, float]] = field(default_factory=dict)

    code = Budget.BYTES_THROTTLED
    gauge = "inbound_bytes"  # usage(): f"{gauge}_per_peer", f"{gauge}_unknown"
    what = "bytes"
    settings_named = ""

    def rates(self) -> Rates:
        raise NotImplementedError

    def has_stake(self, peer: str) -> bool:
        """Whether this node has a stake in ``peer`` (asked again at most once a second:
        the frame budgets ask it for every frame too)."""
        return self._has_stake(peer, self.clock())

    def _has_stake(self, peer: str, now: float) -> bool:
        """``stake(peer)``, asked again at most once a second per peer (a frame is read
        far more often than a stake changes)."""
        known = self._staked.get(peer)
        if known is None or now - known[1] >= 1.0:
            known = self._staked[peer] = (self.stake(peer), now)
        return known[0]

    def charge(self, peer: str, size: float) -> float:
        """Take ``size`` units from ``peer``'s budgets; the seconds before it may be read
        from again (0: none). Counted and logged (once a second per peer) when it must
        wait."""
        r = self.rates()
        now = self.clock()
        mine = self._peers.get(peer)
        if mine is None:
            mine = self._peers[peer] = _Bucket(float(r.peer_burst), now)
        mine.refill(r.per_peer, r.peer_burst, now)
        mine.tokens -= size
        wait = mine.wait_s(r.per_peer)
        scope = "its own"
        if not self._has_stake(peer, now):
            if self._unknown is None or self._meter is None:
                self._unknown = _Bucket(float(r.unknown_burst), now)
                self._meter = ShareMeter(r.unknown)
            self._unknown.refill(r.unknown, r.unknown_burst, now)
            self._unknown.tokens -= size
            # Fair inside, as the frames' shared budget: a peer over its share of the last
            # second waits until the bucket is half full again, one within its share only
            # until it is out of debt. Keys that flood it keep it half full for the others,
            # and an honest newcomer's few streams or bytes are taken at once beside them.
            over = self._meter.draw(peer, size, now)
            floor = r.unknown_burst / 2 if over else 0.0
            shared = self._unknown.wait_s(r.unknown, floor)
            if shared > wait:
                wait, scope = shared, "that of all peers this node has no stake in"
        if wait > 0:
            self.refusals[self.code] += 1
            if now - self._logged.get(peer, float("-inf")) >= 1.0:
                self._logged[peer] = now
                log.info(
                    "%s of %s paused %.2f s: %s: over %s budget of %s a second (%s)",
                    "streams" if self.what == "bytes" else "connection",
                    peer,
                    wait,
                    self.code,
                    scope,
                    self.what,
                    self.settings_named,
                )
        return wait

    def forget(self) -> None:
        """Drop the peers whose buckets are full again (called when a peer leaves)."""
        r = self.rates()
        now = self.clock()
        for peer, bucket in list(self._peers.items()):
            if bucket.tokens + (now - bucket.stamp) * r.per_peer >= r.peer_burst:
                del self._peers[peer]
                self._logged.pop(peer, None)
                self._staked.pop(peer, None)

    def usage(self) -> dict[str, tuple[int, int]]:
        """Units owed now (below zero, a peer waits), per peer (the most) and unknown."""
        r = self.rates()
        now = self.clock()

        def used(bucket: _Bucket | None, rate: float, burst: float) -> int:
            if bucket is None:
                return 0
            tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
            return int(burst - tokens)

        most = max((used(b, r.per_peer, r.peer_burst) for b in self._peers.values()), default=0)
        return {
            f"{self.gauge}_per_peer": (most, int(r.peer_burst)),
            f"{self.gauge}_unknown": (
                used(self._unknown, r.unknown, r.unknown_burst),
                int(r.unknown_burst),
            ),
        }


@dataclass
class ByteBudget(PacedBudget):
    """Bytes a second each peer may send on its actor streams, and all peers the node
    has no stake in together: after a frame that overdraws a bucket, the stream's
    next read waits until it is paid back."""

    settings_named = (
        "max_inbound_bytes_per_peer_per_s, inbound_byte_burst_per_peer; "
        "max_inbound_bytes_per_s, inbound_byte_burst"
    )

    def rates(self) -> Rates:
        s = self.settings
        return Rates(
            s.max_inbound_bytes_per_peer_per_s,
            s.inbound_byte_burst_per_peer,
            s.max_inbound_bytes_per_s,
            s.inbound_byte_burst,
        )

    async def pace(self, peer: str, size: int) -> None:
        """Charge ``size`` bytes read from ``peer`` and wait until its budget allows them;
        with nothing to wait, still let the other tasks run (one read can return many
        frames, which would otherwise keep every other peer's frames waiting)."""
        wait = self.charge(peer, size)
        if wait > 0:
            await trio.sleep(wait)
        else:
            await trio.lowlevel.checkpoint()


@dataclass
class StreamOpens(PacedBudget):
    """New inbound streams a second each peer may open, and all peers the node has no
    stake in together, enforced on the connection: after a stream that overdraws a
    bucket, the connection's next stream is taken only once it is paid back.
    Meanwhile Yamux's queue of streams not yet taken (10) fills, its reader stops, so
    the peer's further stream openings wait in its own socket, read by no one.

    Each stream opened costs the node ~1.4 ms of CPU on its network thread before any
    handler of ours sees it (Yamux, multistream-select, Noise, trio's tasks, py-libp2p's
    notifications; measured, specs/security.md, "Stream openings"), whatever the
    handler then does; so the rate, not only the number held, is budgeted."""

    code = Budget.STREAMS_THROTTLED
    gauge = "new_streams"
    what = "new streams"
    settings_named = (
        "max_new_streams_per_peer_per_s, new_stream_burst_per_peer; "
        "max_unknown_new_streams_per_s, unknown_new_stream_burst"
    )

    def rates(self) -> Rates:
        s = self.settings
        return Rates(
            s.max_new_streams_per_peer_per_s,
            s.new_stream_burst_per_peer,
            s.max_unknown_new_streams_per_s,
            s.unknown_new_stream_burst,
        )

    def install(self, swarm: Any) -> None:
        """Pace every connection of ``swarm`` from its first inbound stream: through
        ``swarm.add_conn`` py-libp2p registers every connection (dialed, accepted,
        relayed), and there it starts the muxer's reader and the ``SwarmConn`` loop
        that calls ``accept_stream``, then notifies ``connected``. Paced only from that
        notification, the loop's first call, already waiting on the unpaced
        ``accept_stream``, took the connection's first stream uncharged, and at times
        the next too: a peer got one or two streams free with each new connection.
        Paced here, before the original runs, every stream is charged from the first
        (the first is taken at once, as on any new connection: its wait is for what it
        overdraws). A connection this cannot pace is closed, and refused as py-libp2p
        refuses one (``SwarmException``), its resource scope given back: it would run
        unpaced otherwise."""
        add_conn: Callable[..., Awaitable[Any]] = swarm.add_conn

        async def paced_from_the_first(muxed: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                self.pace(muxed)
            except Exception as exc:
                scope = getattr(muxed, "_resource_scope", None)
                with contextlib.suppress(Exception):
                    if scope is not None:
                        scope.close()
                with contextlib.suppress(Exception):
                    await muxed.close()
                raise SwarmException(f"connection not paced: {why(exc)}") from exc
            return await add_conn(muxed, *args, **kwargs)

        swarm.add_conn = paced_from_the_first

    def pace(self, muxed: Any) -> None:
        """Pace the streams the peer of ``muxed`` (a connection) opens on it: its
        ``accept_stream`` (called in a loop by py-libp2p's ``SwarmConn``, looked up
        anew each time) waits, before taking the next stream, for what the last one
        overdrew. Once per connection, before its ``SwarmConn`` starts (``install``)."""
        if getattr(muxed, "_dms_paced", False) or not hasattr(muxed, "accept_stream"):
            return
        muxed._dms_paced = True
        accept: Callable[[], Awaitable[Any]] = muxed.accept_stream
        peer = muxed.peer_id.to_base58()
        owed = 0.0

        async def paced() -> Any:
            nonlocal owed
            if owed > 0:
                await trio.sleep(owed)
            stream = await accept()
            owed = self.charge(peer, 1)
            return stream

        muxed.accept_stream = paced
