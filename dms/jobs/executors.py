"""Executors: what an allocation runs, looked up by kind. Each validates its own
parameters up front.

Each executor registers itself (``dms.jobs.base.register_executor``); importing
``dms.jobs.installed`` loads the ones this dms ships: ``compute`` (``dms.jobs.compute``,
the built-in test workload), ``mining`` (``dms.jobs.mining``, the worker side of
encrypted mining; *interactive*: besides ``run`` it opens a session that the
requester drives, ``/dms/allocation/session``) and ``collab`` (``dms.jobs.collab``,
the aggregator of a collaborative k-means, interactive too).
"""

from __future__ import annotations

from typing import Any

from dms.jobs import installed
from dms.jobs.base import EXECUTORS, Executor, ExecutorError, Log
from dms.resources import Resources

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorError",
    "Log",
    "check_allocation",
    "executor_for",
    "installed",
]


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
        raise ExecutorError(exc.message, field=exc.field or "params", key=exc.key) from None
    except Exception as exc:  # a check that breaks on odd params still refuses, with why
        raise ExecutorError(f"{kind} params: {type(exc).__name__}: {exc}", "params") from None
