"""Protocol states as typed state machines: an enum, a transition table, checked moves.

Each protocol state (a deployment, its slots, an allocation, a mining session's
phase, a lease, a peer) is a ``StrEnum`` with a :class:`Machine`: the table of
the moves allowed out of each state. The terminal states are derived here, once,
for every machine: the states with no move out (``Machine.terminal``); callers
import the machine, never a hand-written tuple of state names.

A move the table does not allow is a bug in the code that made it, and raises
:class:`TransitionError`. An attribute declared as ``Tracked(MACHINE)`` checks
every assignment: ``self.phase = SessionPhase.MINING`` raises if the current
phase may not move there (the first assignment sets the initial state; assigning
the current state again is no move).

Because the enums are ``StrEnum``, their members are the strings stored and sent
(``"completed" in DEPLOYMENT.terminal`` holds): rows and replies do not change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, Generic, TypeVar, overload

S = TypeVar("S", bound=StrEnum)


class TransitionError(RuntimeError):
    """A move the transition table does not allow: a bug in the code that made it."""


class Machine(Generic[S]):
    """The states of one protocol and the moves allowed between them."""

    def __init__(self, name: str, states: type[S], moves: Mapping[S, Iterable[S]]) -> None:
        missing = set(states) - set(moves)
        if missing:
            raise ValueError(f"{name}: no moves given for {sorted(missing)}")
        self.name = name
        self.states = states
        self.moves: dict[S, frozenset[S]] = {s: frozenset(moves[s]) for s in states}
        # The TERMINAL states, defined here once for every machine: those with no move out.
        self.terminal: frozenset[S] = frozenset(s for s, out in self.moves.items() if not out)
        self.live: frozenset[S] = frozenset(states) - self.terminal

    def allows(self, frm: S | str, to: S | str) -> bool:
        return self.states(to) in self.moves[self.states(frm)]

    def check(self, frm: S | str, to: S | str, who: str = "") -> S:
        """``to`` as a member, if ``frm -> to`` is allowed; else :class:`TransitionError`."""
        target = self.states(to)
        if target not in self.moves[self.states(frm)]:
            of = f" {who}" if who else ""
            raise TransitionError(f"{self.name}{of}: {frm} -> {target} is not allowed")
        return target

    def ended(self, state: S | str | None) -> bool:
        """Whether ``state`` (a member, or its word as stored or sent) is terminal."""
        return state in self.terminal


class Tracked(Generic[S]):
    """An instance attribute holding a state of ``machine``; every assignment is a
    checked move (the first one sets the initial state)."""

    def __init__(self, machine: Machine[S]) -> None:
        self.machine = machine
        self.slot = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}_state"

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> Tracked[S]: ...
    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> S: ...
    def __get__(self, obj: object | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.slot]
        except KeyError:
            raise AttributeError(f"{type(obj).__name__} has no state yet") from None

    def __set__(self, obj: object, value: S | str) -> None:
        new = self.machine.states(value)
        old = obj.__dict__.get(self.slot)
        if old is not None and old != new:
            self.machine.check(old, new, type(obj).__name__)
        obj.__dict__[self.slot] = new
