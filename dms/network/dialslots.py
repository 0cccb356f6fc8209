"""The swarm's dial slots: how many addresses are being dialed at once, and who waits.

py-libp2p bounds the addresses a swarm dials at once with one ``trio.CapacityLimiter``
of 32 (go-libp2p's ``DefaultMaxConcurrentDials``), first come, first served, and an
address holds its slot until its dial connects, fails, or its caller's deadline ends
it. An address that drops every packet (a host gone, a firewall, or a lie) neither
connects nor fails: TCP waits about two minutes, so it holds its slot for the caller's
whole deadline (5 s for this node's own dials, 10 s for py-libp2p's auto-connector).
Keys cost nothing, and a key may advertise 8 such addresses that a dial tries
(``dms.network.dialing``): a handful of them, dialed again and again (a placement
asking the providers its peers table lists, the auto-connector, the peer book at
start), kept every slot taken and hundreds of addresses queued, and a peer the node
then dialed waited behind all of them past its own deadline.

:class:`DialSlots` keeps the bound (the same 32 a swarm) and changes who gets a slot:

- a waiting address of a *preferred* peer (one an address of which connected in this
  process, or that the node has a stake in: ``configure``) goes before any other; then,
  among equals, a dial's first address before any dial's second, its second before any
  third (a dial of 8 addresses no longer queues 8 in front of the next dial), then
  the latest first: under a backlog, the one most likely to have time left before its
  caller's deadline (a burst of dials queued earlier no longer holds back a dial made
  now; those left waiting end at their own deadlines, as they did);
- when every slot is held and an address waits, the address whose TCP connect has been
  pending the longest gives its slot up once it has had ``HOLD_S`` (1 s: a SYN
  unanswered that long was lost, or dropped), unless it is a preferred peer's and the
  waiting one is not: its dial counts it failed and goes on with its next address. A
  connection being upgraded (Noise, Yamux) keeps its slot, but for a preferred peer's
  address waiting, to which an address of another peer upgraded for ``UPGRADE_HOLD_S``
  (2 s) gives its slot up: a host that accepts every connection and says nothing (a
  tarpit, as cheap as a dropped address) would otherwise hold a slot for the dial's
  whole deadline. Any address keeps its slot while nothing waits: without contention
  a dial is as before.

So a peer the node prefers is dialed within about ``UPGRADE_HOLD_S`` whatever the rest, and any
other dial's first address waits only behind other dials' first addresses, served at
least ``limit / HOLD_S`` a second (32 a second) by addresses that never answer.

Served the latest first, a dial of a peer neither preferred nor reached before waited
for ever behind new keys' dials that kept coming faster than that. Those dials have a
budget (:meth:`DialSlots.admit`, asked by ``admission.admit`` before any address is
dialed, once a dial whether it goes direct, through a relay or both): ``new_per_s`` a
second (16, half what the slots serve), ``new_burst`` at once (64: two of py-libp2p's
auto-connector batches); past it, while the slots are contended (every one held, or
an address waiting; a dial through a relay in flight, which takes no slot, counts as
one held: :meth:`DialSlots.relaying`), such a dial is refused at once
(``NEW_DIALS_FULL``), not queued. So the first addresses that wait come no faster
than the slots serve, and one that waits is served; and keys reached through a relay
alone, whose dials never hold a slot, are refused past the budget once as many of
their dials are in flight as there are slots. Uncontended, a dial is as before, and a
preferred peer's is never counted.
See specs/security.md, "Addresses a peer advertises".
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import trio

from dms.network.libp2p_patches.source import shipped_source

log = logging.getLogger("dms.network")

# How long an address's TCP connect may hold its slot while other addresses wait.
HOLD_S = 1.0
# How long another peer's connection may hold its slot in its upgrade while a preferred
# peer's address waits: an honest Noise and Yamux upgrade takes a few round trips.
UPGRADE_HOLD_S = 2.0
# Counted in a transport's refusals each time an address gives its slot up.
PREEMPTED = "dial_slot_preempted"
# Dials a second, and at once, of peers neither preferred nor reached before while the
# slots are contended (``DialSlots.admit``): half the rate at which the slots serve
# addresses that never answer (``limit / HOLD_S``), and two auto-connector batches.
NEW_DIALS_PER_S = 16.0
NEW_DIAL_BURST = 64
# Counted in a transport's refusals for each dial refused past that budget.
NEW_DIALS_FULL = "new_dials_full"


@dataclass(eq=False)
class Attempt:
    """One address being dialed, or waiting to be."""

    preferred: bool
    nth: int  # its place in its dial (0: the dial's first address)
    seq: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # When its TCP connect began (trio's clock); None while it is not connecting.
    connecting_since: float | None = None
    # When its upgrade began (its connect done); None before.
    upgrading_since: float | None = None
    holding: bool = False  # in a slot now
    preempted: bool = False
    wake: trio.Event = field(default_factory=trio.Event)
    # The slots it holds, told when its connect begins (``connecting``).
    slots: DialSlots | None = None

    def connecting(self) -> None:
        """Its TCP connect begins (the transports' watched ``dial``): it may be made to
        give its slot up ``hold_s`` from now, so the first waiting address, which may
        have found no attempt to take a slot from, looks again."""
        self.connecting_since = trio.current_time()
        self.upgrading_since = None
        if self.slots is not None:
            self.slots._wake_first()

    def order(self) -> tuple[bool, int, int]:
        return (not self.preferred, self.nth, -self.seq)


# The attempt the running task dials (read by the transports' watched ``dial``).
CURRENT: ContextVar[Attempt | None] = ContextVar("dms_dial_attempt", default=None)


class DialSlots:
    """At most ``limit`` addresses dialed at once, handed out as the module says. Runs
    on the swarm's trio thread."""

    def __init__(
        self,
        limit: int,
        hold_s: float = HOLD_S,
        refusals: Counter[str] | None = None,
        upgrade_hold_s: float = UPGRADE_HOLD_S,
        new_per_s: float = NEW_DIALS_PER_S,
        new_burst: int = NEW_DIAL_BURST,
    ) -> None:
        self.limit = limit
        self.hold_s = hold_s
        self.upgrade_hold_s = upgrade_hold_s
        self.new_per_s = new_per_s
        self.new_burst = new_burst
        self._tokens = float(new_burst)
        self._stamp: float | None = None  # trio's clock at the last refill
        self._read_at = 0.0  # and the process's (``usage`` reads it from other threads)
        self.refusals: Counter[str] = refusals if refusals is not None else Counter()
        self.preferred: Callable[[Any], bool] = lambda _peer: False
        self._held: set[Attempt] = set()
        self._waiting: list[Attempt] = []
        self._releasing = 0  # attempts told to give their slot up, not yet out
        self._relayed = 0  # dials through a relay in flight (``relaying``)
        self._seq = itertools.count()

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def usage(self) -> dict[str, tuple[int, int]]:
        """Slots held, and addresses waiting for one (against the same bound); new keys'
        dials taken from their budget now (its burst spent, of ``new_burst``)."""
        spent = 0
        if self._stamp is not None:  # read from any thread: refilled as of now, not kept
            since = time.monotonic() - self._read_at
            spent = self.new_burst - math.floor(
                min(self.new_burst, self._tokens + since * self.new_per_s)
            )
        return {
            "dial_slots": (self.held, self.limit),
            "dial_slots_waiting": (self.waiting, self.limit),
            "new_dials": (spent, self.new_burst),
        }

    def _refilled(self) -> float:
        """The new dials' budget as of now (trio's clock: the swarm's thread)."""
        now = trio.current_time()
        if self._stamp is not None:
            self._tokens = min(self.new_burst, self._tokens + (now - self._stamp) * self.new_per_s)
        self._stamp = now
        self._read_at = time.monotonic()
        return self._tokens

    def admit(self) -> str | None:
        """A dial of a peer neither preferred nor reached before is to start: None if it
        may (taking one of ``new_burst``, given back at ``new_per_s``), or why not. Past
        the budget it is refused only while the slots are contended (every one held, a
        dial through a relay in flight counted as one, or an address waiting):
        uncontended, it takes a slot at once, as before."""
        if self._refilled() >= 1:
            self._tokens -= 1
            return None
        if len(self._held) + self._relayed < self.limit and not self._waiting:
            return None
        self.refusals[NEW_DIALS_FULL] += 1
        return (
            f"{NEW_DIALS_FULL}: more than {self.new_per_s:g} dials a second ({self.new_burst} "
            "at once) of peers never reached, while every dial slot is taken (a dial "
            "through a relay in flight counted as one)"
        )

    @contextlib.contextmanager
    def relaying(self) -> Iterator[None]:
        """A dial through a relay runs inside: it takes no slot (its CONNECT goes on a
        connection to the relay, whose own dial took one), and counts as one held in
        :meth:`admit`'s contention: else any number of keys reached through a relay
        alone were never refused, the slots never contended by their dials."""
        self._relayed += 1
        try:
            yield
        finally:
            self._relayed -= 1

    @contextlib.asynccontextmanager
    async def slot(self, preferred: bool, nth: int) -> AsyncIterator[Attempt]:
        """Wait for a slot and hold it while the body runs. The body dials inside
        ``attempt.scope``, which is cancelled if the attempt must give its slot up
        (``attempt.preempted``)."""
        me = Attempt(preferred, nth, next(self._seq), slots=self)
        self._waiting.append(me)
        try:
            await self._turn(me)
        finally:
            self._waiting.remove(me)
            self._wake_first()  # the next in line: a slot may be free, or one due
        self._held.add(me)
        me.holding = True
        me.connecting_since = trio.current_time()
        token = CURRENT.set(me)
        try:
            yield me
        finally:
            CURRENT.reset(token)
            self._held.discard(me)
            me.holding = False
            if me.preempted:
                self._releasing -= 1
            self._wake_first()

    def _first(self) -> Attempt | None:
        return min(self._waiting, key=Attempt.order, default=None)

    def _wake_first(self) -> None:
        first = self._first()
        if first is not None:
            first.wake.set()

    async def _turn(self, me: Attempt) -> None:
        """Return once ``me`` is first in line and a slot is free; while it is first and
        none is, it makes one (``_make_room``) as soon as one is due."""
        while True:
            wake_at = math.inf
            if self._first() is me:
                if len(self._held) < self.limit:
                    return
                wake_at = self._make_room(me)
            me.wake = trio.Event()
            with trio.move_on_at(wake_at):
                await me.wake.wait()

    def _due(self, held: Attempt, me: Attempt) -> float:
        """When ``held`` is to give its slot up to ``me``: ``hold_s`` into its connect,
        ``upgrade_hold_s`` into its upgrade if only ``me`` is preferred; never else."""
        if held.preempted or (held.preferred and not me.preferred):
            return math.inf
        if held.connecting_since is not None:
            return held.connecting_since + self.hold_s
        if held.upgrading_since is not None and me.preferred and not held.preferred:
            return held.upgrading_since + self.upgrade_hold_s
        return math.inf

    def _make_room(self, me: Attempt) -> float:
        """Tell the attempt due first (``_due``) to give its slot up if it is due; else
        return when it will be. A slot already being given back is waited for
        instead."""
        if self._releasing or not self._held:
            return math.inf
        victim = min(self._held, key=lambda a: self._due(a, me))
        due = self._due(victim, me)
        if math.isinf(due):
            return math.inf
        if trio.current_time() < due:
            return due
        victim.preempted = True
        self._releasing += 1
        self.refusals[PREEMPTED] += 1
        victim.scope.cancel()
        return math.inf


_slots: weakref.WeakKeyDictionary[Any, DialSlots] = weakref.WeakKeyDictionary()

# The sha256 of py-libp2p's Swarm._dial_addr_single_attempt (its source, dedented) that
# the watch of connects was written against: a transport's ``dial`` is the connect
# alone (a raw connection), the upgrade (Noise, Yamux) after it, outside. Another
# source may upgrade inside ``dial``, or dial some other way: a handshake would be
# taken for a pending connect and cut at HOLD_S. Then no slot is taken back (the
# order stays) and no transport is watched.
SINGLE_ATTEMPT_SHA256 = "6fce315cfe43713ba40ae88f67bc2420d267b967d31643c45545540b957b2045"


@functools.cache
def connects_are_watchable() -> bool:
    """Whether a swarm's dial of one address is the one the watch was written against."""
    from libp2p.network.swarm import Swarm

    return shipped_source(Swarm._dial_addr_single_attempt, SINGLE_ATTEMPT_SHA256) is not None


def slots_for(swarm: Any) -> DialSlots:
    """The swarm's dial slots, as many as its own limiter had (32), made at its first
    dial: its transports' ``dial`` is watched from then on, if py-libp2p's dial of an
    address is the one written against (``connects_are_watchable``); if not, no slot
    is taken back."""
    slots = _slots.get(swarm)
    if slots is None:
        limiter = getattr(swarm, "_global_dial_limiter", None)
        limit = int(limiter.total_tokens) if limiter is not None else 32
        if connects_are_watchable():
            slots = _slots[swarm] = DialSlots(limit)
            _watch_connects(swarm)
        else:
            log.info("py-libp2p's dial of an address changed shape; no dial slot is taken back")
            slots = _slots[swarm] = DialSlots(limit, math.inf, upgrade_hold_s=math.inf)
    return slots


def configure(
    swarm: Any,
    preferred: Callable[[Any], bool],
    refusals: Counter[str],
    new_per_s: float = NEW_DIALS_PER_S,
    new_burst: int = NEW_DIAL_BURST,
) -> None:
    """Which peers the swarm's dials prefer (besides those it reached in this process),
    where its slots count the addresses that gave theirs up and the dials refused, and
    the budget of the other dials (``DialSlots.admit``)."""
    slots = slots_for(swarm)
    slots.preferred = preferred
    slots.refusals = refusals
    slots.new_per_s = new_per_s
    slots.new_burst = slots._tokens = new_burst


def _watch_connects(swarm: Any) -> None:
    """Each transport's ``dial`` (the TCP connect, before the upgrade) marks the attempt
    that runs it as connecting while it runs. A task started during an attempt (a
    connection's own) inherits ``CURRENT``: only an attempt still in its slot is
    marked."""
    manager = getattr(swarm, "transport_manager", None)
    if manager is None:
        return
    for transport in manager.get_transports():
        original = transport.dial
        if getattr(original, "dms_watched", False):
            continue

        async def dial(maddr: Any, _original: Any = original) -> Any:
            attempt = CURRENT.get()
            if attempt is not None and not attempt.holding:
                attempt = None
            if attempt is not None:
                attempt.connecting()
            try:
                raw = await _original(maddr)
            finally:
                if attempt is not None:
                    attempt.connecting_since = None
            if attempt is not None:
                attempt.upgrading_since = trio.current_time()
            return raw

        dial.dms_watched = True  # type: ignore[attr-defined]
        transport.dial = dial
