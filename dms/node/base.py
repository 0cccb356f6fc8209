"""What the node actor's behaviour mixins share: its services, a worker pool, and the
state one role fills in and others read, declared here (DESIGN decision 14: a role
reads another only through a declared interface, never by ``getattr``):

- ``courier`` (chunks in and out; the node makes it, allocations and mining use it);
- ``_orchestration`` and ``_deployments`` (the requester role's; the mining and
  collaboration roles place their sessions through them, ``_orch()``);
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dms.actor import Actor, ActorContext, ActorRef, ErrorCode, Refusal, Request
from dms.network.transfer import Courier
from dms.node.runtime import WorkerPool
from dms.node.services import NodeServices
from dms.orchestrator.base import Orchestration


class NodeBase(Actor):
    courier: Courier | None = None  # the node's courier (dms.node.chunks)
    _orchestration: Orchestration | None = None  # set by start_deploying
    _deployments: dict[str, ActorRef]  # the requester's deployment children, by id

    def __init__(self, context: ActorContext, services: NodeServices | None = None) -> None:
        super().__init__(context)
        self.services = services or NodeServices()
        self._deployments = {}
        self._pool = WorkerPool(self.call_later)

    def shutdown_pool(self) -> None:
        self._pool.shutdown()

    def in_background(
        self,
        request: Request,
        work: Callable[[], Any],
        then: Callable[[Any], Any] | None = None,
    ) -> None:
        """Run slow ``work`` off the mailbox and answer when it is done
        (:meth:`WorkerPool.run`)."""
        self._pool.run(request, work, then)

    def _orch(self) -> Orchestration:
        """The requester's orchestration (its store, peers table, settings)."""
        if self._orchestration is None:
            raise Refusal(ErrorCode.UNKNOWN_BEHAVIOUR, "this node keeps no deployment store")
        return self._orchestration
