"""The node actor's worker pool: slow work off the mailbox (``NodeRuntime.in_background``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from dms.actor import ErrorCode, Request
from dms.errors import DmsError
from dms.network.host import NetworkError
from dms.store import STORE_ERRORS, STORE_REFUSED

log = logging.getLogger("dms.node")


class WorkerPool:
    """Slow work (network waits, benchmarks, reading data) off the node's mailbox; the
    answer goes out when it is done, so the mailbox never stalls."""

    def __init__(
        self,
        call_later: Callable[[float, Callable[[], Any]], Any],
        store_bound: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        """``store_bound()``: what each piece of work runs within (the node's
        ``Database.waiting_at_most(store_wait_s)``): a store another process holds locked
        refuses it ``store_refused`` in that bound, not after SQLite's 30 s."""
        self._call_later = call_later
        self._store_bound = store_bound
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
            # Any error of ``then`` is answered: raised out of here it was only logged
            # (the actor outlives a failed call), and the asker waited out its timeout.
            try:
                answer = then(result) if then is not None else None
            except DmsError as err:
                responder.fail(err.code, err.message)
                return
            except STORE_ERRORS as exc:  # the store refused (a read-only file, a full disk)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                responder.fail(STORE_REFUSED, f"this node's store refused: {reason}")
                return
            except Exception as exc:
                log.exception("%s: its answer raised", request.envelope.behaviour)
                responder.fail(ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}")
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

        def bounded() -> Any:
            with self._store_bound():
                return work()

        self._pool.submit(bounded).add_done_callback(done)
