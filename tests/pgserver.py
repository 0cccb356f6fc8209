"""Store URLs for tests that run on SQLite and on PostgreSQL.

PostgreSQL comes from ``DMS_TEST_POSTGRES_URL`` (``.ci/run`` starts a
throwaway server and sets it). When it is set, a server that cannot be reached
fails the test: CI must not quietly skip PostgreSQL. When it is unset, the
first test that needs PostgreSQL starts a throwaway server with
``.ci/postgres`` if this machine has the binaries (stopped when the test run
ends), and the tests are skipped, saying why, if it does not.

Every test gets a store of its own: a fresh SQLite file, or a fresh schema
(the URL sets its ``search_path``) that is dropped afterwards.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.pool import NullPool

ENV = "DMS_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")
SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "postgres"

_lock = threading.Lock()
_server: tuple[str | None, str] | None = None  # (url, why not) once known


def _start_throwaway() -> tuple[str | None, str]:
    folder = tempfile.mkdtemp(prefix="dms-test-pg-")
    run = subprocess.run(
        ["bash", str(SCRIPT), "start", folder], capture_output=True, text=True, timeout=120
    )
    if run.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", folder], capture_output=True, timeout=60)
        why = "no PostgreSQL binaries (initdb) on this machine"
        if run.returncode != 3:
            why = f"a throwaway PostgreSQL did not start: {run.stderr.strip()[-500:]}"
        return None, f"{why}; set {ENV} to test on PostgreSQL"
    atexit.register(
        subprocess.run, ["bash", str(SCRIPT), "stop", folder], capture_output=True, timeout=60
    )
    return run.stdout.strip().splitlines()[-1], ""


def server_url() -> str:
    """The PostgreSQL server's URL; skips (variable unset, no server) or fails (unreachable)."""
    global _server
    with _lock:
        if _server is None:
            given = os.environ.get(ENV)
            _server = (given, "") if given else _start_throwaway()
    url, why = _server
    if url is None:
        pytest.skip(why)
    try:
        with _admin(url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.fail(f"PostgreSQL at {ENV} is unreachable: {str(exc).splitlines()[0]}")
    return url


_admins: dict[str, Engine] = {}


def _admin(url: str) -> Engine:
    if url not in _admins:
        _admins[url] = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    return _admins[url]


def schema_url(url: str, schema: str) -> str:
    """``url`` with ``schema`` first on the search path: everything dms makes goes there."""
    # application_name tags its connections, so that the schema's teardown can end them.
    query = {"options": f"-csearch_path={schema}", "application_name": schema}
    parsed = make_url(url).update_query_dict(query)
    return parsed.render_as_string(hide_password=False)


@contextmanager
def new_schema() -> Iterator[str]:
    """A URL whose tables live in a fresh schema of the test server, dropped at the end."""
    url = server_url()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with _admin(url).connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield schema_url(url, schema)
    finally:
        with _admin(url).connect() as conn:
            # A test that failed may have left connections holding locks in the schema.
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :s AND pid <> pg_backend_pid()"
                ),
                {"s": schema},
            )
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


@contextmanager
def store_url(backend: str, folder: Path | None = None) -> Iterator[str]:
    """A URL of an empty store of its own on ``backend`` ("sqlite" or "postgresql")."""
    if backend == "postgresql":
        with new_schema() as url:
            yield url
        return
    if folder is not None:
        yield f"sqlite:///{folder / f'dms-{uuid.uuid4().hex[:8]}.db'}"
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield f"sqlite:///{Path(tmp) / 'dms.db'}"
