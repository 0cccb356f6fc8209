"""The node's durable state (SQLAlchemy engine, sessions, schema migrations) and its chunks."""

from dms.store.chunks import CHUNK_BYTES, ChunkError, ChunkStore, QuotaExceeded
from dms.store.db import Database, StoreError, open_database
from dms.store.migrations import LATEST_VERSION, MIGRATIONS, Migration
from dms.store.models import Base, Event, Setting

__all__ = [
    "CHUNK_BYTES",
    "LATEST_VERSION",
    "MIGRATIONS",
    "Base",
    "ChunkError",
    "ChunkStore",
    "Database",
    "Event",
    "Migration",
    "QuotaExceeded",
    "Setting",
    "StoreError",
    "open_database",
]
