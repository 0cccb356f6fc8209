"""The store: migrations, SQLite settings, configurable URL, and the orchestrator's typed rows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import text

from dms.config import load_settings
from dms.orchestrator.records import BidRow, MiningRow
from dms.orchestrator.store import DeploymentStore
from dms.store import LATEST_VERSION, StoreError, open_database


def test_fresh_database_is_migrated_and_survives_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dms.db'}"
    db = open_database(url)
    assert db.version == LATEST_VERSION
    db.put_setting("onboarded", {"cpu": 2})
    db.record("started", nonce="abc")
    db.close()

    again = open_database(url)
    assert again.version == LATEST_VERSION
    assert again.get_setting("onboarded") == {"cpu": 2}
    assert [e.kind for e in again.events()] == ["started"]
    with again.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    again.close()


def test_database_from_a_newer_dms_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dms.db'}"
    db = open_database(url)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = :v"), {"v": LATEST_VERSION + 1})
    db.close()
    with pytest.raises(StoreError, match="newer than this dms"):
        open_database(url)


def test_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'dms.db'}")
    db.put_setting("k", 1)
    with pytest.raises(RuntimeError), db.session() as s:
        from dms.store import Setting

        s.merge(Setting(key="k", value=2))
        s.flush()
        raise RuntimeError("crash mid-transaction")
    assert db.get_setting("k") == 1


def test_database_url_comes_from_configuration(
    dms_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings().database_url == f"sqlite:///{dms_home / 'dms.db'}"
    other = dms_home.parent / "elsewhere.db"
    monkeypatch.setenv("DMS_DB_URL", f"sqlite:///{other}")
    db = open_database(load_settings().database_url)
    db.put_setting("x", True)
    db.close()
    assert other.exists()


def test_bad_url_is_a_clean_error() -> None:
    with pytest.raises(StoreError):
        open_database("nosuchdialect://x")


def test_a_mining_session_save_changes_only_the_columns_it_gives(tmp_path: Path) -> None:
    """``dms mine`` status reads the last checkpoint even when later saves carry none,
    and the labels only when the result is asked for."""
    store = DeploymentStore(open_database(f"sqlite:///{tmp_path / 'dms.db'}"))
    store.save_mining(MiningRow("s1", "skmeans", "placing"))
    store.save_mining(MiningRow("s1", "skmeans", "mining", {"step": 1}, checkpoint={"at": 1}))
    store.save_mining(MiningRow("s1", "skmeans", "mining", {"step": 2}))
    row = store.mining("s1")
    assert row is not None
    assert (row.phase, row.progress, row.checkpoint) == ("mining", {"step": 2}, {"at": 1})
    assert row.labels is None and row.created_at is not None
    store.save_mining(MiningRow("s1", phase="completed", result={"k": 3}, labels=[0, 1, 1]))
    done = store.mining("s1", labels=True)
    assert done is not None
    assert (done.algorithm, done.checkpoint, done.labels) == ("skmeans", {"at": 1}, [0, 1, 1])
    # A save the store refused is written under the next one: the next one's columns win.
    refused = MiningRow("s2", "skmeans", "mining", {"step": 3}, checkpoint={"at": 3})
    later = refused.updated_by(MiningRow("s2", "skmeans", "failed", {"step": 4}))
    assert (later.phase, later.progress, later.checkpoint) == ("failed", {"step": 4}, {"at": 3})


def test_bid_rows_read_back_as_they_were_recorded(tmp_path: Path) -> None:
    store = DeploymentStore(open_database(f"sqlite:///{tmp_path / 'dms.db'}"))
    won = BidRow("d1", "received", "peer-a", "w.0", "won", "won: score 0.6", "lease-1", 2.5)
    declined = BidRow("d1", "received", "peer-b", "w.0", "decline", "declined: too small")
    store.record_bids([won, declined])
    read = store.bids("d1")
    assert [replace(r, at=None, id=None) for r in read] == [won, declined]
    assert all(r.at is not None and r.id is not None for r in read)
    assert store.bids("d2") == []
