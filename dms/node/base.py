"""What the node actor's behaviour mixins share: its services and a worker pool."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dms.actor import Actor, ActorContext, ErrorCode, Request
from dms.errors import DmsError
from dms.network.host import NetworkError
from dms.node.services import NodeServices


class NodeBase(Actor):
    def __init__(self, context: ActorContext, services: NodeServices | None = None) -> None:
        super().__init__(context)
        self.services = services or NodeServices()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dms-node-work")

    def shutdown_pool(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def in_background(
        self,
        request: Request,
        work: Callable[[], Any],
        then: Callable[[Any], Any] | None = None,
    ) -> None:
        """Run slow ``work`` (network waits, benchmarks) off the mailbox and answer when it
        is done; ``then`` runs back in the actor with the result, before the reply (what
        it returns, if not None, is the reply instead)."""
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
                    self.call_later(0.0, lambda: finish(result))

        self._pool.submit(work).add_done_callback(done)

    def resource_summary(self) -> dict[str, Any]:
        """Figures the heartbeat carries; the provider mixin fills them in."""
        return {}

    def announce(self) -> None:
        """Tell peers about a change now; the peering mixin sends a heartbeat."""
