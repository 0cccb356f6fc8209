"""What every executor shares: its error type and the log callback it writes to."""

from __future__ import annotations

from collections.abc import Callable

from dms.errors import DmsError

Log = Callable[[str], None]


class ExecutorError(DmsError):
    """Bad executor parameters, or the workload failed."""
