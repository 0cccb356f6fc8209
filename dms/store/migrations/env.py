"""Alembic's environment for the store's revisions.

At run time :func:`dms.store.migrations.migrate` hands over the connection it
opened (``config.attributes["connection"]``), already inside the one
transaction of the whole upgrade: Alembic then begins none of its own. Without
one (``python -m dms.store.migrations revision``), it connects to
``sqlalchemy.url`` itself.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from dms.store.models import Base


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters a table by copying it: autogenerate writes batch operations for it.
        render_as_batch=connection.dialect.name == "sqlite",
        process_revision_directives=context.config.attributes.get("process_revision_directives"),
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("dms store migrations run online only (no --sql)")

given = context.config.attributes.get("connection")
if given is not None:
    run(given)
else:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        run(conn)
    engine.dispose()
