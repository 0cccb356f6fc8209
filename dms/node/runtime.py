"""What each of the node's roles gets from the node actor: its key, its thread, its
children, its messages and its worker pool (DESIGN decision 14).

The node actor (:class:`dms.node.node.NodeActor`) is composed of role services
(capabilities, peering, provider, requester, mining owner, collaboration). Each
is built with what it needs: the node's runtime (:class:`NodeRuntime`, below),
the stores and settings it uses, and the narrow interface of any other role it
calls. A role's behaviours are its methods marked ``@behaviour``; the node
routes them (``Actor.route``), so names, capabilities and payloads are the
role's own declarations.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from dms.actor import Actor, ActorRef, ActorSystem, ErrorCode, Handle, Outcome, Request
from dms.actor.timers import TimerHandle
from dms.errors import DmsError
from dms.network.host import NetworkError
from dms.security.identity import Identity


class NodeRuntime(Protocol):
    """The node actor's facilities a role may use; calls run in the node's thread."""

    @property
    def system(self) -> ActorSystem: ...

    @property
    def identity(self) -> Identity: ...

    @property
    def ref(self) -> ActorRef: ...

    @property
    def handle(self) -> Handle: ...

    def send(self, to: Handle, behaviour: str, payload: Any = None, **kw: Any) -> None: ...

    def call_later(self, delay_s: float, fn: Callable[[], Any]) -> TimerHandle: ...

    def spawn(
        self, cls: type[Actor], *args: Any, inbox: str | None = None, **kw: Any
    ) -> ActorRef: ...

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

    def subscribe(self, topic: str) -> None: ...

    def in_background(
        self,
        request: Request,
        work: Callable[[], Any],
        then: Callable[[Any], Any] | None = None,
    ) -> None: ...


class WorkerPool:
    """Slow work (network waits, benchmarks, reading data) off the node's mailbox; the
    answer goes out when it is done, so the mailbox never stalls."""

    def __init__(self, call_later: Callable[[float, Callable[[], Any]], Any]) -> None:
        self._call_later = call_later
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dms-node-work")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run(
        self,
        request: Request,
        work: Callable[[], Any],
        then: Callable[[Any], Any] | None = None,
    ) -> None:
        """Run ``work`` and answer ``request`` with its result; ``then`` runs back in the
        actor with the result, before the reply (what it returns, if not None, is the
        reply instead)."""
        responder = request.defer()

        def finish(result: Any) -> None:
            try:
                answer = then(result) if then is not None else None
            except DmsError as err:
                responder.fail(err.code, err.message)
                return
            responder.ok(result if answer is None else answer)

        def done(future: Future[Any]) -> None:
            try:
                result = future.result()
            except NetworkError as err:
                responder.fail(ErrorCode.UNREACHABLE, str(err))
            except DmsError as err:
                responder.fail(err.code, err.message)
            except Exception as exc:
                responder.fail(ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")
            else:
                if then is None:
                    responder.ok(result)
                else:
                    self._call_later(0.0, lambda: finish(result))

        self._pool.submit(work).add_done_callback(done)
