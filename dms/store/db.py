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
refuses each request at once, not after the bound each (on PostgreSQL: until one
session, snapshot or transaction ends served, bounded or not). A transaction's wait is one
deadline for all of it (this process's writer lock, then the file; on PostgreSQL a pooled
connection, then each lock), and :class:`StoreBusy` says how long it really waited.
Start-up waits for a locked store until a deadline of its own, saying so as it waits
(:meth:`Database.waiting_until`, ``open_database(wait_s=...)``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    insert,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dms.files import create_private, sqlite_path
from dms.store.errors import StoreBusy, StoreError
from dms.store.migrations import migrate
from dms.store.models import Event, Setting
from dms.store.sql import as_text, json_value, run_driver

__all__ = ["Database", "StoreBusy", "StoreError", "open_database"]

SQLITE_BUSY_TIMEOUT_MS = 30_000
_BUSY_MS = "dms_busy_timeout_ms"  # in a connection's ``info``: the busy timeout set last
# PostgreSQL: a connection of the pool waited for this long at most by a transaction
# with no bound of its own (SQLAlchemy's pool_timeout, 30 s, raised its TimeoutError),
# and a new connection made within this (psycopg's connect_timeout: none, a server that
# accepts and never answers held the thread for ever). Both raise StoreBusy past it.
PG_POOL_WAIT_S = 30.0
PG_CONNECT_TIMEOUT_S = 10
PG_POOL_SIZE = 5  # SQLAlchemy's defaults, counted here (Database._pool_slot)
PG_MAX_OVERFLOW = 10
# While start-up waits for a locked store (waiting_until with a progress callback), it
# says so this often.
PROGRESS_EVERY_S = 2.5
_T = TypeVar("_T")
# A bounded transaction's wait for the file while the store was found busy and has not
# begun one since: a try, not a wait (this process's writer lock is waited for as long as
# its holder runs its statements: Database._writer_within).
BUSY_PROBE_S = 0.005
# Past its deadline, a transaction waits for this process's writer lock in steps of this
# while the lock's holder runs its statements (Database._writer_within).
WRITER_STEP_S = 0.05
PG_LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout's SQLSTATE


def _least(a: float | None, b: float | None) -> float | None:
    """The smaller bound; None is no bound."""
    if a is None:
        return b
    return a if b is None else min(a, b)


class _Wait:
    """One transaction's wait for the store: from ``started`` until ``deadline``
    (monotonic), shared by all it waits for; ``progress(waited_s)`` told as it waits."""

    __slots__ = ("deadline", "progress", "started")

    def __init__(self, wait_s: float, progress: Callable[[float], None] | None = None) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + max(0.0, wait_s)
        self.progress = progress

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def waited(self) -> float:
        return time.monotonic() - self.started


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


def _sqlite_engine(url: str, begin_wait: Callable[[], _Wait | None]) -> Engine:
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

    def busy_timeout(conn: Any, ms: int) -> None:
        """The connection's busy timeout ``ms``, set only when it is not that already:
        ``conn.info`` (kept as long as its driver connection, cleared when that closes)
        says what was set last; a new connection has ``SQLITE_BUSY_TIMEOUT_MS``."""
        if conn.info.get(_BUSY_MS, SQLITE_BUSY_TIMEOUT_MS) != ms:
            conn.info[_BUSY_MS] = None  # unknown until the statement ran: equal to no ms
            run_driver(conn, f"PRAGMA busy_timeout={ms}")
            conn.info[_BUSY_MS] = ms

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # On the driver's connection: through Core, this one statement cost as much as
        # the rest of a ledger transaction (dms.store.sql).
        wait = begin_wait()
        if wait is None:
            busy_timeout(conn, SQLITE_BUSY_TIMEOUT_MS)
            run_driver(conn, "BEGIN IMMEDIATE")
            return
        # Only BEGIN IMMEDIATE waits for the file: in WAL mode the transaction it starts
        # holds the write lock, and reads never wait. Its wait is what is left of the
        # transaction's (the writer lock took the rest); with a progress callback in
        # steps, saying how long it has waited after each. The timeout stays set after
        # the BEGIN (nothing else in the transaction waits for the file) until a BEGIN
        # wants another: the next bounded one mostly wants the same whole milliseconds
        # (a node's store_wait_s less a few microseconds), so a transaction asks SQLite
        # one statement to begin, not three (each a turn at the GIL given up and waited
        # for again on a busy node).
        while True:
            left = wait.left()
            step = left if wait.progress is None else min(left, PROGRESS_EVERY_S)
            busy_timeout(conn, max(0, int(step * 1000)))
            try:
                run_driver(conn, "BEGIN IMMEDIATE")
                return
            except Exception as exc:
                if wait.progress is None or step >= left or not _busy_error(exc):
                    raise
                wait.progress(wait.waited())

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

    def __init__(
        self,
        url: str,
        *,
        wait_s: float | None = None,
        progress: Callable[[float], None] | None = None,
        pool_size: int = PG_POOL_SIZE,
        max_overflow: int = PG_MAX_OVERFLOW,
    ) -> None:
        """``wait_s``: the longest opening (its migration) waits for a store another
        process holds locked, ``progress(waited_s)`` told every ``PROGRESS_EVERY_S``
        meanwhile; past it :class:`StoreBusy`. None: SQLite's busy timeout."""
        self.url = url
        # Per thread: ``bound`` (waiting_at_most), ``until`` (waiting_until: a deadline and
        # a progress callback), ``wait`` (the wait of the BEGIN under way), ``depth``
        # (transactions open), ``in_session`` (an ORM one open).
        self._local = threading.local()
        self._busy = False  # a bounded transaction found the store busy; none began since
        self._beginning = False  # the writer lock's holder is in its BEGIN (SQLite)
        # Transactions refused StoreBusy, and the seconds they waited, all told (metrics).
        self.busy_refusals = 0
        self.busy_waited_s = 0.0
        self._counts = threading.Lock()
        # PostgreSQL: the pool's connections, counted before a checkout so that its wait
        # is the transaction's own (the pool's timeout is one for every thread).
        self._pool_slots = threading.BoundedSemaphore(pool_size + max_overflow)
        try:
            path = sqlite_path(url)
            if path is not None:
                if path.startswith("file:"):
                    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
                elif path and path != ":memory:":
                    create_private(Path(path).expanduser())  # its -wal and -shm get its mode
                self.engine = _sqlite_engine(url, lambda: getattr(self._local, "wait", None))
            else:
                self.engine = self._pg_engine(url, pool_size, max_overflow)
            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
            self._writer = threading.RLock() if url.startswith("sqlite") else nullcontext()
            # SQLite: every transaction of this process on one connection, kept open (False:
            # to open at the next): taking one from the pool and giving it back cost more
            # than a ledger transition's SQL, and each connection's page cache was stale
            # whenever the pool handed out the other (specs/orchestration.md, sixth pass).
            self._kept_conn: Connection | bool | None = False if path is not None else None
            with self.waiting_until(wait_s, progress):
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

    @contextmanager
    def waiting_until(
        self, wait_s: float | None, progress: Callable[[float], None] | None = None
    ) -> Iterator[None]:
        """Every transaction this thread runs inside waits for the store until ``wait_s``
        from now at most, all of them together (start-up: ``dms run`` on a file another
        process holds locked), else raises :class:`StoreBusy`; ``progress(waited_s)`` is
        told every ``PROGRESS_EVERY_S`` while one waits for the file (SQLite), the time
        since this began. No probing: each waits what is left. None: no deadline."""
        before = getattr(self._local, "until", None)
        if wait_s is not None:
            started = time.monotonic()
            deadline = started + wait_s
            if before is not None:
                deadline = min(deadline, before[0])
            self._local.until = (deadline, progress, started)
        try:
            yield
        finally:
            self._local.until = before

    @property
    def bounded(self) -> bool:
        """Whether this thread's transactions wait for the store a bounded time."""
        return self.thread_bound() is not None

    def thread_bound(self) -> float | None:
        """How long a transaction of this thread may wait for the store now (its bound,
        or what is left until its deadline); None: no bound."""
        bound = getattr(self._local, "bound", None)
        until = getattr(self._local, "until", None)
        if until is not None:
            bound = _least(bound, max(0.0, until[0] - time.monotonic()))
        return bound

    def _wait_for(self, wait_s: float | None) -> _Wait | None:
        """The wait of a transaction asking ``wait_s``, on this thread, from now."""
        bound = getattr(self._local, "bound", None)
        wait = _least(wait_s, bound)
        if bound is not None and self._busy:  # the node's mailbox: a try, not a wait
            wait = min(bound, BUSY_PROBE_S)
        until = getattr(self._local, "until", None)
        if until is None:
            return None if wait is None else _Wait(wait)
        deadline, progress, started = until
        waiting = _Wait(_least(wait, max(0.0, deadline - time.monotonic())) or 0.0, progress)
        if progress is not None:
            waiting.started = started  # progress counts from the start of it all
        return waiting

    def _busy_now(self, wait: _Wait, what: str) -> StoreBusy:
        """The refusal of a transaction that waited ``wait`` for the store: counted once,
        with the time it waited (writer lock, pool and file together)."""
        self._busy = True
        return self.refuse_busy(wait.started, what)

    def refuse_busy(self, started: float, what: str) -> StoreBusy:
        """:class:`StoreBusy` for work that waited for the store since ``started``
        (monotonic) and gave up: counted once, with that wait."""
        waited = time.monotonic() - started
        with self._counts:
            self.busy_refusals += 1
            self.busy_waited_s += waited
        return StoreBusy(f"the store is busy: {what} (waited {waited:.2f} s)")

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
            with self._pool_slot(wait):
                try:
                    with self._pg_connecting(wait), self._sessions() as session, session.begin():
                        if wait is not None:
                            self._pg_lock_timeout(session.connection(), wait)
                        yield session
                except DBAPIError as exc:
                    if wait is not None and _busy_error(exc):
                        raise self._busy_now(wait, _PG_LOCKED) from None
                    raise
            self._busy = False  # committed: every lock it needed was had (no more probing)
            return
        with (
            self._opened(session=True),
            self._writer_within(wait),
            self._sessions() as session,
            session.begin(),
        ):
            self._begin(session.connection, wait)  # begun now, within its wait
            yield session

    def _begin(self, begin: Callable[[], _T], wait: _Wait | None) -> _T:
        """``begin()``: a ``BEGIN IMMEDIATE`` (SQLite, under the writer lock), waiting for
        the file's lock what is left of ``wait`` at most (None: the busy timeout)."""
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
        busy timeout for the ``BEGIN IMMEDIATE``, 30 s otherwise); on PostgreSQL a
        connection of the pool, then each lock the transaction waits for (``SET LOCAL
        lock_timeout``, what is left). One deadline for all of it. For work that must
        not hold up what waits on it (a heartbeat, the node's mailbox).

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
        with self._writer, self._pool_slot(wait):
            try:
                with self._pg_connecting(wait), self.engine.begin() as conn:
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
            self._busy = False  # committed, bounded or not: the store served it

    @staticmethod
    def _pg_lock_timeout(conn: Connection, wait: _Wait) -> None:
        """No lock of this transaction waits longer than what is left of ``wait``
        (PostgreSQL; 0 would be no timeout at all)."""
        if conn.dialect.name == "postgresql":
            ms = max(1, int(wait.left() * 1000))
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")

    def _pg_engine(self, url: str, pool_size: int, max_overflow: int) -> Engine:
        """PostgreSQL's engine: a new connection is made within what is left of its
        transaction's wait (``connect_timeout``, whole seconds, 2 at least: libpq's
        floor), ``PG_CONNECT_TIMEOUT_S`` at most."""
        engine = create_engine(
            _driver_url(url),
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=PG_POOL_WAIT_S,
        )

        @event.listens_for(engine, "do_connect")
        def _connect_within(_dialect: Any, _rec: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
            wait = getattr(self._local, "connecting", None)
            left = PG_CONNECT_TIMEOUT_S if wait is None else min(PG_CONNECT_TIMEOUT_S, wait.left())
            cparams.setdefault("connect_timeout", max(2, math.ceil(left)))

        return engine

    @contextmanager
    def _pg_connecting(self, wait: _Wait | None) -> Iterator[None]:
        """A connection made meanwhile is made within ``wait`` (PostgreSQL), and one the
        server did not answer in time is :class:`StoreBusy`."""
        self._local.connecting = wait
        try:
            yield
        except OperationalError as exc:
            if "timeout expired" in str(exc) or "timed out" in str(exc):
                raise self._busy_now(
                    wait or _Wait(PG_CONNECT_TIMEOUT_S),
                    "its database server did not answer a new connection in time",
                ) from None
            raise
        finally:
            self._local.connecting = None

    @contextmanager
    def _pool_slot(self, wait: _Wait | None) -> Iterator[None]:
        """One of the pool's connections (PostgreSQL), waited for within ``wait``
        (``PG_POOL_WAIT_S`` without one), else :class:`StoreBusy`: the pool's own wait
        was one timeout for every thread, and its error no refusal."""
        left = PG_POOL_WAIT_S if wait is None else wait.left()
        if not self._pool_slots.acquire(timeout=left):
            raise self._busy_now(
                wait or _Wait(PG_POOL_WAIT_S),
                "every connection of its pool is in use by this process's other transactions",
            )
        try:
            yield
        finally:
            self._pool_slots.release()

    @contextmanager
    def _writer_within(self, wait: _Wait | None) -> Iterator[None]:
        """This process's writer lock (SQLite), waited for until ``wait``'s deadline at
        most while its holder waits for the file (in its ``BEGIN IMMEDIATE``: another
        process holds the lock). A holder past its BEGIN only runs its statements (in WAL
        mode nothing else waits for the file), so it is waited for: a loaded machine's
        slow transaction is not a busy store. What the lock took of the wait, the
        BEGIN no longer has (before, each waited all of it: twice the bound)."""
        lock = self._writer
        if wait is None or isinstance(lock, nullcontext):
            with lock:
                yield
            return
        give_up = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        while not lock.acquire(timeout=wait.left() or WRITER_STEP_S):
            if (self._beginning and not wait.left()) or time.monotonic() > give_up:
                raise self._busy_now(
                    wait,
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
        with self._pool_slot(wait):
            with self._pg_connecting(wait):
                base = self.engine.connect()
            with base:
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
        self._busy = False  # read all it asked: the store served it (no more probing)

    def close(self) -> None:
        with self._writer:
            if isinstance(self._kept_conn, Connection):
                self._drop_kept(self._kept_conn)
            self._kept_conn = None
        self.engine.dispose()

    def _migrate(self) -> int:
        # One transaction for the whole upgrade (BEGIN IMMEDIATE on SQLite): all or nothing,
        # within this thread's deadline (waiting_until: start-up) if it has one.
        wait = self._wait_for(None)
        try:
            if self._kept_conn is None:  # PostgreSQL
                with (
                    self._pool_slot(wait),
                    self._pg_connecting(wait),
                    self.engine.begin() as conn,
                ):
                    if wait is not None:
                        self._pg_lock_timeout(conn, wait)
                    return migrate(conn)
            self._local.wait = wait
            try:
                with self.engine.begin() as conn:
                    return migrate(conn)
            finally:
                self._local.wait = None
        except DBAPIError as exc:
            self.engine.dispose()
            if wait is not None and _busy_error(exc):
                where = _PG_LOCKED if self._kept_conn is None else _LOCKED_ELSEWHERE
                raise self._busy_now(wait, where) from None
            raise
        except BaseException:
            self.engine.dispose()
            raise

    # ---- small helpers every layer uses ------------------------------------------

    def get_setting(self, key: str, default: Any = None) -> Any:
        """The setting ``key``'s value, ``default`` if it is not set. One whose stored text
        is not JSON (a hand edit, disk trouble) counts as not set, with a warning: it kept
        the node from starting (the JSON error raised out of its start)."""
        with self.session() as s:
            stored = s.scalar(select(*as_text(SETTINGS, ["value"])).where(SETTINGS.c.key == key))
            if stored is None:  # no row, or a row whose value is null
                return default
        try:
            return json_value(stored)
        except ValueError as exc:
            log.warning("the setting %r in the store is not JSON (%s): taken as not set "
                        "until it is written again", key, exc)  # fmt: skip
            return default

    def put_setting(self, key: str, value: Any) -> None:
        """Set ``key`` to ``value``, written over whatever is stored (never read first: a
        stored value that is not JSON raised out of the write)."""
        with self.session() as s:
            where = SETTINGS.c.key == key
            if s.execute(update(SETTINGS).where(where).values(value=value)).rowcount == 0:
                s.execute(insert(SETTINGS).values(key=key, value=value))

    def record(self, kind: str, **data: Any) -> None:
        with self.session() as s:
            s.add(Event(kind=kind, data=data or None))

    def events(self, kind: str | None = None, limit: int = 100) -> list[Event]:
        with self.session() as s:
            query = select(Event).order_by(Event.id.desc()).limit(limit)
            if kind is not None:
                query = query.where(Event.kind == kind)
            return list(s.scalars(query))


SETTINGS = Setting.__table__
log = logging.getLogger("dms.store")

_LOCKED_ELSEWHERE = "its database is locked by another process (or connection)"
_PG_LOCKED = "a table or row it needs is locked by another session (lock_timeout)"


def open_database(
    url: str, wait_s: float | None = None, progress: Callable[[float], None] | None = None
) -> Database:
    """The store at ``url``, its schema migrated; ``wait_s``, ``progress``: as for
    :class:`Database` (start-up's wait for a store another process holds locked)."""
    try:
        return Database(url, wait_s=wait_s, progress=progress)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open database {url!r}: {str(exc).splitlines()[0]}") from None
