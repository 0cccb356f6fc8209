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

A transaction may bound its wait for the store (``wait_s``, or every transaction of
a thread: :meth:`Database.waiting_at_most`, which the node's actor sets for all its
work): this process's other writers, then SQLite's busy timeout for its ``BEGIN
IMMEDIATE`` (PostgreSQL: ``SET LOCAL lock_timeout``), else :class:`StoreBusy`. Once
one bounded transaction found the store busy, those a thread's bound limits only try
(``BUSY_PROBE_S``) until one begins: a node whose file another process holds locked
refuses each request at once, not after the bound each.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, make_url, select, text
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dms.files import create_private, sqlite_path
from dms.store.errors import StoreBusy, StoreError
from dms.store.migrations import migrate
from dms.store.models import Event, Setting
from dms.store.sql import run_driver

__all__ = ["Database", "StoreBusy", "StoreError", "open_database"]

SQLITE_BUSY_TIMEOUT_MS = 30_000
_T = TypeVar("_T")
# A bounded transaction's wait for the file while the store was found busy and has not
# begun one since: a try, not a wait (this process's writer lock is waited for as long as
# its holder runs its statements: Database._writer_within).
BUSY_PROBE_S = 0.005
PG_LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout's SQLSTATE


def _least(a: float | None, b: float | None) -> float | None:
    """The smaller bound; None is no bound."""
    if a is None:
        return b
    return a if b is None else min(a, b)


def _busy_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the store's "wait longer" (SQLite's busy, PostgreSQL's
    lock_timeout), not a refusal."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(orig, sqlite3.OperationalError):
        code = getattr(orig, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == sqlite3.SQLITE_BUSY:
            return True
        return "database is locked" in str(orig)
    return getattr(orig, "sqlstate", None) == PG_LOCK_NOT_AVAILABLE


def _driver_url(url: str) -> str:
    """``url``, with a bare ``postgresql://`` naming psycopg 3.

    SQLAlchemy's default PostgreSQL driver is psycopg2, which dms does not
    install; psycopg 3 is in its dependencies.
    """
    if not url.startswith("postgresql://"):
        return url
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def _sqlite_engine(url: str, begin_wait: Any) -> Engine:
    """``begin_wait()``: how long the ``BEGIN IMMEDIATE`` under way may wait for the file's
    lock (None: the busy timeout), on the thread that begins it."""
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
        wait_s = begin_wait()
        if wait_s is None:
            run_driver(conn, "BEGIN IMMEDIATE")
            return
        # Only BEGIN IMMEDIATE waits for the file: in WAL mode the transaction it starts
        # holds the write lock, and reads never wait.
        run_driver(conn, f"PRAGMA busy_timeout={max(0, int(wait_s * 1000))}")
        try:
            run_driver(conn, "BEGIN IMMEDIATE")
        finally:
            with contextlib.suppress(Exception):  # a broken connection: dropped, opened anew
                run_driver(conn, f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")

    return engine


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


def _leaves_connection_unknown(exc: BaseException, conn: Connection) -> bool:
    """Whether a transaction that ended with ``exc`` may have left ``conn`` unfit for
    the next: a database or driver error (the store busy among them), an interrupt, or
    a transaction still open."""
    return (
        not isinstance(exc, Exception)
        or isinstance(exc, SQLAlchemyError | StoreError)
        or conn.invalidated
        or conn.in_transaction()
    )


class Database:
    """An engine with the schema migrated to the latest version."""

    def __init__(self, url: str) -> None:
        self.url = url
        # Per thread: ``bound`` (waiting_at_most), ``wait`` (the BEGIN under way may wait
        # this long), ``depth`` (transactions open), ``in_session`` (an ORM one open).
        self._local = threading.local()
        self._busy = False  # a bounded transaction found the store busy; none began since
        self._beginning = False  # the writer lock's holder is in its BEGIN (SQLite)
        try:
            path = sqlite_path(url)
            if path is not None:
                if path.startswith("file:"):
                    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
                elif path and path != ":memory:":
                    create_private(Path(path).expanduser())  # its -wal and -shm get its mode
                self.engine = _sqlite_engine(url, lambda: getattr(self._local, "wait", None))
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
    def waiting_at_most(self, wait_s: float | None) -> Iterator[None]:
        """Every transaction this thread runs inside waits for the store ``wait_s`` at most
        (and no longer than its own ``wait_s``), else raises :class:`StoreBusy`: the
        node's actor runs all its work so (``store_wait_s``), so a file another process
        holds locked never holds its mailbox up for SQLite's 30 s busy timeout."""
        before = getattr(self._local, "bound", None)
        self._local.bound = _least(before, wait_s)
        try:
            yield
        finally:
            self._local.bound = before

    @property
    def bounded(self) -> bool:
        """Whether this thread's transactions wait for the store a bounded time."""
        return getattr(self._local, "bound", None) is not None

    def _wait_for(self, wait_s: float | None) -> float | None:
        """How long a transaction asking ``wait_s`` may wait, on this thread, now."""
        bound = getattr(self._local, "bound", None)
        wait = _least(wait_s, bound)
        if bound is not None and self._busy:  # the node's mailbox: a try, not a wait
            wait = min(bound, BUSY_PROBE_S)
        return wait

    def _busy_now(self, wait_s: float, what: str) -> StoreBusy:
        self._busy = True
        return StoreBusy(f"the store is busy: {what} (waited {wait_s:g} s)")

    @contextmanager
    def _opened(self, session: bool = False) -> Iterator[None]:
        """Count this thread's open transactions (SQLite): one nested in another of the
        same thread on another connection would wait for it, which waits for it (the
        ORM's sessions use connections of the pool; transactions the kept one)."""
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth and (session or getattr(local, "in_session", False)):
            raise StoreError(
                "a store transaction nested in another of the same thread, one of them an "
                "ORM session: it would wait for the other, which waits for it"
            )
        local.depth = depth + 1
        local.in_session = session
        try:
            yield
        finally:
            local.depth = depth
            local.in_session = False

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        wait = self._wait_for(None)
        if self._kept_conn is None:  # PostgreSQL
            try:
                with self._sessions() as session, session.begin():
                    if wait is not None:
                        self._pg_lock_timeout(session.connection(), wait)
                    yield session
            except DBAPIError as exc:
                if wait is not None and _busy_error(exc):
                    raise self._busy_now(wait, _PG_LOCKED) from None
                raise
            return
        with (
            self._opened(session=True),
            self._writer_within(wait),
            self._sessions() as session,
            session.begin(),
        ):
            self._begin(session.connection, wait)  # begun now, within its wait
            yield session

    def _begin(self, begin: Callable[[], _T], wait: float | None) -> _T:
        """``begin()``: a ``BEGIN IMMEDIATE`` (SQLite, under the writer lock), waiting for
        the file's lock ``wait`` at most (None: the busy timeout)."""
        self._local.wait = wait
        self._beginning = True
        try:
            begun = begin()
        except OperationalError as exc:
            if wait is not None and _busy_error(exc):
                raise self._busy_now(wait, _LOCKED_ELSEWHERE) from None
            raise
        finally:
            self._beginning = False
            self._local.wait = None
        self._busy = False
        return begun

    @contextmanager
    def transaction(
        self, exclusive: tuple[str, ...] = (), wait_s: float | None = None
    ) -> Iterator[Connection]:
        """One transaction on a Core connection, for hot paths that skip the ORM.

        ``wait_s``: wait no longer than this for the store (and no longer than this
        thread's bound, :meth:`waiting_at_most`), else raise :class:`StoreBusy`. On
        SQLite: this process's other writers, then another process's lock (SQLite's
        busy timeout for the ``BEGIN IMMEDIATE``, 30 s otherwise); on PostgreSQL each
        lock the transaction waits for (``SET LOCAL lock_timeout``). For work that
        must not hold up what waits on it (a heartbeat, the node's mailbox).

        The writers of the ``exclusive`` tables queue behind it from its start
        to its end, so what it reads stays true until it commits. SQLite's
        ``BEGIN IMMEDIATE`` does that for every table already; on PostgreSQL
        each table is locked ``SHARE ROW EXCLUSIVE`` (plain reads go on, other
        writers and other exclusive transactions wait), first thing, so every
        statement after it sees what the previous holder committed.

        On SQLite a transaction nested in one of the same thread is a savepoint of it
        (before, a second connection that waited out the busy timeout for the first).
        """
        wait = self._wait_for(wait_s)
        if self._kept_conn is not None:  # SQLite: one connection of this process's writers
            with self._opened(), self._writer_within(wait):
                conn = self._kept()
                if conn.in_transaction():  # nested in a transaction of this thread
                    with conn.begin_nested():
                        yield conn
                    return
                try:
                    with self._begin(conn.begin, wait):
                        yield conn
                except BaseException as exc:
                    # An error of the caller's own (a refused commit of an unknown lease)
                    # was rolled back and leaves the connection as it was: kept, with its
                    # page cache. Anything else may leave it in any state: a fresh one.
                    if _leaves_connection_unknown(exc, conn):
                        self._drop_kept(conn)
                    raise
            return
        with self._writer, self.engine.begin() as conn:
            try:
                if wait is not None:
                    self._pg_lock_timeout(conn, wait)
                if exclusive and conn.dialect.name == "postgresql":
                    quote = conn.dialect.identifier_preparer.quote
                    names = ", ".join(quote(name) for name in exclusive)
                    conn.execute(text(f"LOCK TABLE {names} IN SHARE ROW EXCLUSIVE MODE"))
                if wait is not None:
                    self._busy = False
                yield conn
            except DBAPIError as exc:
                if wait is not None and _busy_error(exc):
                    raise self._busy_now(wait, _PG_LOCKED) from None
                raise

    @staticmethod
    def _pg_lock_timeout(conn: Connection, wait: float) -> None:
        """No lock of this transaction waits longer than ``wait`` (PostgreSQL; 0 would be
        no timeout at all)."""
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, int(wait * 1000))}")

    @contextmanager
    def _writer_within(self, wait_s: float | None) -> Iterator[None]:
        """This process's writer lock (SQLite), waited for ``wait_s`` at most while its
        holder waits for the file (in its ``BEGIN IMMEDIATE``: another process holds the
        lock). A holder past its BEGIN only runs its statements (in WAL mode nothing
        else waits for the file), so it is waited for: a loaded machine's slow
        transaction is not a busy store."""
        lock = self._writer
        if wait_s is None or isinstance(lock, nullcontext):
            with lock:
                yield
            return
        give_up = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        while not lock.acquire(timeout=max(0.0, wait_s)):
            if self._beginning or time.monotonic() > give_up:
                raise self._busy_now(
                    wait_s,
                    "another transaction of this process waits for its database, locked "
                    "by another process (or connection)",
                )
        try:
            yield
        finally:
            lock.release()

    def _kept(self) -> Connection:
        """The connection transactions run on (SQLite; under the writer lock), opened
        again if the last one was dropped; in a transaction when one of this thread's
        is open."""
        conn = self._kept_conn
        if conn is False:
            conn = self._kept_conn = self.engine.connect()
        assert isinstance(conn, Connection)
        return conn

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
        than any commit its reads see. ``wait_s`` as for :meth:`transaction`.
        """
        if self.engine.dialect.name != "postgresql":
            with self.transaction(wait_s=wait_s) as conn:
                yield conn
            return
        wait = self._wait_for(wait_s)
        with self.engine.connect() as base:
            conn = base.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            with conn.begin():
                try:
                    if wait is not None:
                        self._pg_lock_timeout(conn, wait)
                    conn.exec_driver_sql("SELECT 1")
                    yield conn
                except DBAPIError as exc:
                    if wait is not None and _busy_error(exc):
                        raise self._busy_now(wait, _PG_LOCKED) from None
                    raise

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


_LOCKED_ELSEWHERE = "its database is locked by another process (or connection)"
_PG_LOCKED = "a table or row it needs is locked by another session (lock_timeout)"


def open_database(url: str) -> Database:
    try:
        return Database(url)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open database {url!r}: {str(exc).splitlines()[0]}") from None
