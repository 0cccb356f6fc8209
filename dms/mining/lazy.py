"""A package's public names loaded on first use (PEP 562).

``dms.mining`` and ``dms.mining.collab`` name classes whose modules import NumPy or
TenSEAL; a process that only checks a job or relays messages should not pay for them.
``lazy_names`` gives such a package its module ``__getattr__`` and ``__dir__``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_names(
    package: str, where: dict[str, str], public: list[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: each name of ``where`` is
    imported from the module it maps to when first asked for, then kept in the
    package's namespace (later look-ups do not come here)."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:  # a submodule not yet imported, or a mistake: import decides
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *public})

    return __getattr__, __dir__
