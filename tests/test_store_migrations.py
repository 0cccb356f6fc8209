"""Schema migrations (Alembic): every earlier version reaches the newest, rows kept, on
SQLite and on PostgreSQL; the migrated schema is the models'; a newer one is refused."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    create_engine,
    inspect,
    make_url,
    text,
)

from dms.store import LATEST_VERSION, StoreError, migrations, open_database
from dms.store.db import _driver_url
from dms.store.errors import client_command
from dms.store.models import Base, Setting
from tests import legacy_store, pgserver

NewUrl = Callable[[], str]
IN_MEMORY = "SQLite in memory: no file to open, only this process reaches it"


@pytest.fixture(params=pgserver.BACKENDS)
def new_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewUrl]:
    """Makes URLs of empty stores of their own on one backend; all dropped at the end."""
    with ExitStack() as stack:
        yield lambda: stack.enter_context(pgserver.store_url(request.param, tmp_path))


def _engine(url: str) -> Any:
    return create_engine(_driver_url(url))


def _versions(url: str) -> tuple[str | None, int | None]:
    engine = _engine(url)
    with engine.begin() as conn:
        found = migrations.current(conn)
    engine.dispose()
    return found


def _differences(url: str, metadata: MetaData = Base.metadata) -> list[Any]:
    engine = _engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    return diff


def _schema(conn: Connection) -> dict[str, Any]:
    """Tables, columns (type, nullable), primary keys and indexes, as the database has them."""
    found = inspect(conn)
    return {
        name: {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns(name)
            ],
            "pk": found.get_pk_constraint(name)["constrained_columns"],
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in found.get_indexes(name)
            ),
        }
        for name in sorted(found.get_table_names())
        if name != migrations.VERSION_TABLE
    }


@pytest.mark.parametrize(
    ("url", "command"),
    [
        ("postgresql+psycopg://dms:s3cret@127.0.0.1:5432/dms", "psql postgresql://dms@127.0.0.1:5432/dms"),
        # libpq takes a password from the query too (SQLAlchemy hands it the query)
        ("postgresql://dms@/dms?host=/run/postgresql&password=s3cret",
         "psql 'postgresql://dms@/dms?host=%2Frun%2Fpostgresql'"),
        ("postgresql://dms:s3cret@db/dms?options=-csearch_path%3Dx&sslpassword=s3cret",
         "psql 'postgresql://dms@db/dms?options=-csearch_path%3Dx'"),
        ("sqlite:////tmp/a b/dms.db", "sqlite3 '/tmp/a b/dms.db'"),
        # in memory: no file to name (it said "sqlite3 ''")
        ("sqlite://", IN_MEMORY),
        ("sqlite:///:memory:", IN_MEMORY),
        ("sqlite:///file:shared?mode=memory&cache=shared&uri=true", IN_MEMORY),
        ("sqlite:///file::memory:?uri=true", IN_MEMORY),  # SQLite's own URI for one
        # without uri=true pysqlite drops the query and opens the file named: a file
        ("sqlite:///file:x?mode=memory", "sqlite3 file:x"),
        ("sqlite:///memory", "sqlite3 memory"),
    ],
)  # fmt: skip
def test_the_damage_messages_client_never_shows_a_password(url: str, command: str) -> None:
    """The client a damage message names opens that database, without its password
    wherever the URL gives it: after the user, or in the query (it showed that one)."""
    assert client_command(make_url(url)) == command
    assert "s3cret" not in command


def test_revisions_are_one_numbered_line() -> None:
    script = ScriptDirectory.from_config(migrations.config())
    alembic_sees = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert alembic_sees == list(migrations.REVISIONS)  # the file names say the same
    assert script.get_heads() == [migrations.HEAD]
    ids = list(migrations.REVISIONS)
    assert ids == [f"{n:04d}" for n in range(1, len(ids) + 1)]
    for previous, revision in zip([None, *ids], ids, strict=False):
        assert script.get_revision(revision).down_revision == previous
    assert len(ids) == LATEST_VERSION


def test_an_empty_database_reaches_the_newest_revision(new_url: NewUrl) -> None:
    url = new_url()
    db = open_database(url)
    assert db.version == LATEST_VERSION
    db.put_setting("k", {"v": 1})
    db.close()
    assert _versions(url) == (migrations.HEAD, LATEST_VERSION)
    again = open_database(url)  # at the newest already: nothing to do
    assert again.get_setting("k") == {"v": 1}
    again.close()


@pytest.mark.parametrize("version", legacy_store.LEGACY_VERSIONS)
def test_a_database_from_before_alembic_upgrades_and_keeps_its_rows(
    new_url: NewUrl, version: int
) -> None:
    url = new_url()
    engine = _engine(url)
    with engine.begin() as conn:
        legacy_store.build(conn, version)
        before = {t: conn.execute(text(f"SELECT * FROM {t}")).all() for t, _ in
                  legacy_store.rows(version)}  # fmt: skip
    db = open_database(url)
    assert db.version == LATEST_VERSION
    with engine.begin() as conn:
        for table, rows in before.items():
            assert conn.execute(text(f"SELECT * FROM {table}")).all() == rows, table
    assert _versions(url) == (migrations.HEAD, LATEST_VERSION)
    assert _differences(url) == []
    # The rows read back through the models, and the tables the upgrade made take rows.
    assert db.get_setting("registered_capability") == {"cpu": 2}
    db.record("after.upgrade", version=version)
    assert db.events(limit=1)[0].kind == "after.upgrade"
    with db.transaction() as conn:
        conn.execute(
            text("INSERT INTO mining_sessions (id, algorithm, phase, progress, created_at, "
                 "updated_at) VALUES ('new', 'kmeans', 'new', '{}', 1, 1)")
        )  # fmt: skip
    db.close()
    engine.dispose()


@pytest.mark.parametrize("version", legacy_store.LEGACY_VERSIONS)
def test_each_revision_makes_the_schema_of_its_legacy_version(
    new_url: NewUrl, version: int
) -> None:
    legacy_url, migrated_url = new_url(), new_url()
    legacy, migrated = _engine(legacy_url), _engine(migrated_url)
    with legacy.begin() as conn:
        legacy_store.build(conn, version)
        expected = _schema(conn)
    with migrated.begin() as conn:
        migrations.upgrade(conn, migrations.revision_of(version))
        assert _schema(conn) == expected
    legacy.dispose()
    migrated.dispose()


def test_the_migrated_schema_is_the_models(new_url: NewUrl) -> None:
    url = new_url()
    open_database(url).close()
    assert _differences(url) == []


def test_a_model_changed_without_a_revision_is_caught(new_url: NewUrl) -> None:
    url = new_url()
    open_database(url).close()
    changed = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables[Setting.__tablename__].append_column(Column("added", Integer))
    diff = _differences(url, changed)
    assert [(d[0], d[3].name) for d in diff] == [("add_column", "added")]


def test_a_failed_upgrade_changes_nothing(new_url: NewUrl) -> None:
    url = new_url()
    engine = _engine(url)
    with engine.begin() as conn:
        legacy_store.build(conn, 2)
        # In the way of revision 0004, after 0003 has made its tables.
        conn.execute(text("CREATE TABLE bids (id INTEGER PRIMARY KEY)"))
    with pytest.raises(StoreError):
        open_database(url)
    with engine.begin() as conn:
        tables = set(inspect(conn).get_table_names())
        assert "onboarding" not in tables and migrations.VERSION_TABLE not in tables
        assert conn.scalar(text("SELECT version FROM schema_version")) == 2
    engine.dispose()


def test_a_database_from_a_newer_dms_is_refused(new_url: NewUrl) -> None:
    url = new_url()
    open_database(url).close()
    engine = _engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    with pytest.raises(StoreError, match="version 999 is newer than this dms supports"):
        open_database(url)
    engine.dispose()


def test_a_revision_no_dms_writes_is_damage_not_a_newer_dms(
    new_url: NewUrl, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh database whose Alembic revision holds what no dms writes ('garbage': a hand
    edit, disk trouble) was "database schema version garbage is newer than this dms
    supports; upgrade dms", which no upgrade fixes. ``schema_version`` (kept at the same
    revision) says which schema it is: the revision is written again from it, with a
    warning. Without it, the open fails saying the row is damaged and what to write."""
    url = new_url()
    open_database(url).close()
    engine = _engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'garbage'"))
    open_database(url).close()
    assert _versions(url) == (migrations.HEAD, LATEST_VERSION)
    [warned] = [r.getMessage() for r in caplog.records if "alembic_version held" in r.getMessage()]
    assert f"'garbage', which is no schema revision of dms: written again as {migrations.HEAD}" in (
        warned
    )
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'garbage'"))
        conn.execute(text("DELETE FROM schema_version"))
    with pytest.raises(StoreError) as refused:
        open_database(url)
    said = str(refused.value)
    assert said.startswith("the store is damaged: alembic_version holds 'garbage', which is no "
                           "schema revision of dms (this one knows 0001 to "), said  # fmt: skip
    assert "newer" not in said and f"{migrations.HEAD} if this dms made them" in said, said
    # The client of this backend, on this database (it said sqlite3 on PostgreSQL too).
    given = make_url(url)
    if given.get_backend_name() == "sqlite":
        assert f"(sqlite3 {given.database}, alembic_version.version_num: " in said, said
    else:
        plain = given.set(drivername="postgresql")._replace(password=None)
        assert f"(psql '{plain.render_as_string()}', alembic_version" in said, said
        assert "sqlite3" not in said and given.password not in said, said
    with engine.begin() as conn:  # refused, and untouched
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == "garbage"
    engine.dispose()


@pytest.mark.parametrize("garbage", ["\u00b2", "\u0660\u0660\u0660\u0667"])
def test_a_revision_of_digits_no_dms_writes_is_damage_too(new_url: NewUrl, garbage: str) -> None:
    """Digits that are not ASCII ('²', Arabic-Indic '٠٠٠٧') are no revision a dms writes
    either: '²' raised ValueError out of every open (str.isdigit says yes, int() no),
    '٠٠٠٧' was a newer dms's revision 7 ('upgrade dms'). Written again from
    ``schema_version``, as any other garbage is."""
    url = new_url()
    open_database(url).close()
    engine = _engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": garbage})
    open_database(url).close()
    assert _versions(url) == (migrations.HEAD, LATEST_VERSION)
    engine.dispose()


def test_a_legacy_database_from_a_newer_dms_is_refused(new_url: NewUrl) -> None:
    url = new_url()
    engine = _engine(url)
    with engine.begin() as conn:
        legacy_store.build(conn, 5)
        conn.execute(text("UPDATE schema_version SET version = :v"), {"v": LATEST_VERSION + 1})
    with pytest.raises(StoreError, match="newer than this dms supports"):
        open_database(url)
    with engine.begin() as conn:  # refused, and untouched
        assert migrations.VERSION_TABLE not in inspect(conn).get_table_names()
    engine.dispose()


def test_processes_opening_a_fresh_database_at_once_migrate_it_once(new_url: NewUrl) -> None:
    url = new_url()
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_it() -> None:
        try:
            start.wait()
            open_database(url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _versions(url) == (migrations.HEAD, LATEST_VERSION)


def test_a_bare_postgresql_url_means_psycopg() -> None:
    assert _driver_url("postgresql://u:p@h:5/d") == "postgresql+psycopg://u:p@h:5/d"
    assert _driver_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert _driver_url("sqlite:///x.db") == "sqlite:///x.db"


def test_drafting_a_revision_with_no_model_change_writes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dms.store.migrations.__main__ import main

    before = sorted((migrations.SCRIPTS / "versions").glob("*.py"))
    assert main(["revision", "nothing changed"]) == 1
    assert "nothing to write" in capsys.readouterr().out
    assert sorted((migrations.SCRIPTS / "versions").glob("*.py")) == before
