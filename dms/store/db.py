"""Opening the node's database: engine, sessions, and the schema at the latest version.

SQLite (the default, ``DMS_HOME/dms.db``) runs in WAL mode with a busy
timeout, and every transaction starts with ``BEGIN IMMEDIATE``: writers queue
for the lock up front instead of failing midway, which is what lets several
threads and processes share one file safely. Within one process, threads also
queue on a lock before they begin: SQLite admits one writer at a time anyway,
and its busy handler sleeps in steps of milliseconds where a thread lock wakes
the next writer at once. Any other SQLAlchemy URL (for example PostgreSQL)
uses that database's own transactions (``postgresql://`` means psycopg 3, the
driver dms installs); :meth:`Database.transaction` can make writers of chosen
tables queue there too, and :meth:`Database.snapshot` reads several statements
from one snapshot.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url, select, text
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dms.files import create_private, sqlite_path
from dms.store.errors import StoreBusy, StoreError
from dms.store.migrations import migrate
from dms.store.models import Event, Setting
from dms.store.sql import run_driver

__all__ = ["Database", "StoreBusy", "StoreError", "open_database"]

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _driver_url(url: str) -> str:
    """``url``, with a bare ``postgresql://`` naming psycopg 3.

    SQLAlchemy's default PostgreSQL driver is psycopg2, which dms does not
    install; psycopg 3 is in its dependencies.
    """
    if not url.startswith("postgresql://"):
        return url
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        _set_wal(cur)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # On the driver's connection: through Core, this one statement cost as much as
        # the rest of a ledger transaction (dms.store.sql).
        run_driver(conn, "BEGIN IMMEDIATE")

    return engine


@contextmanager
def _busy_timeout(conn: Connection, wait_s: float | None) -> Iterator[None]:
    """SQLite's busy timeout of ``conn`` is ``wait_s`` for what runs inside (set on the
    driver's connection, outside a transaction: through SQLAlchemy it would begin one)."""
    if wait_s is None:
        yield
        return
    raw: Any = conn.connection.dbapi_connection
    raw.execute(f"PRAGMA busy_timeout={max(0, int(wait_s * 1000))}")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a broken connection: dropped, opened anew
            raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


def _set_wal(cur: Any, attempts: int = 200) -> None:
    """WAL mode (kept in the file: once is enough). Switching needs the file to
    itself, and SQLite answers "database is locked" at once, without waiting on the
    busy timeout, when another connection is opening a new file at that moment: so
    wait and ask again (up to ~10 s)."""
    for attempt in range(attempts):
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


class Database:
    """An engine with the schema migrated to the latest version."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            path = sqlite_path(url)
            if path is not None:
                if path.startswith("file:"):
                    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
                elif path and path != ":memory:":
                    create_private(Path(path).expanduser())  # its -wal and -shm get its mode
                self.engine = _sqlite_engine(url)
            else:
                self.engine = create_engine(_driver_url(url), pool_pre_ping=True)
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
            self._writer = threading.RLock() if url.startswith("sqlite") else nullcontext()
            # SQLite: every transaction of this process on one connection, kept open (False:
            # to open at the next): taking one from the pool and giving it back cost more
            # than a ledger transition's SQL, and each connection's page cache was stale
            # whenever the pool handed out the other (specs/orchestration.md, sixth pass).
            self._kept_conn: Connection | bool | None = False if path is not None else None
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
    def transaction(
        self, exclusive: tuple[str, ...] = (), wait_s: float | None = None
    ) -> Iterator[Connection]:
        """One transaction on a Core connection, for hot paths that skip the ORM.

        ``wait_s`` (SQLite): wait no longer than this for this process's other
        writers, and for another process's lock (SQLite's busy timeout, 30 s
        otherwise), else raise :class:`StoreBusy` or SQLite's "database is locked":
        for a read that must not hold up what waits on it (a heartbeat).

        The writers of the ``exclusive`` tables queue behind it from its start
        to its end, so what it reads stays true until it commits. SQLite's
        ``BEGIN IMMEDIATE`` does that for every table already; on PostgreSQL
        each table is locked ``SHARE ROW EXCLUSIVE`` (plain reads go on, other
        writers and other exclusive transactions wait), first thing, so every
        statement after it sees what the previous holder committed.
        """
        if self._kept_conn is not None:  # SQLite: one connection of this process's writers
            with self._writer_within(wait_s):
                conn = self._kept()
                if conn is None:  # nested in a transaction of this thread: one of its own
                    with self.engine.begin() as own:
                        yield own
                    return
                try:
                    with _busy_timeout(conn, wait_s), conn.begin():
                        yield conn
                except BaseException:
                    self._drop_kept(conn)  # whatever state it is in: a fresh one next time
                    raise
            return
        with self._writer, self.engine.begin() as conn:
            if exclusive and conn.dialect.name == "postgresql":
                quote = conn.dialect.identifier_preparer.quote
                names = ", ".join(quote(name) for name in exclusive)
                conn.execute(text(f"LOCK TABLE {names} IN SHARE ROW EXCLUSIVE MODE"))
            yield conn

    @contextmanager
    def _writer_within(self, wait_s: float | None) -> Iterator[None]:
        """This process's writer lock (SQLite), waited for ``wait_s`` at most."""
        lock = self._writer
        if wait_s is None or isinstance(lock, nullcontext):
            with lock:
                yield
            return
        if not lock.acquire(timeout=max(0.0, wait_s)):
            raise StoreBusy(f"another transaction of this process held the store for {wait_s:g} s")
        try:
            yield
        finally:
            lock.release()

    def _kept(self) -> Connection | None:
        """The connection transactions run on (SQLite; under the writer lock), opened
        again if the last one was dropped; None while it is in a transaction."""
        conn = self._kept_conn
        if conn is False:
            conn = self._kept_conn = self.engine.connect()
        assert isinstance(conn, Connection)
        return None if conn.in_transaction() else conn

    def _drop_kept(self, conn: Connection) -> None:
        with contextlib.suppress(Exception):
            conn.close()
        self._kept_conn = False

    @contextmanager
    def snapshot(self, wait_s: float | None = None) -> Iterator[Connection]:
        """A read-only transaction whose statements all see one moment.

        PostgreSQL's default (read committed) takes a new snapshot for every
        statement, so two reads could straddle another transaction's commit;
        repeatable read keeps the first one. SQLite's transactions see one
        moment already. The moment is fixed on entry (on PostgreSQL a first
        statement runs at once), so a clock read inside the block is no earlier
        than any commit its reads see.
        """
        if self.engine.dialect.name != "postgresql":
            with self.transaction(wait_s=wait_s) as conn:
                yield conn
            return
        with self.engine.connect() as base:
            conn = base.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            with conn.begin():
                conn.exec_driver_sql("SELECT 1")
                yield conn

    def close(self) -> None:
        with self._writer:
            if isinstance(self._kept_conn, Connection):
                self._drop_kept(self._kept_conn)
            self._kept_conn = None
        self.engine.dispose()

    def _migrate(self) -> int:
        # One transaction for the whole upgrade (BEGIN IMMEDIATE on SQLite): all or nothing.
        try:
            with self.engine.begin() as conn:
                return migrate(conn)
        except BaseException:
            self.engine.dispose()
            raise

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
