"""What every executor shares: its error type, the log callback it writes to, and
the registry it puts itself in.

An executor registers itself (``@register_executor`` on its class, in its own
module); ``dms.jobs.installed`` lists the modules that hold the executors this
dms ships. No generic layer (the allocation actor, the bidder, the requester)
names a concrete executor: they look one up by its ``kind``
(``dms.jobs.executors.executor_for``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from dms.errors import DmsError
from dms.resources import Resources

Log = Callable[[str], None]


class Executor(Protocol):
    kind: str

    def check(self, params: dict[str, Any], resources: Resources | None = None) -> None:
        """Raise ``ExecutorError`` if ``params`` cannot run (within ``resources``)."""

    def run(self, params: dict[str, Any], stop: threading.Event, log: Log) -> Any:
        """Run to completion (or until ``stop``), returning a result that msgpack can carry."""


# Every executor this process knows, by kind: filled by the executors themselves.
EXECUTORS: dict[str, Executor] = {}
E = TypeVar("E")


def register_executor(cls: type[E]) -> type[E]:
    """Class decorator: one instance of ``cls`` runs every allocation of its ``kind``."""
    kind = cls.kind  # type: ignore[attr-defined]
    held = EXECUTORS.get(kind)
    if held is not None and type(held).__qualname__ != cls.__qualname__:
        raise ValueError(f"two executors of kind {kind!r}: {type(held).__name__}, {cls.__name__}")
    EXECUTORS[kind] = cls()
    return cls


class ExecutorError(DmsError):
    """Bad executor parameters, or the workload failed.

    ``field``: where in the allocation the fault is, when it is in its spec
    (``executor``, ``params.seconds``, ``resources.ram``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
