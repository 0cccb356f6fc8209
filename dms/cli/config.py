"""``dms config``: the effective configuration."""

from __future__ import annotations

import typer

from dms.cli.common import JsonOption, settings
from dms.cli.output import emit_fields, emit_json

app = typer.Typer(help="Show the effective configuration.")


@app.command("show")
def show(json_out: JsonOption = False) -> None:
    """Defaults, overridden by DMS_HOME/config.toml, overridden by DMS_* variables."""
    data = settings().shown()
    if json_out:
        emit_json(data)
    else:
        emit_fields(data, title="configuration")
