"""Statements of the hot paths, run on the driver's own connection.

A Core statement costs 35-90 µs of Python before SQLite sees it (coercing its
clauses, its cache key, the execution context, the result's metadata), where
SQLite itself takes ~5 µs: a bid's transaction was ~0.7 ms, nearly all of it
SQLAlchemy (``bench/placement.py``, ``specs/orchestration.md``). A
:class:`Statement` is written once as SQL with ``:name`` parameters and run on
the DBAPI connection beneath the Core connection of a
:meth:`dms.store.Database.transaction`, so it is part of that transaction (its
lock, its commit or rollback). The SQL must mean the same on SQLite and on
PostgreSQL; parameters are given in the driver's own style (``:name`` for
sqlite3, ``%(name)s`` for psycopg). Columns of plain types only: a JSON value
is passed as the text of the JSON (:func:`json_text`), a time as a float. The
driver's errors are raised as SQLAlchemy's (``OperationalError``, ...), as a
Core statement's are: callers catch ``SQLAlchemyError`` either way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import JSON, ColumnElement, Connection, Table, Text, cast
from sqlalchemy.exc import DBAPIError

_PARAM = re.compile(r"(?<![:\w]):(\w+)")


def as_text(table: Table, names: Iterable[str] | None = None) -> list[ColumnElement[Any]]:
    """``table``'s columns (those ``names``, in their order) to select, its JSON columns
    as their stored text, for the reader to parse each row's on its own: a column that
    is not JSON, read as SQLAlchemy's JSON type, raised out of the whole read
    (``dms.orchestrator.stored``, ``dms.network.peerbook``). A cast, not a coercion:
    psycopg parses a PostgreSQL ``json`` column itself, and a stored string (``"42"``,
    ``"hello"``) came back as the bare text, which :func:`json_value` then read as 42, or
    as not JSON."""
    columns = [table.c[n] for n in names] if names is not None else list(table.c)
    return [cast(c, Text).label(c.name) if isinstance(c.type, JSON) else c for c in columns]


def json_value(text: Any) -> Any:
    """A JSON column's value from what :func:`as_text` read of it: its text parsed (a
    value stored as a number, as SQLite keeps one written by hand, as it is). Raises
    ``ValueError`` for text that is not JSON."""
    return json.loads(text) if isinstance(text, str | bytes) else text


def json_text(value: Any) -> str:
    """A JSON column's value as the text to store (what SQLAlchemy's JSON type stores)."""
    return json.dumps(value)


class Statement:
    """One SQL statement with ``:name`` parameters, rendered once per parameter style."""

    __slots__ = ("_by_style", "sql")

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self._by_style: dict[str, str] = {}

    def _text(self, conn: Connection) -> str:
        dialect = conn.dialect
        # sqlite3 says "qmark" but takes ``:name`` as well.
        style = "named" if dialect.name == "sqlite" else dialect.paramstyle
        text = self._by_style.get(style)
        if text is None:
            if style == "named":
                text = self.sql
            elif style == "pyformat":
                text = _PARAM.sub(r"%(\1)s", self.sql.replace("%", "%%"))
            else:
                raise ValueError(f"no rendering of {self.sql!r} for parameter style {style!r}")
            self._by_style[style] = text
        return text

    def run(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Any:
        """Execute in ``conn``'s transaction; returns the driver's cursor (``fetchone``,
        ``fetchall``, ``rowcount``)."""
        text = self._text(conn)
        driver = conn.connection.driver_connection
        assert driver is not None
        try:
            return driver.execute(text, params or {})
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrapped(conn, text, params, exc) from exc

    def run_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Execute once per row of parameters, in ``conn``'s transaction."""
        text = self._text(conn)
        driver = conn.connection.driver_connection
        assert driver is not None
        cursor = driver.cursor()
        try:
            cursor.executemany(text, rows)
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrapped(conn, text, rows, exc) from exc
        finally:
            cursor.close()


def run_driver(conn: Connection, sql: str) -> None:
    """One statement with no parameters on ``conn``'s driver connection (``BEGIN``)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    try:
        driver.execute(sql)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, sql, None, exc) from exc


def _wrapped(conn: Connection, text: str, params: Any, exc: Exception) -> BaseException:
    """The driver's error as SQLAlchemy raises it for a Core statement."""
    return DBAPIError.instance(
        text, params, exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
    )
