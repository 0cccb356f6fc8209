"""The swarm's dial slots (dms.network.dialslots) under random dials, connects, upgrades,
retries and cancellations, on trio's clock: every slot given back once, none held while
an address waits, and a connect pending HOLD_S given up when an address waits."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from dms.network import dialslots
from dms.network.dialslots import (
    HOLD_S,
    DialSlots,
    _watch_connects,
    connects_are_watchable,
    slots_for,
)

# (what a TCP connect does, how long it takes): connects, is refused, or never answers.
Connect = tuple[str, float]


def _watched_transport() -> Any:
    """A transport whose ``dial`` is watched as a swarm's are (``_watch_connects``)."""

    async def dial(step: Connect) -> str:
        kind, took = step
        if kind == "hang":
            await trio.sleep_forever()
        await trio.sleep(took)
        if kind == "refused":
            raise OSError("connection refused")
        return "raw"

    transport = SimpleNamespace(dial=dial)
    _watch_connects(
        SimpleNamespace(transport_manager=SimpleNamespace(get_transports=lambda: [transport]))
    )
    return transport


async def _dial_with_retry(transport: Any, steps: list[Connect], upgrade_s: float) -> None:
    """As py-libp2p's ``_dial_with_retry``: a connect, then the upgrade; a refused
    connect tried again after a pause, the slot held meanwhile."""
    for step in steps:
        try:
            await transport.dial(step)
        except OSError:
            await trio.sleep(0.1)
            continue
        await trio.sleep(upgrade_s)
        return


def _violations(rng: random.Random, limit: int = 4, dials: int = 40) -> list[str]:
    """``dials`` addresses of random peers (preferred or not, a dial's first or a later
    address, a deadline or none) over 5 s, each connecting, refused, retried, never
    answering, upgraded quickly, slowly or never. What went wrong, checked whenever every
    task waits."""
    errors: list[str] = []

    async def main() -> None:
        transport = _watched_transport()
        slots = DialSlots(limit)

        async def address() -> None:
            await trio.sleep(rng.uniform(0, 5))
            preferred, nth = rng.random() < 0.3, rng.randrange(3)
            deadline = rng.choice([math.inf, rng.uniform(0.1, 8)])
            steps = [
                rng.choice(
                    [("hang", 0.0), ("refused", rng.uniform(0, 0.5)), ("ok", rng.uniform(0, 2))]
                )
                for _ in range(3)
            ]
            upgrade_s = rng.choice([0.0, rng.uniform(0, 3), math.inf])
            with trio.move_on_after(deadline):
                async with slots.slot(preferred, nth) as attempt:
                    if slots.held > limit:
                        errors.append(f"{slots.held} slots held, of {limit}")
                    with attempt.scope:
                        await _dial_with_retry(transport, steps, upgrade_s)

        async def check() -> None:
            while True:
                await trio.sleep(0.05)
                await trio.testing.wait_all_tasks_blocked()
                now = trio.current_time()
                if slots.waiting and slots.held < limit:
                    errors.append(f"{now:.2f}: {slots.waiting} wait, {slots.held} slots held")
                first = slots._first()
                if first is None or slots._releasing:
                    continue
                overdue = [
                    a
                    for a in slots._held
                    if a.connecting_since is not None
                    and now - a.connecting_since > HOLD_S + 0.06
                    and not a.preempted
                    and (first.preferred or not a.preferred)
                ]
                if overdue:
                    errors.append(f"{now:.2f}: a connect pending past HOLD_S kept its slot")

        async with trio.open_nursery() as outer:
            outer.start_soon(check)
            async with trio.open_nursery() as nursery:
                for _ in range(dials):
                    nursery.start_soon(address)
                await trio.sleep(30)
                nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
        if slots.held or slots.waiting or slots._releasing:
            errors.append(
                f"at the end: {slots.held} held, {slots.waiting} waiting, "
                f"{slots._releasing} being given back"
            )

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.001))
    return errors


@settings(max_examples=30)
@given(st.randoms(use_true_random=False))
def test_dial_slots_are_given_back_once_and_a_pending_connect_gives_its_up(
    rng: random.Random,
) -> None:
    """Whatever dials come, connect, fail, retry, upgrade or are cancelled (waiting or
    in a slot, preempted or not): no more than ``limit`` slots are held, none is free
    while an address waits, every one is given back at the end, and a connect pending
    past HOLD_S while an address waits gives its slot up."""
    assert _violations(rng) == []


def test_a_connect_begun_after_a_retry_gives_its_slot_up_after_hold_s() -> None:
    """A slot's address is refused and waits to try again (py-libp2p's retries): an
    address that then comes to wait finds no connect to take the slot from. The retry's
    connect never answers: it was never told to give the slot up, and the waiting
    address waited for its dial's deadline (10 s). Now a connect beginning tells the
    first waiting address to look again: it gets the slot HOLD_S into that connect."""
    transport = _watched_transport()
    slots = DialSlots(1)
    got: list[float] = []

    async def main() -> None:
        async def refused_then_hangs() -> None:
            with trio.move_on_after(10.0):
                async with slots.slot(False, 0) as attempt:
                    with attempt.scope:
                        await _dial_with_retry(transport, [("refused", 0.0), ("hang", 0.0)], 0.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(refused_then_hangs)
            await trio.sleep(0.05)  # in its pause between the two connects
            async with slots.slot(False, 0):
                got.append(trio.current_time())

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got and got[0] < 10.0, "the waiting address waited for the holder's deadline"


class _Swarm:
    """As much of a swarm as ``slots_for`` reads (it keeps a swarm's slots weakly)."""

    _global_dial_limiter: Any
    transport_manager: Any


def test_slots_are_taken_back_only_from_the_dial_they_were_written_against(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pending connect is told from an upgrade by watching a transport's ``dial``: right
    only while py-libp2p's dial of an address connects there and upgrades after. Another
    source (its digest differs) leaves the transports as they are and takes no slot back,
    keeping the order."""

    def swarm_made() -> tuple[DialSlots, Any, Any]:
        async def dial(maddr: Any) -> None:
            return None

        transport = SimpleNamespace(dial=dial)
        swarm = _Swarm()
        swarm._global_dial_limiter = trio.CapacityLimiter(32)
        swarm.transport_manager = SimpleNamespace(get_transports=lambda: [transport])
        return slots_for(swarm), transport, dial

    connects_are_watchable.cache_clear()
    slots, transport, dial = swarm_made()
    assert connects_are_watchable() and slots.hold_s == HOLD_S and slots.limit == 32
    assert transport.dial is not dial
    monkeypatch.setattr(dialslots, "SINGLE_ATTEMPT_SHA256", "0" * 64)
    connects_are_watchable.cache_clear()
    try:
        slots, transport, dial = swarm_made()
        assert slots.hold_s == math.inf and transport.dial is dial
    finally:
        monkeypatch.undo()
        connects_are_watchable.cache_clear()


def _upgrade_kept(preferred: bool) -> float:
    """One slot, its address connected and upgrading for 10 s (a host that accepts and
    says nothing); an address waiting from 0.1 s on. When it got the slot."""
    transport = _watched_transport()
    slots = DialSlots(1)
    got: list[float] = []

    async def main() -> None:
        async def tarpit() -> None:
            with trio.move_on_after(10.0):
                async with slots.slot(False, 0) as attempt:
                    with attempt.scope:
                        await _dial_with_retry(transport, [("ok", 0.0)], math.inf)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tarpit)
            await trio.sleep(0.1)
            async with slots.slot(preferred, 0):
                got.append(trio.current_time())

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return got[0]


def test_an_upgrade_that_never_ends_gives_its_slot_up_to_a_preferred_peer() -> None:
    """Addresses of a host that accepts every connection and never says a word upgrade
    (Noise) until their dials' deadlines, and an upgrade kept its slot: 32 of them
    held every slot from a peer the node has a stake in for 10 s (the auto-connector's
    deadline), past the preferred dial's own 5 s. Now another peer's upgrade gives its
    slot up to a preferred peer's address once it has had UPGRADE_HOLD_S; to any other
    address it keeps it."""
    assert _upgrade_kept(preferred=True) < 5.0
    assert _upgrade_kept(preferred=False) >= 10.0
