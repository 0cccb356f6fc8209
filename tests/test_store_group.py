"""Group commit (dms/store/group.py): deployments saving at the same moment share one
transaction, and each save still returns only once its own row is committed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from dms.orchestrator.records import BidRow
from dms.orchestrator.store import DeploymentStore
from dms.store import Database, StoreBusy, open_database
from tests.conftest import wait_for
from tests.test_store_failures import locked_by_another_process


def row(i: int) -> dict[str, Any]:
    return {
        "id": f"d{i}", "name": "n", "state": "bidding", "spec": {"name": "n"},
        "slots": [], "events": [], "created_at": 1.0, "running_at": None, "ended_at": None,
    }  # fmt: skip


@contextmanager
def held(db: Database) -> Iterator[threading.Event]:
    """Another writer's transaction under way, until the event yielded is set."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with db.transaction():
            holding.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(60)
    try:
        yield release
    finally:
        release.set()
        thread.join(60)


def run_all(calls: list[Any]) -> tuple[list[threading.Thread], dict[int, BaseException]]:
    errors: dict[int, BaseException] = {}

    def call(i: int) -> None:
        try:
            calls[i]()
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    return threads, errors


def eight_saves_behind_a_held_lock(
    db: Database, store: DeploymentStore, save: Callable[[int], None]
) -> None:
    """Eight threads ``save`` while another connection holds the writer lock: the first
    waits for the lock, the other seven queue behind it, and the seven share one
    transaction once it is let go (3 commits: the holder's, the first's, the seven's;
    each its own would be 9)."""
    commits: list[int] = []
    event.listen(db.engine, "commit", lambda conn: commits.append(1))
    with held(db) as release:
        commits.clear()
        threads, errors = run_all([lambda i=i: save(i) for i in range(8)])
        wait_for(lambda: store.group.waiting == 7, 30, "seven saves queued")
        release.set()
        for t in threads:
            t.join(60)
    assert len(commits) == 3
    assert errors == {}
    assert all(store.get(f"d{i}") is not None for i in range(8))


def test_saves_made_during_a_transaction_share_the_next_one(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    store = DeploymentStore(db)
    eight_saves_behind_a_held_lock(db, store, lambda i: store.save(row(i)))


def test_a_write_that_fails_fails_only_its_caller(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    store = DeploymentStore(db)

    def broken(conn: Any) -> None:
        raise ValueError("this write is broken")

    calls: list[Any] = [lambda i=i: store.save(row(i)) for i in range(4)]
    calls.insert(2, lambda: store.group.run(broken))
    with held(db) as release:
        threads, errors = run_all(calls[:1])
        wait_for(lambda: store.group.waiting == 0 and store.group.transactions == 1, 30)
        more, errors_more = run_all(calls[1:])
        wait_for(lambda: store.group.waiting == 4, 30, "four writes queued")
        release.set()
        for t in threads + more:
            t.join(60)
    assert errors == {}
    assert list(errors_more) == [1] and isinstance(errors_more[1], ValueError)
    assert all(store.get(f"d{i}") is not None for i in range(4))


def test_a_save_and_its_bids_are_one_write(tmp_path: Path) -> None:
    """A round's end saves the deployment and its bid index rows together."""
    store = DeploymentStore(open_database(f"sqlite:///{tmp_path / 'dms.db'}"))
    won = BidRow("d1", "received", "peer-a", "w.0", "won", "won: score 0.6", "lease-1", 2.5)
    store.save(row(1), [won])
    assert store.group.transactions == 1
    assert [b.outcome for b in store.bids("d1")] == ["won"]
    bad = {**row(2), "name": None}  # NOT NULL: the save fails, and its bids with it
    with pytest.raises(Exception, match="NOT NULL"):
        store.save(bad, [BidRow("d2", "received", "peer-a", "w.0", "won", "won", "l-2", 1.0)])
    assert store.bids("d2") == []


def test_saves_of_bounded_threads_still_share_a_transaction(tmp_path: Path) -> None:
    """Deployments' threads wait for the store the node's store_wait_s at most now; a
    bounded thread's save was a transaction of its own, never batched (9 commits here,
    not 3): group commit is kept for them, within their bounds."""
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    store = DeploymentStore(db)

    def bounded_save(i: int) -> None:
        with db.waiting_at_most(30):
            store.save(row(i))

    eight_saves_behind_a_held_lock(db, store, bounded_save)


def test_a_bounded_save_queued_behind_a_locked_file_leaves_the_queue_in_its_bound(
    tmp_path: Path,
) -> None:
    """Another process holds the file; a save of a thread without a bound leads a
    transaction that waits for it. A bounded thread's save queued behind it leaves the
    queue with StoreBusy within its bound (its write in no transaction), and the
    leader's goes through once the file is let go."""
    path = tmp_path / "dms.db"
    db = open_database(f"sqlite:///{path}")
    store = DeploymentStore(db)
    with locked_by_another_process(path, 120):
        leader, leader_errors = run_all([lambda: store.save(row(0))])
        wait_for(lambda: db._beginning, 30, "the leader's transaction to wait for the file")
        with db.waiting_at_most(0.5), pytest.raises(StoreBusy, match="another thread's"):
            store.save(row(1))
        assert store.group.waiting == 0
    for t in leader:
        t.join(60)
    assert leader_errors == {}
    assert store.get("d0") is not None and store.get("d1") is None
