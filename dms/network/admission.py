"""Whether a dial of a peer is to start, and the marks that say so to the dials inside it.

A dial of a peer neither preferred (a stake: ``DialSlots.preferred``) nor reached before
in this process (an address of it connected: :func:`remember`) takes one of the new
keys' budget (:func:`admit`, ``DialSlots.admit``), once a dial whichever way it goes:
direct (``dialing.dial_peer``), through a relay, or both (``Discovery._ensure_connected``,
inside :func:`admitted`). A dial this node refuses itself before any address
(:class:`NotDialed`, ``outbound_full``) is told to whoever the running task dials for
(:func:`refused_here`, ``ON_REFUSAL``: the auto-connector's cycle,
``libp2p_patches.autoconnect``). Both marks are context variables that hold a
:class:`Scoped` value, emptied when their block ends: a connection a dial makes runs
its tasks in the dial's context, for as long as it lives. See specs/security.md,
"Addresses a peer advertises".
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from dms.network.dialslots import slots_for

# Peers whose address that last connected is remembered (the most recent kept).
WORKED_MEMO = 4096

T = TypeVar("T")


class NotDialed(SwarmException):
    """A dial this node refused itself before trying any address (``DialSlots.admit``):
    the peer failed nothing (no negative cache, nothing forgotten)."""


class Scoped(Generic[T]):
    """A context variable's value for one block and the tasks started in it, and for
    none of them once the block has ended (:func:`scoped`). A trio task inherits the
    context of the task that starts it: a connection a dial makes starts its tasks
    (its stream handlers', for as long as it lives) from the dial's, and a value set
    plainly stayed theirs after the block."""

    def __init__(self, value: T) -> None:
        self.value: T | None = value


@contextlib.contextmanager
def scoped(var: ContextVar[Scoped[T] | None], value: T) -> Iterator[None]:
    """``var`` is ``value`` inside (:func:`current`), and to nobody once it ends."""
    holder = Scoped(value)
    token = var.set(holder)
    try:
        yield
    finally:
        holder.value = None
        var.reset(token)


def current(var: ContextVar[Scoped[T] | None]) -> T | None:
    """``var``'s value, if the block that set it is still running."""
    holder = var.get()
    return None if holder is None else holder.value


# The peer whose dial the running task was admitted for (:func:`admitted`): its direct
# dial, started inside, is not counted a second time.
ADMITTED: ContextVar[Scoped[ID] | None] = ContextVar("dms_dial_admitted", default=None)


# Told of each dial the running task asked for that this node refused itself, before
# any address (``libp2p_patches.autoconnect`` sets it for the auto-connector's cycle).
ON_REFUSAL: ContextVar[Scoped[Callable[[ID], None]] | None] = ContextVar(
    "dms_dial_refused", default=None
)


def refused_here(peer_id: ID) -> None:
    """A dial of ``peer_id`` is refused by a budget of this node's own (``NotDialed``,
    ``outbound_full``): no failure of the peer's. Whoever the running task dials for is
    told (``ON_REFUSAL``), while it does."""
    seen = current(ON_REFUSAL)
    if seen is not None:
        seen(peer_id)


def admit(swarm: Any, peer_id: ID) -> bool:
    """A dial of ``peer_id`` is to start: True if the peer is preferred (an address of it
    connected in this process, directly or through a relay, or the node has a stake in
    it), which is never counted. Else it takes one of the new keys' budget
    (``DialSlots.admit``), once a dial whichever way it goes (direct, through a relay,
    both: :func:`admitted`); past it, ``NotDialed`` with the reason (counted)."""
    slots = slots_for(swarm)
    if peer_id in worked_for(swarm) or slots.preferred(peer_id):
        return True
    if current(ADMITTED) != peer_id:
        refused = slots.admit()
        if refused is not None:  # this node's own budget: nothing of the peer's failed
            refused_here(peer_id)
            raise NotDialed(f"not dialing {peer_id}: {refused}")
    return False


@contextlib.contextmanager
def admitted(peer_id: ID) -> Iterator[None]:
    """Inside, the dial of ``peer_id`` is admitted (:func:`admit`, asked before): a dial
    of it the swarm makes there (the direct half of a dial that may go through a relay)
    takes nothing more of the budget. Tasks started inside inherit it while it lasts,
    not after (:class:`Scoped`: a connection made inside, to the peer or to a relay,
    would have had every dial of the peer its tasks made uncounted)."""
    with scoped(ADMITTED, peer_id):
        yield


# swarm -> (peer -> the address of this node's last dial of it that connected)
_worked: weakref.WeakKeyDictionary[Any, OrderedDict[ID, Multiaddr]] = weakref.WeakKeyDictionary()


def worked_for(swarm: Any) -> OrderedDict[ID, Multiaddr]:
    memo = _worked.get(swarm)
    if memo is None:
        memo = _worked[swarm] = OrderedDict()
    return memo


def remember(swarm: Any, peer_id: ID, addr: Multiaddr) -> None:
    """``addr`` of ``peer_id`` connected (a direct address, or a relayed one): the peer
    is reached, preferred from now on (:func:`admit`, ``DialSlots``)."""
    memo = worked_for(swarm)
    memo[peer_id] = addr
    memo.move_to_end(peer_id)
    while len(memo) > WORKED_MEMO:
        memo.popitem(last=False)
