"""The store: migrations, SQLite settings, configurable URL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from dms.config import load_settings
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
