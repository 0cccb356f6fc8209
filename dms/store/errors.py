"""The store's errors, apart from the chunk store's own."""

from __future__ import annotations

import shlex

from sqlalchemy import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.util import asbool

from dms.backoff import Backoff
from dms.errors import DmsError

STORE_REFUSED = "store_refused"  # the refusal of a request the store could not serve
# Store work a busy or refusing store turned down, asked again: after this, doubling.
STORE_RETRY = Backoff(first_s=0.5, max_s=30.0)


class StoreError(DmsError):
    """A database that cannot be opened or is from a newer dms."""


class StoreBusy(StoreError):
    """A transaction that would have waited longer than its caller may (``wait_s``, or
    the thread's bound: ``Database.waiting_at_most``): another process (or another
    transaction of this one) holds the store. Answered ``store_refused`` when it
    escapes a behaviour's handler."""

    code = STORE_REFUSED


# What the store raises when it cannot serve a transaction: the driver's errors (as
# SQLAlchemy's), or a wait past the caller's bound. ``except STORE_ERRORS``.
STORE_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, StoreBusy)


# libpq's connection parameters that are secrets: a URL may give them in its query
# (``?password=...``; SQLAlchemy hands the query to the driver), never shown.
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


# What the damage messages say instead of a client for a SQLite database in memory.
IN_MEMORY = "SQLite in memory: no file to open, only this process reaches it"


def sqlite_in_memory(url: URL) -> bool:
    """Whether pysqlite opens the SQLite database at ``url`` in memory: no database
    (``sqlite://``), ``:memory:``, or with ``uri=true`` a ``file:`` URI whose path is
    ``:memory:`` or whose ``mode`` is ``memory``. Without ``uri=true`` the driver drops
    the query, ``mode=memory`` with it, and opens the file named (``file:x``)."""
    database = url.database or ""
    if database in ("", ":memory:"):
        return True
    if not asbool(url.query.get("uri", False)) or not database.startswith("file:"):
        return False  # a file name, not a URI (SQLite reads only file: ones as URIs)
    return url.query.get("mode") == "memory" or database == "file::memory:"


def client_command(url: URL) -> str:
    """The command that opens the database at ``url`` for a person to correct a row the
    store cannot read: ``sqlite3 FILE``, ``psql URL`` (its password left out, after
    the user or in the query: psql asks; the rest of the query kept, so a schema given
    by ``options=-csearch_path=...`` is the one opened), else the backend's own client.
    Damage messages name it: they named ``sqlite3 DMS_HOME/dms.db`` on PostgreSQL too.
    A SQLite database in memory (``sqlite://``, ``:memory:``, a ``mode=memory`` URI)
    has no file a client could open: :data:`IN_MEMORY` (it was ``sqlite3 ''``)."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        if sqlite_in_memory(url):
            return IN_MEMORY
        return f"sqlite3 {shlex.quote(url.database or '')}"
    query = {k: v for k, v in url.query.items() if k not in SECRET_PARAMETERS}
    plain = URL.create(backend, url.username, None, url.host, url.port, url.database, query)
    shown = shlex.quote(plain.render_as_string(hide_password=False))
    return f"psql {shown}" if backend == "postgresql" else f"the {backend} client on {shown}"
