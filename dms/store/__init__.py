"""The node's durable state: SQLAlchemy engine, sessions and schema migrations."""

from dms.store.db import Database, StoreError, open_database
from dms.store.migrations import LATEST_VERSION, MIGRATIONS, Migration
from dms.store.models import Base, Event, Setting

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "Base",
    "Database",
    "Event",
    "Migration",
    "Setting",
    "StoreError",
    "open_database",
]
