"""What every executor shares: its error type and the log callback it writes to."""

from __future__ import annotations

from collections.abc import Callable

from dms.errors import DmsError

Log = Callable[[str], None]


class ExecutorError(DmsError):
    """Bad executor parameters, or the workload failed.

    ``field``: where in the allocation the fault is, when it is in its spec
    (``executor``, ``params.seconds``, ``resources.ram``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
