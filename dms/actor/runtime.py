"""What a role service gets from the node actor that routes behaviours to it: its key,
its thread, its children, its messages and its worker pool (DESIGN decision 14).

The node actor (:class:`dms.node.node.NodeActor`) is composed of role services
(capabilities, peering, provider, bidding, requester, mining owner,
collaboration). Each is built with what it needs: the node's runtime
(:class:`NodeRuntime`), the stores and settings it uses, and the narrow
interface of any other role it calls. A role's behaviours are its methods
marked ``@behaviour``; the node routes them (:meth:`Actor.route`), so names,
capabilities and payloads are the role's own declarations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from dms.actor.actor import Actor, Request
from dms.actor.handle import Handle
from dms.actor.system import ActorRef, ActorSystem, Outcome
from dms.actor.timers import TimerHandle
from dms.security.identity import Identity


class Messenger(Protocol):
    """An actor's address, messages and timers, as the pieces it holds use them (a
    deployment's bid rounds and supervision, a node's roles): an :class:`Actor` is one."""

    @property
    def handle(self) -> Handle: ...

    def send(self, to: Handle, behaviour: str, payload: Any = None, **kw: Any) -> None: ...

    def invoke(
        self,
        to: Handle,
        behaviour: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        on_reply: Callable[[Outcome], None] | None = None,
    ) -> None: ...

    def publish(self, topic: str, behaviour: str, payload: Any = None, **kw: Any) -> bytes: ...

    def call_later(self, delay_s: float, fn: Callable[[], Any]) -> TimerHandle: ...


class NodeRuntime(Messenger, Protocol):
    """The node actor's facilities a role may use; calls run in the node's thread."""

    @property
    def system(self) -> ActorSystem: ...

    @property
    def identity(self) -> Identity: ...

    @property
    def ref(self) -> ActorRef: ...

    def spawn(
        self, cls: type[Actor], *args: Any, inbox: str | None = None, **kw: Any
    ) -> ActorRef: ...

    def subscribe(self, topic: str) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...

    def in_background(
        self,
        request: Request,
        work: Callable[[], Any],
        then: Callable[[Any], Any] | None = None,
    ) -> None: ...
