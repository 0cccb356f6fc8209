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
from typing import Any, ClassVar, Generic, Protocol, TypeVar

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
    (``executor``, ``params.seconds``, ``resources.ram``); ``key``: the key there is the
    fault (unknown), said at its own line, not its value's (``LinedYaml.line``)."""

    def __init__(self, message: str, field: str | None = None, key: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.key = key


class DrivenSession(Protocol):
    """What an interactive executor's session shows its ``run``: set ``finished`` when
    the remote party that drives it ends it; ``summary`` is the allocation's result."""

    finished: threading.Event

    def summary(self) -> dict[str, Any]: ...


S = TypeVar("S", bound=DrivenSession)
MIB = 1024 * 1024


class InteractiveExecutor(Generic[S]):
    """An executor whose work a remote party drives through a session (the mining
    worker, the collab aggregator): ``check`` bounds the memory its params need by the
    lease, ``run`` waits for the session to finish (or ``stop``). A subclass says how
    to read its params and make its session, and what it is (``role``, in messages)."""

    kind: ClassVar[str]
    role: ClassVar[str]

    def params(self, params: dict[str, Any]) -> Any:
        """The parsed params (with ``estimated_bytes()``), or ``ExecutorError``."""
        raise NotImplementedError

    def session(self, params: dict[str, Any], log: Log) -> S:
        raise NotImplementedError

    def failure(self, session: S) -> str | None:
        """Why the session failed, if it knows (its ``run`` then fails with it)."""
        return None

    def check(self, params: dict[str, Any], resources: Resources | None = None) -> None:
        need = self.params(params).estimated_bytes()
        if resources is not None and resources.ram_mib and need > resources.ram_mib * MIB:
            raise ExecutorError(
                f"this {self.role} needs about {need / MIB:.0f} MiB of memory; "
                f"the lease holds {resources.ram_mib} MiB",
                field="resources.ram",
            )

    def run(
        self,
        params: dict[str, Any],
        stop: threading.Event,
        log: Log,
        session: S | None = None,
    ) -> Any:
        """Wait while the remote party drives the session; the result is its summary."""
        if session is None:
            raise ExecutorError(f"a {self.kind} allocation needs its session")
        while not session.finished.wait(0.2):
            if stop.is_set():
                raise ExecutorError(self.failure(session) or "stopped")
        failure = self.failure(session)
        if failure is not None:
            raise ExecutorError(failure)
        return session.summary()
