"""What a patch checks before it replaces py-libp2p's code: the source it was written
against, by its digest."""

from __future__ import annotations

import hashlib
import inspect
import textwrap
from typing import Any


def shipped_source(fn: Any, sha256: str) -> str | None:
    """``fn``'s source, dedented, when its sha256 is ``sha256``; None when it is another
    source or has none to read."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (AttributeError, OSError, TypeError):
        return None
    return source if hashlib.sha256(source.encode()).hexdigest() == sha256 else None


def all_shipped(*sources: tuple[Any, str]) -> bool:
    """Whether every ``(fn, sha256)`` pair's source is the one its patch was written
    against (``shipped_source``)."""
    return all(shipped_source(fn, sha256) is not None for fn, sha256 in sources)
