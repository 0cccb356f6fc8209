"""Schema migrations: Alembic revisions in ``versions/``, each one frozen DDL.

A revision says, in ``op.create_table`` and friends, exactly what it changes;
none reads today's models, so a shipped revision never changes behind anyone's
back. A model change goes with a new revision (``python -m dms.store.migrations
revision "what"`` drafts it); a test compares the migrated schema with the
models and fails when they differ. Revision ids are ``0001``, ``0002``, ... in
one line, and the number of the newest is :data:`LATEST_VERSION`.

:func:`migrate` runs inside the caller's transaction, so an upgrade lands whole
or not at all. Databases made before Alembic carry only ``schema_version`` =
N: they are stamped at revision N first, then upgraded. ``schema_version`` is
kept at the newest number applied, so those older dms releases still refuse a
newer database instead of running on it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, column, inspect, select, table, text, update
from sqlalchemy.types import DateTime, Integer

from dms.store.errors import StoreError, client_command

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("dms.store")

SCRIPTS = Path(__file__).parent
VERSION_TABLE = "alembic_version"  # Alembic's own: the revision applied
LEGACY_TABLE = "schema_version"  # before Alembic: the number of the newest migration

_legacy = table(
    LEGACY_TABLE,
    column("id", Integer),
    column("version", Integer),
    column("updated_at", DateTime(timezone=True)),
)


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code: no alembic.ini on disk."""
    from alembic.config import Config  # only to migrate: importing Alembic costs ~0.1 s

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


# The revision ids, oldest first, from the file names (``0003_what.py``): every open
# needs them and Alembic is not loaded for that. A test checks that Alembic agrees.
REVISIONS = tuple(sorted(p.name[:4] for p in (SCRIPTS / "versions").glob("[0-9]" * 4 + "_*.py")))
HEAD = REVISIONS[-1]
LATEST_VERSION = int(HEAD)


def number(revision: str) -> int:
    return int(revision)


def revision_of(version: int) -> str:
    """The revision that a legacy ``schema_version`` number stands for."""
    return f"{version:04d}"


def current(conn: Connection) -> tuple[str | None, int | None]:
    """The Alembic revision and the legacy number of this database (``None`` where absent)."""
    tables = set(inspect(conn).get_table_names())
    revision = None
    if VERSION_TABLE in tables:
        revision = conn.scalar(text(f"SELECT version_num FROM {VERSION_TABLE}"))
    legacy = None
    if LEGACY_TABLE in tables:
        legacy = conn.scalar(select(_legacy.c.version).where(_legacy.c.id == 1))
    return revision, legacy


def upgrade(conn: Connection, target: str = "head") -> None:
    """Run the revisions up to ``target`` on ``conn``, in its transaction."""
    from alembic import command

    command.upgrade(config(conn), target)


def stamp(conn: Connection, revision: str) -> None:
    """Record ``revision`` as applied without running anything, in ``conn``'s transaction."""
    from alembic import command

    command.stamp(config(conn), revision)


def migrate(conn: Connection) -> int:
    """Bring the schema to the newest revision in the caller's transaction; the version.

    It raises :class:`StoreError` for a database from a newer dms.
    """
    _queue(conn)
    revision, legacy = current(conn)
    if legacy is not None and not isinstance(legacy, int):
        # Text where the number belongs (SQLite keeps what a hand edit writes): compared
        # with a number below, it raised TypeError out of every open of the database.
        if revision is None:
            raise StoreError(
                f"the store is damaged: {LEGACY_TABLE} holds {legacy!r} where the schema's "
                "number belongs, and no Alembic revision says which it is; correct that row "
                f"of the database ({client_command(conn.engine.url)}, {LEGACY_TABLE}.version), "
                "then try again"
            )
        legacy = None  # the Alembic revision says which schema this is; _mark writes it
    if revision is not None and revision not in REVISIONS and not _newer(revision):
        revision = _unknown_revision(conn, revision, legacy)
    if (legacy or 0) > LATEST_VERSION or (revision is not None and revision not in REVISIONS):
        found = revision if revision is not None else revision_of(legacy or 0)
        raise StoreError(
            f"database schema version {number(found)} is newer than this dms supports "
            f"({LATEST_VERSION}); upgrade dms"
        )
    if revision == HEAD and legacy == LATEST_VERSION:
        return LATEST_VERSION  # the common case: nothing to do, Alembic not even loaded
    if revision is None and legacy:
        # Made before Alembic: its schema is exactly revision N's, so say so, then go on.
        stamp(conn, revision_of(legacy))
    elif revision is None and legacy is not None:
        # A marker table with no number never committed with anything else (the old
        # code wrote both in one transaction): it holds nothing, and 0001 makes it.
        conn.execute(text(f"DROP TABLE {LEGACY_TABLE}"))
    upgrade(conn)
    _mark(conn)
    return LATEST_VERSION


def _newer(revision: str) -> bool:
    """Whether ``revision`` is one a newer dms would write (ids are numbers, in one line:
    ASCII digits; ``str.isdigit`` also says yes to '²', which ``int`` refuses)."""
    return revision.isascii() and revision.isdigit() and int(revision) > LATEST_VERSION


def _unknown_revision(conn: Connection, revision: object, legacy: int | None) -> str:
    """The Alembic revision holds what no dms writes (a hand edit, disk trouble): it was
    called a newer schema, and the user told to upgrade dms. ``schema_version``, kept at
    the same revision's number, says which schema it is: written again from it, with a
    warning. Without that, the open fails in one line naming the row."""
    if legacy is None or not 0 < legacy <= LATEST_VERSION:
        raise StoreError(
            f"the store is damaged: {VERSION_TABLE} holds {revision!r}, which is no schema "
            f"revision of dms (this one knows {REVISIONS[0]} to {HEAD}), and "
            f"{LEGACY_TABLE} does not say which it is either; correct that row of the "
            f"database ({client_command(conn.engine.url)}, {VERSION_TABLE}.version_num: the "
            f"revision its tables are at, {HEAD} if this dms made them), then try again"
        )
    found = revision_of(legacy)
    log.warning("the store's %s held %r, which is no schema revision of dms: written again "
                "as %s, the revision %s says", VERSION_TABLE, revision, found,
                LEGACY_TABLE)  # fmt: skip
    conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = :found"), {"found": found})
    return found


def _queue(conn: Connection) -> None:
    """Let only one process migrate a database at a time.

    SQLite's ``BEGIN IMMEDIATE`` already holds the write lock. PostgreSQL would
    let two processes that open a fresh database both create the same tables,
    so they queue on an advisory lock for this schema, held until commit.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext('dms.store.migrate:' || current_schema()))")
        )


def _mark(conn: Connection) -> None:
    now = datetime.now(UTC)
    values = {"version": LATEST_VERSION, "updated_at": now}
    done = conn.execute(update(_legacy).where(_legacy.c.id == 1).values(**values))
    if done.rowcount == 0:
        conn.execute(_legacy.insert().values(id=1, **values))
