"""The node's durable state (SQLAlchemy engine, sessions, schema migrations) and its chunks."""

from dms.store.chunks import CHUNK_BYTES, ChunkError, ChunkStore, QuotaExceeded
from dms.store.db import Database, open_database
from dms.store.errors import STORE_ERRORS, STORE_REFUSED, STORE_RETRY, StoreBusy, StoreError
from dms.store.migrations import LATEST_VERSION
from dms.store.models import Base, Event, Setting

__all__ = [
    "CHUNK_BYTES",
    "LATEST_VERSION",
    "STORE_ERRORS",
    "STORE_REFUSED",
    "STORE_RETRY",
    "Base",
    "ChunkError",
    "ChunkStore",
    "Database",
    "Event",
    "QuotaExceeded",
    "Setting",
    "StoreBusy",
    "StoreError",
    "open_database",
]
