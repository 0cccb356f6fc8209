"""Owners and an aggregator in one process, every message carried as bytes.

The driver follows the fixed schedule (setup, then the announced rounds) and
plays dropouts: an owner told to drop at ``(round, phase)`` sends nothing from
that point on. ``tap`` sees every message the aggregator receives, as bytes,
so a test can check that no owner's true statistics reach it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

import numpy as np
from pydantic import BaseModel

from dms.mining.collab.aggregator import CollabAggregator
from dms.mining.collab.messages import OwnerResult, Proposal, RoundTotals
from dms.mining.collab.owner import CollabOwner
from dms.mining.errors import MiningError
from dms.mining.wire import decode, encode

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
Tap = Callable[[str, str, bytes], None]  # (message kind, sender, bytes) seen by the aggregator


class Phase(StrEnum):
    KEYS = "keys"  # never advertises keys
    ACCEPT = "accept"  # advertises keys, never accepts the roster
    INPUT = "input"  # sends nothing from this round's input on
    UNMASK = "unmask"  # sends this round's input, not its unmask reply


@dataclass(frozen=True)
class Drop:
    round: int
    phase: Phase = Phase.INPUT


@dataclass
class CollabRun:
    results: dict[str, OwnerResult]
    totals: list[RoundTotals]
    owner_cpu_s: dict[str, list[float]] = field(default_factory=dict)  # per round
    owner_bytes: dict[str, list[int]] = field(default_factory=dict)  # sent + received, per round
    aggregator_cpu_s: list[float] = field(default_factory=list)  # per round
    setup_bytes: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


class _Meter:
    """Carries messages as bytes and charges CPU time and bytes to a party."""

    def __init__(self, tap: Tap | None) -> None:
        self.tap = tap
        self.cpu: dict[str, float] = {}
        self.bytes: dict[str, int] = {}

    def run(self, party: str, call: Callable[[], T]) -> T:
        start = time.thread_time()
        try:
            return call()
        finally:
            self.cpu[party] = self.cpu.get(party, 0.0) + time.thread_time() - start

    def to_aggregator(self, sender: str, message: M) -> M:
        raw = self.run(sender, lambda: encode(message))
        self.bytes[sender] = self.bytes.get(sender, 0) + len(raw)
        if self.tap is not None:
            self.tap(type(message).__name__, sender, raw)
        return self.run("aggregator", lambda: decode(type(message), raw))

    def to_owner(self, receiver: str, message: M) -> M:
        raw = self.run("aggregator", lambda: encode(message))
        self.bytes[receiver] = self.bytes.get(receiver, 0) + len(raw)
        return self.run(receiver, lambda: decode(type(message), raw))

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        out = self.cpu, self.bytes
        self.cpu, self.bytes = {}, {}
        return out


def run_collab(
    proposal: Proposal,
    data: dict[str, np.ndarray],
    *,
    drops: dict[str, Drop] | None = None,
    tap: Tap | None = None,
) -> CollabRun:
    """Run the whole collaboration; raises :class:`CollabFailed` if it cannot finish."""
    if set(data) != set(proposal.owners):
        raise MiningError("data must be given for exactly the proposal's owners")
    drops = drops or {}
    begin = time.perf_counter()
    meter = _Meter(tap)
    owners = {name: CollabOwner(proposal, name, rows) for name, rows in data.items()}
    aggregator = CollabAggregator(proposal)
    gone: set[str] = set()

    def still(name: str, round_: int, phase: Phase) -> bool:
        drop = drops.get(name)
        if name not in gone and drop is not None and (drop.round, drop.phase) == (round_, phase):
            gone.add(name)
        return name not in gone

    first = proposal.first_round()
    for name, owner in owners.items():
        if still(name, first, Phase.KEYS):
            advert = meter.to_aggregator(name, meter.run(name, owner.advert))
            meter.run("aggregator", lambda a=advert: aggregator.receive_advert(a))
    roster = meter.run("aggregator", aggregator.roster)
    for advert in roster.adverts:
        name = advert.owner
        if still(name, first, Phase.ACCEPT):
            owner = owners[name]
            received = meter.to_owner(name, roster)
            accepted = meter.run(name, lambda o=owner, r=received: o.receive_roster(r))
            arrived = meter.to_aggregator(name, accepted)
            meter.run("aggregator", lambda a=arrived: aggregator.receive_accept(a))
    _, setup_bytes = meter.take()

    run = CollabRun(results={}, totals=[], setup_bytes=setup_bytes)
    while not aggregator.done:
        start = meter.run("aggregator", aggregator.start_round)
        round_ = start.round
        for name in start.live:
            if still(name, round_, Phase.INPUT):
                owner = owners[name]
                received = meter.to_owner(name, start)
                masked = meter.run(name, lambda o=owner, s=received: o.contribute(s))
                arrived = meter.to_aggregator(name, masked)
                meter.run("aggregator", lambda m=arrived: aggregator.receive_input(m))
        requests = meter.run("aggregator", aggregator.close_inputs)  # all in, or it fails
        for name, request in requests.items():
            if still(name, round_, Phase.UNMASK):
                owner = owners[name]
                received = meter.to_owner(name, request)
                reply = meter.run(name, lambda o=owner, r=received: o.unmask(r))
                arrived = meter.to_aggregator(name, reply)
                meter.run("aggregator", lambda r=arrived: aggregator.receive_unmask(r))
        totals = meter.run("aggregator", aggregator.finish_round)
        run.totals.append(totals)
        for name in totals.survivors:
            if name not in gone:
                owner = owners[name]
                received = meter.to_owner(name, totals)
                meter.run(name, lambda o=owner, t=received: o.receive_totals(t))
        cpu, sent = meter.take()
        run.aggregator_cpu_s.append(cpu.pop("aggregator", 0.0))
        for name in proposal.owners:
            if name in cpu or name in sent:
                run.owner_cpu_s.setdefault(name, []).append(cpu.get(name, 0.0))
                run.owner_bytes.setdefault(name, []).append(sent.get(name, 0))
    run.results = {
        name: owner.result() for name, owner in owners.items() if name not in gone and owner.done
    }
    run.wall_s = time.perf_counter() - begin
    return run
