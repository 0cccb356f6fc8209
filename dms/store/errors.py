"""The store's errors, apart from the chunk store's own."""

from __future__ import annotations

from dms.errors import DmsError


class StoreError(DmsError):
    """A database that cannot be opened or is from a newer dms."""


class StoreBusy(StoreError):
    """A transaction that would have waited longer than its caller may (``wait_s``)."""
