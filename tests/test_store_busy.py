"""A store another connection holds locked: a transaction that may wait only so long
(``wait_s``, or its thread's bound, ``Database.waiting_at_most``) is refused
``StoreBusy`` while the lock is held, on SQLite and on PostgreSQL; and a transaction
nested in one of the same thread (SQLite) no longer waits for itself.

The node-level behaviour (its thread bounded by ``store_wait_s``) is tested in
``tests/test_store_failures.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from dms.files import sqlite_path
from dms.resources import ResourceLedger, Resources
from dms.store import Database, StoreBusy, StoreError, open_database
from dms.store.db import _driver_url
from tests import pgserver
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
