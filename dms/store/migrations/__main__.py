"""``python -m dms.store.migrations revision "what changes"``: draft the next revision.

It compares the models with a scratch SQLite database at the newest revision
and writes ``versions/NNNN_what_changes.py`` with the difference (batch
operations, which SQLite needs to alter a table and PostgreSQL runs as plain
ALTERs). A draft: read it and fix what autogenerate cannot see (renames, data
moves) before it ships; from then on it is frozen.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from alembic import command

from dms.store.db import Database
from dms.store.migrations import LATEST_VERSION, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dms.store.migrations")
    commands = parser.add_subparsers(dest="command", required=True)
    draft = commands.add_parser("revision", help="draft the next revision from the models")
    draft.add_argument("message", help="what the revision changes, a few words")
    args = parser.parse_args(argv)

    empty: list[bool] = []

    def skip_empty(_context: Any, _revision: Any, directives: list[Any]) -> None:
        if directives[0].upgrade_ops.is_empty():
            empty.append(True)
            directives[:] = []

    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{scratch}/head.db"
        Database(url).close()
        cfg = config()
        cfg.set_main_option("sqlalchemy.url", url)
        cfg.attributes["process_revision_directives"] = skip_empty
        command.revision(
            cfg, message=args.message, autogenerate=True, rev_id=f"{LATEST_VERSION + 1:04d}"
        )
    if empty:
        print("the models match the newest revision: nothing to write")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
