"""Hot-path statements on the driver's connection (dms/store/sql.py), on both backends."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError

from dms.orchestrator.store import DeploymentStore
from dms.store import open_database
from dms.store.sql import Statement
from tests import pgserver

_PUT = Statement(
    "INSERT INTO node_settings (key, value) VALUES (:key, :value)"  # value: a JSON column's text
)
_GET = Statement("SELECT value FROM node_settings WHERE key = :key")


@pytest.mark.parametrize("backend", pgserver.BACKENDS)
def test_a_statement_is_part_of_its_transaction(backend: str) -> None:
    """Rolled back with the Core transaction it runs in; committed with it."""
    with pgserver.store_url(backend) as url:
        db = open_database(url)
        with pytest.raises(RuntimeError), db.transaction() as conn:
            _PUT.run(conn, {"key": "a", "value": '"kept?"'})
            raise RuntimeError("the transaction fails after the insert")
        assert db.get_setting("a") is None
        with db.transaction() as conn:
            _PUT.run(conn, {"key": "b", "value": '{"n": 1}'})
        assert db.get_setting("b") == {"n": 1}  # read back by SQLAlchemy's JSON type
        with db.transaction() as conn:
            assert _GET.run(conn, {"key": "missing"}).fetchone() is None


@pytest.mark.parametrize("backend", pgserver.BACKENDS)
def test_a_driver_error_is_raised_as_sqlalchemys(backend: str) -> None:
    """Callers catch SQLAlchemyError (a store that refuses writes): the driver's own
    errors must arrive as that, as a Core statement's do."""
    with pgserver.store_url(backend) as url:
        db = open_database(url)
        with pytest.raises(SQLAlchemyError) as raised, db.transaction() as conn:
            Statement("SELECT nothing FROM no_such_table WHERE x = :x").run(conn, {"x": 1})
        assert isinstance(raised.value, (OperationalError, ProgrammingError))
        assert "no_such_table" in str(raised.value)


def test_parameters_render_in_the_drivers_style() -> None:
    """``:name`` becomes ``%(name)s`` for psycopg; a cast's ``::`` and a literal ``%`` stay
    what they mean."""

    class Dialect:
        name = "postgresql"
        paramstyle = "pyformat"

    class Conn:
        dialect = Dialect()

    statement = Statement("SELECT :a::json, ref LIKE 'x%' FROM t WHERE id = :id_2")
    assert (
        statement._text(Conn()) == "SELECT %(a)s::json, ref LIKE 'x%%' FROM t WHERE id = %(id_2)s"
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", pgserver.BACKENDS)
def test_a_deployment_saved_twice_reads_back_as_saved(backend: str) -> None:
    """Insert, then update, of every column (JSON ones as their text)."""
    with pgserver.store_url(backend) as url:
        store = DeploymentStore(open_database(url))
        row = {
            "id": "d1", "name": "n", "state": "bidding", "spec": {"name": "n", "x": [1, 2]},
            "slots": [{"slot": "w", "status": "open"}], "events": [{"at": 1.5, "what": "e"}],
            "created_at": 1.0, "running_at": None, "ended_at": None,
        }  # fmt: skip
        store.save(row)
        store.save({**row, "state": "running", "running_at": 2.0, "slots": []})
        got = store.get("d1")
        assert got is not None
        assert got["state"] == "running" and got["running_at"] == 2.0 and got["slots"] == []
        assert got["spec"] == {"name": "n", "x": [1, 2]}
        assert got["events"] == [{"at": 1.5, "what": "e"}]


@pytest.mark.parametrize("backend", pgserver.BACKENDS)
def test_json_columns_read_as_text_give_back_the_values_written(backend: str) -> None:
    """What ``as_text`` reads is parsed by the reader (``json_value``): on PostgreSQL too,
    where psycopg parsed a ``json`` column itself and a stored string came back bare
    ("42" read as the number 42, "hello" as not JSON: a setting taken as not set)."""
    values = ["hello", "42", "true", 42, 1.5, True, [1, "a"], {"n": {"m": "1"}}]
    with pgserver.store_url(backend) as url:
        db = open_database(url)
        for at, value in enumerate(values):
            db.put_setting(f"k{at}", value)
        assert [db.get_setting(f"k{at}") for at in range(len(values))] == values
