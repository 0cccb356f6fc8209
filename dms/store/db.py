"""Opening the node's database: engine, sessions, and the schema at the latest version.

SQLite (the default, ``DMS_HOME/dms.db``) runs in WAL mode with a busy
timeout, and every transaction starts with ``BEGIN IMMEDIATE``: writers queue
for the lock up front instead of failing midway, which is what lets several
threads and processes share one file safely. Within one process, threads also
queue on a lock before they begin: SQLite admits one writer at a time anyway,
and its busy handler sleeps in steps of milliseconds where a thread lock wakes
the next writer at once. Any other SQLAlchemy URL (for example PostgreSQL)
uses that database's own transactions.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, select
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dms.errors import DmsError
from dms.store.migrations import LATEST_VERSION, MIGRATIONS
from dms.store.models import Base, Event, SchemaVersion, Setting

SQLITE_BUSY_TIMEOUT_MS = 30_000


class StoreError(DmsError):
    """A database that cannot be opened or is from a newer dms."""


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Database:
    """An engine with the schema migrated to the latest version."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1] if "///" in url else ""
                if path and path != ":memory:":
                    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
                self.engine = _sqlite_engine(url)
            else:
                self.engine = create_engine(url, pool_pre_ping=True)
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
            self._writer = threading.RLock() if url.startswith("sqlite") else nullcontext()
            self.version = self._migrate()
        except ArgumentError as exc:
            raise StoreError(f"bad database URL {url!r}: {exc}") from None
        except (OperationalError, ModuleNotFoundError) as exc:
            raise StoreError(f"cannot open database {url!r}: {str(exc).splitlines()[0]}") from None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        with self._writer, self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction on a Core connection, for hot paths that skip the ORM."""
        with self._writer, self.engine.begin() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    def _migrate(self) -> int:
        with self.engine.begin() as conn:
            Base.metadata.create_all(conn, tables=[SchemaVersion.__table__])  # type: ignore[list-item]
            row = conn.execute(select(SchemaVersion.version).where(SchemaVersion.id == 1)).first()
            current = row[0] if row else 0
            if current > LATEST_VERSION:
                raise StoreError(
                    f"database schema version {current} is newer than this dms supports "
                    f"({LATEST_VERSION}); upgrade dms"
                )
            for migration in MIGRATIONS:
                if migration.version > current:
                    migration.apply(conn)
                    current = migration.version
            if row is None:
                conn.execute(SchemaVersion.__table__.insert().values(id=1, version=current))  # type: ignore[attr-defined]
            else:
                conn.execute(
                    SchemaVersion.__table__.update()  # type: ignore[attr-defined]
                    .where(SchemaVersion.id == 1)
                    .values(version=current)
                )
        return current

    # ---- small helpers every layer uses ------------------------------------------

    def get_setting(self, key: str, default: Any = None) -> Any:
        with self.session() as s:
            row = s.get(Setting, key)
            return default if row is None else row.value

    def put_setting(self, key: str, value: Any) -> None:
        with self.session() as s:
            s.merge(Setting(key=key, value=value))

    def record(self, kind: str, **data: Any) -> None:
        with self.session() as s:
            s.add(Event(kind=kind, data=data or None))

    def events(self, kind: str | None = None, limit: int = 100) -> list[Event]:
        with self.session() as s:
            query = select(Event).order_by(Event.id.desc()).limit(limit)
            if kind is not None:
                query = query.where(Event.kind == kind)
            return list(s.scalars(query))


def open_database(url: str) -> Database:
    try:
        return Database(url)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open database {url!r}: {str(exc).splitlines()[0]}") from None
