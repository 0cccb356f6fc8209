"""Executors: what an allocation runs. Each validates its own parameters up front.

``compute`` is the built-in test workload: sleep or keep one core busy for a
bounded time, then return a small result; ``fail`` makes it fail with that
message (for failure handling tests). ``mining`` (``dms.jobs.mining``) is the
worker side of encrypted mining; it is *interactive*: besides ``run`` it opens
a session that the requester drives (``/dms/allocation/session``). ``collab``
(``dms.jobs.collab``) is the aggregator of a collaborative k-means, interactive too.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dms.jobs.base import ExecutorError, Log
from dms.jobs.collab import CollabExecutor
from dms.jobs.mining import MiningExecutor
from dms.resources import Resources

__all__ = ["EXECUTORS", "Executor", "ExecutorError", "Log", "check_allocation", "executor_for"]


class Executor(Protocol):
    kind: str

    def check(self, params: dict[str, Any], resources: Resources | None = None) -> None:
        """Raise ``ExecutorError`` if ``params`` cannot run (within ``resources``)."""

    def run(self, params: dict[str, Any], stop: threading.Event, log: Log) -> Any:
        """Run to completion (or until ``stop``), returning a result that msgpack can carry."""


class ComputeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["sleep", "cpu"] = "sleep"
    seconds: float = Field(default=0.0, ge=0, le=3600)
    fail: str | None = Field(default=None, max_length=512)


class ComputeExecutor:
    kind = "compute"

    def _params(self, params: dict[str, Any]) -> ComputeParams:
        try:
            return ComputeParams.model_validate(params)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ExecutorError(
                f"compute params: {where}: {err['msg']}", field=f"params.{where}"
            ) from None

    def check(self, params: dict[str, Any], resources: Resources | None = None) -> None:
        self._params(params)

    def run(self, params: dict[str, Any], stop: threading.Event, log: Log) -> Any:
        p = self._params(params)
        log(f"compute: {p.mode} for {p.seconds:g} s")
        started = time.monotonic()
        rounds = 0
        if p.mode == "sleep":
            stop.wait(p.seconds)
        else:
            digest = b"dms"
            while time.monotonic() - started < p.seconds and not stop.is_set():
                for _ in range(1000):
                    digest = hashlib.sha256(digest).digest()
                rounds += 1
        if stop.is_set():
            raise ExecutorError("stopped")
        if p.fail:
            raise ExecutorError(p.fail)
        elapsed = round(time.monotonic() - started, 3)
        log(f"compute: done in {elapsed:g} s")
        return {"mode": p.mode, "seconds": elapsed, "rounds": rounds}


EXECUTORS: dict[str, Executor] = {
    ComputeExecutor.kind: ComputeExecutor(),
    MiningExecutor.kind: MiningExecutor(),
    CollabExecutor.kind: CollabExecutor(),
}


def executor_for(kind: str) -> Executor:
    try:
        return EXECUTORS[kind]
    except KeyError:
        known = ", ".join(sorted(EXECUTORS))
        raise ExecutorError(f"no executor {kind!r} on this node (has: {known})") from None


def check_allocation(kind: str, params: dict[str, Any], resources: Resources | None) -> None:
    """Before anything is asked of a peer (``dms job validate``, ``dms deploy``, the
    requester's ``/dms/node/deployment/new``): the executor exists here and accepts
    ``params`` within ``resources`` (a bidder runs the same check). An
    ``ExecutorError`` names the allocation's field at fault (``executor``,
    ``params.<name>``, ``resources.<kind>``)."""
    executor = EXECUTORS.get(kind)
    if executor is None:
        known = ", ".join(sorted(EXECUTORS))
        raise ExecutorError(f"unknown executor {kind!r} (known: {known})", field="executor")
    try:
        executor.check(params, resources)
    except ExecutorError as exc:
        raise ExecutorError(exc.message, field=exc.field or "params") from None
    except Exception as exc:  # a check that breaks on odd params still refuses, with why
        raise ExecutorError(f"{kind} params: {type(exc).__name__}: {exc}", "params") from None
