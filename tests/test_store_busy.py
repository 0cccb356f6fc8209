"""A store another connection holds locked: a transaction that may wait only so long
(``wait_s``, or its thread's bound, ``Database.waiting_at_most``) is refused
``StoreBusy`` while the lock is held, on SQLite and on PostgreSQL; and a transaction
nested in one of the same thread (SQLite) no longer waits for itself.

The node-level behaviour (its thread bounded by ``store_wait_s``) is tested in
``tests/test_store_failures.py``.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from dms.files import sqlite_path
from dms.resources import ResourceLedger, Resources
from dms.store import Database, StoreBusy, StoreError, open_database
from dms.store import db as db_module
from dms.store.db import (
    PG_MAX_OVERFLOW,
    PG_POOL_SIZE,
    SQLITE_BUSY_TIMEOUT_MS,
    _driver_url,
)
from tests import pgserver
from tests.conftest import wait_for
from tests.test_store_failures import locked_by_another_process


@pytest.fixture(params=pgserver.BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store of this test's own, on each backend."""
    with pgserver.store_url(request.param, tmp_path) as store:
        yield store


@pytest.fixture
def db(url: str) -> Iterator[Database]:
    db = open_database(url)
    yield db
    db.close()


@contextmanager
def held(url: str, hold_s: float) -> Iterator[Callable[[], bool]]:
    """The store held by another connection for ``hold_s``, or until the block ends (SQLite:
    another process's ``BEGIN IMMEDIATE``; PostgreSQL: another session's ``LOCK TABLE
    leases, events IN ACCESS EXCLUSIVE MODE``); yields whether it still holds it."""
    path = sqlite_path(url)
    if path is not None:
        with locked_by_another_process(Path(path), hold_s) as holder:
            yield lambda: holder.poll() is None
        return
    engine = create_engine(_driver_url(url), poolclass=NullPool)
    conn = engine.connect()
    begun = conn.begin()
    conn.execute(text("LOCK TABLE leases, events IN ACCESS EXCLUSIVE MODE"))
    released = threading.Event()
    lock = threading.Lock()

    def release() -> None:
        with lock:
            if not released.is_set():
                begun.rollback()
                conn.close()
                released.set()

    timer = threading.Timer(hold_s, release)
    timer.start()
    try:
        yield lambda: not released.is_set()
    finally:
        timer.cancel()
        release()
        engine.dispose()


def count_leases(db: Database, wait_s: float | None = None) -> int:
    with db.transaction(wait_s=wait_s) as conn:
        return int(conn.execute(text("SELECT count(*) FROM leases")).scalar_one())


def test_a_transaction_that_may_wait_so_long_is_refused_busy_while_the_store_is_held(
    url: str, db: Database
) -> None:
    """Before: on SQLite the bound gave "database is locked" (an OperationalError, not
    StoreBusy), and an ORM session ignored a thread's bound; on PostgreSQL ``wait_s``
    was ignored, and the transaction waited for the lock as long as it was held."""
    ledger = ResourceLedger(db)
    ledger.onboard(Resources(cpu=2, ram=1, disk=1))
    with held(url, 40) as holding:
        with pytest.raises(StoreBusy, match="the store is busy"):
            count_leases(db, wait_s=0.2)
        with pytest.raises(StoreBusy), db.waiting_at_most(0.2):
            ledger.lock(Resources(cpu=1), 10.0)  # the ledger's exclusive transaction
        with pytest.raises(StoreBusy), db.waiting_at_most(0.2):
            db.record("test.busy")  # an ORM session
        assert holding()
    assert count_leases(db, wait_s=0.2) == 0  # let go: served again
    ledger.lock(Resources(cpu=1), 10.0)
    assert count_leases(db) == 1


def test_once_a_bounded_transaction_found_the_store_busy_the_next_ones_only_probe(
    url: str, db: Database
) -> None:
    """A node's thread refuses each request while the store is held, not after waiting its
    bound for each: once a bounded transaction found the store busy, those a thread's
    bound limits only try it, until one begins. Before, the second one (25 s) waited
    until the lock was let go (15 s), then ran."""
    with held(url, 15) as holding:
        with pytest.raises(StoreBusy):
            count_leases(db, wait_s=0.2)
        with db.waiting_at_most(25), pytest.raises(StoreBusy):
            count_leases(db)
        assert holding()
        with db.waiting_at_most(25), pytest.raises(StoreBusy):
            db.record("test.busy")
        assert holding()
    with db.waiting_at_most(25):  # let go: the first one begins, and clears it
        assert count_leases(db) == 0
    with db.waiting_at_most(25):
        db.record("test.free")
    assert [e.kind for e in db.events()] == ["test.free"]


def _read_leases(db: Database) -> None:
    with db.snapshot() as conn:
        conn.execute(text("SELECT count(*) FROM leases")).scalar_one()


@pytest.mark.parametrize(
    "served", [lambda db: db.record("test.free"), _read_leases], ids=["session", "snapshot"]
)
def test_any_use_the_store_served_ends_the_probing(
    url: str, db: Database, served: Callable[[Database], None]
) -> None:
    """Once the store was found busy, a thread's bounded transactions only try it until one
    is served. On PostgreSQL only a bounded transaction ended that: after an ORM session or
    a snapshot was served (the store free again), the node's transactions still waited
    5 ms each, and a lock held for a moment (a row another session updates) refused them
    StoreBusy. Any use the store served ends it now, on both stores."""
    with held(url, 15) as holding:
        with pytest.raises(StoreBusy):
            count_leases(db, wait_s=0.2)
        assert holding()
    served(db)  # let go: a session, or a snapshot, is served
    with held(url, 1.0), db.waiting_at_most(25):
        assert count_leases(db) == 0  # waited for the moment's lock, not refused at once


def test_a_transaction_nested_in_one_of_the_same_thread_is_part_of_it(tmp_path: Path) -> None:
    """SQLite: a transaction begun inside another of the same thread opened a second
    connection, whose ``BEGIN IMMEDIATE`` waited for the first, which waited for it: 30 s,
    then "database is locked". It is a savepoint of the outer one now (rolled back alone
    when it fails); an ORM session nested either way is refused at once."""
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    insert = text("INSERT INTO node_settings (key, value) VALUES (:key, '1')")
    with db.transaction() as outer:
        outer.execute(insert, {"key": "outer"})
        with db.transaction() as inner:
            inner.execute(insert, {"key": "inner"})
        with pytest.raises(RuntimeError), db.transaction() as failed:
            failed.execute(insert, {"key": "failed"})
            raise RuntimeError("rolled back alone")
        outer.execute(insert, {"key": "after"})
    assert [db.get_setting(k) for k in ("outer", "inner", "failed", "after")] == [1, 1, None, 1]
    with pytest.raises(StoreError, match="nested"), db.transaction():
        db.record("test.nested")
    with pytest.raises(StoreError, match="nested"), db.session():
        count_leases(db)
    assert db.events("test.nested") == []
    db.close()


def test_a_transaction_its_caller_refuses_keeps_the_connection_for_the_next(
    tmp_path: Path,
) -> None:
    """A commit refused by the ledger (an unknown lease: any peer can send one) ends its
    transaction with the caller's error. The connection was rolled back clean, so the
    next transaction runs on it, page cache and all; before, each such refusal closed
    it and the next took another from the pool."""
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    checkouts: list[object] = []
    event.listen(db.engine, "checkout", lambda dbapi, record, proxy: checkouts.append(dbapi))
    insert = text("INSERT INTO node_settings (key, value) VALUES (:key, '1')")
    with db.transaction() as conn:
        conn.execute(insert, {"key": "first"})
    checkouts.clear()
    for i in range(20):
        with pytest.raises(ValueError), db.transaction() as conn:
            conn.execute(insert, {"key": f"refused-{i}"})
            raise ValueError("no such lease")
        with db.transaction() as conn:
            conn.execute(insert, {"key": f"after-{i}"})
    assert checkouts == []  # every one ran on the kept connection
    assert db.get_setting("refused-3") is None and db.get_setting("after-19") == 1
    # A driver's error may leave the connection in any state: that one is dropped.
    checkouts.clear()
    with pytest.raises(OperationalError), db.transaction() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    with db.transaction() as conn:
        conn.execute(insert, {"key": "fresh"})
    assert len(checkouts) == 1
    db.close()


def _waited(refusal: StoreBusy) -> float:
    """The wait a refusal reports: "... (waited 0.51 s)"."""
    match = re.search(r"\(waited ([0-9.]+) s\)", str(refusal))
    assert match, refusal
    return float(match.group(1))


def test_a_transaction_waits_its_bound_once_for_the_writer_lock_and_the_file_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bounded transaction waited its whole bound for this process's writer lock (its
    holder in its own BEGIN, waiting for a file another process holds), then its whole
    bound again for the file: 3 s allowed, 5.5 s waited, "waited 3 s" said. One deadline
    for both now, and the refusal says what it really waited; the metric counts each
    refusal's wait once."""
    path = tmp_path / "dms.db"
    db = open_database(f"sqlite:///{path}")
    refusals: list[StoreBusy] = []

    def first() -> None:
        with pytest.raises(StoreBusy) as refused:
            count_leases(db, wait_s=2.5)
        refusals.append(refused.value)

    # The file's wait each transaction asks SQLite for (its busy_timeout before BEGIN),
    # by thread: the bug asked the whole bound again after waiting for the writer lock.
    asked: list[tuple[int, int]] = []
    real = db_module.run_driver

    def recording(conn: Any, sql: str) -> None:
        if sql.startswith("PRAGMA busy_timeout="):
            ms = int(sql.split("=")[1])
            if ms != SQLITE_BUSY_TIMEOUT_MS:  # not the reset after BEGIN
                asked.append((threading.get_ident(), ms))
        real(conn, sql)

    monkeypatch.setattr(db_module, "run_driver", recording)
    with locked_by_another_process(path, 120) as holder:
        holding = threading.Thread(target=first)
        holding.start()
        wait_for(lambda: db._beginning, 10, "the first transaction to wait in its BEGIN")
        with db.waiting_at_most(3.0), pytest.raises(StoreBusy) as refused:
            count_leases(db)
        holding.join(30)
        assert holder.poll() is None
    said = _waited(refused.value)
    # Its wait for the file is what the writer lock left of its 3 s, never 3 s again.
    mine = [ms for thread, ms in asked if thread == threading.get_ident()]
    assert all(ms < 3000 for ms in mine), (mine, refused.value)
    [first_refusal] = refusals
    assert db.busy_refusals == 2
    assert db.busy_waited_s == pytest.approx(said + _waited(first_refusal), abs=0.02)
    db.close()


def _pg_url(url: str) -> str:
    if sqlite_path(url) is not None:
        pytest.skip("PostgreSQL's pool and connections")
    return url


def test_a_transaction_finding_every_pooled_connection_taken_is_refused_busy(url: str) -> None:
    """PostgreSQL: with every connection of the pool (5 + 10 overflow) held by this
    process's other transactions, a bounded transaction waited SQLAlchemy's pool_timeout
    (30 s, one for every thread), then failed with its TimeoutError, no StoreBusy: the
    node's thread froze and the request got ``handler_error``. It waits its own bound
    for a connection now, then is refused StoreBusy; one let go serves it."""
    db = open_database(_pg_url(url))
    held = PG_POOL_SIZE + PG_MAX_OVERFLOW
    let_go = threading.Event()
    opened = threading.Semaphore(0)

    def hold() -> None:
        with db.transaction() as conn:
            conn.execute(text("SELECT 1"))
            opened.release()
            let_go.wait(120)

    holders = [threading.Thread(target=hold) for _ in range(held)]
    for thread in holders:
        thread.start()
    try:
        for _ in range(held):
            assert opened.acquire(timeout=60)
        answer: list[BaseException | int] = []

        def bounded() -> None:
            try:
                with db.waiting_at_most(0.5):
                    answer.append(count_leases(db))
            except BaseException as exc:
                answer.append(exc)

        asking = threading.Thread(target=bounded)
        asking.start()
        asking.join(20)  # before: 30 s in the pool's wait
        assert answer, "a bounded transaction still waits for a pooled connection"
        [refusal] = answer
        assert isinstance(refusal, StoreBusy), refusal
        assert "every connection of its pool is in use" in str(refusal)
    finally:
        let_go.set()
        for thread in holders:
            thread.join(30)
    assert count_leases(db, wait_s=0.5) == 0
    db.close()


def test_a_database_server_that_never_answers_is_refused_busy_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PostgreSQL server that accepts connections and never answers (a hung server, a
    firewall that drops): psycopg has no connect timeout of its own, so opening the
    store (and any new pooled connection) waited for ever. Now a new connection is made
    within ``PG_CONNECT_TIMEOUT_S`` (or what is left of its transaction's wait), else
    StoreBusy saying the server did not answer."""
    # libpq's floor (2 s), not the default 10 s the test waited out: a store that passes
    # no connect timeout still waits for ever (the 60 s below).
    monkeypatch.setattr(db_module, "PG_CONNECT_TIMEOUT_S", 2)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        answer: list[BaseException | object] = []

        def opening() -> None:
            try:
                answer.append(open_database(f"postgresql://u:p@127.0.0.1:{port}/dms"))
            except BaseException as exc:
                answer.append(exc)

        thread = threading.Thread(target=opening, daemon=True)
        thread.start()
        thread.join(60)
        assert answer, "opening a store whose server never answers still waits"
    [refusal] = answer
    assert isinstance(refusal, StoreBusy), refusal
    assert "did not answer a new connection in time" in str(refusal)


def test_a_bounded_transaction_begins_with_one_statement_and_an_unbounded_one_waits_30_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bounded transaction set SQLite's busy timeout to what was left of its bound,
    began, and set it back: three statements a transaction (each a turn at the GIL given
    up). The timeout now stays set until a BEGIN wants another, so bounded transactions
    in a row mostly begin with one; each still waits for the file what is left of its
    bound at most, and an unbounded one after them the whole busy timeout again."""
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    pragmas: list[int] = []
    real = db_module.run_driver

    def recording(conn: Any, sql: str) -> None:
        if sql.startswith("PRAGMA busy_timeout="):
            pragmas.append(int(sql.split("=")[1]))
        real(conn, sql)

    def busy_timeout(conn: Any) -> int:
        return int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar())

    monkeypatch.setattr(db_module, "run_driver", recording)
    runs = 20
    with db.waiting_at_most(60.0):
        for _ in range(runs):
            with db.transaction() as conn:
                assert 0 < busy_timeout(conn) <= 60_000  # what is left of the bound
    assert len(pragmas) < runs  # two a transaction before
    with db.transaction() as conn:  # unbounded: SQLite's whole busy timeout
        assert busy_timeout(conn) == SQLITE_BUSY_TIMEOUT_MS
    with db.waiting_at_most(2.0), db.transaction() as conn:
        assert 0 < busy_timeout(conn) <= 2000
    db.close()


def test_a_busy_timeout_change_that_failed_midway_is_set_again_by_the_next_begin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection's busy timeout is remembered to skip setting it again; a change
    that raised after SQLite took it (an interrupt between the statement and the
    bookkeeping) left it remembered as the 30 s default while the connection held the
    bound: the next unbounded transaction kept a bound of milliseconds."""
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    real = db_module.run_driver
    failed: list[str] = []

    def failing_once(conn: Any, sql: str) -> None:
        real(conn, sql)
        if sql.startswith("PRAGMA busy_timeout=") and not sql.endswith("=30000") and not failed:
            failed.append(sql)
            raise RuntimeError("interrupted after the statement ran")

    monkeypatch.setattr(db_module, "run_driver", failing_once)
    with pytest.raises(Exception, match="interrupted"), db.waiting_at_most(0.5), db.transaction():
        pass
    assert failed
    with db.transaction() as conn:  # unbounded: SQLite's whole busy timeout again
        assert int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar()) == (SQLITE_BUSY_TIMEOUT_MS)
    db.close()
