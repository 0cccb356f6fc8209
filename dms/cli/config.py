"""``dms config``: the effective configuration."""

from __future__ import annotations

from typing import Any

import typer

from dms.cli.common import JsonOption, settings
from dms.cli.output import emit_fields, emit_json
from dms.config import Settings

app = typer.Typer(help="Show the effective configuration.")


@app.command("show")
def show(json_out: JsonOption = False) -> None:
    """Defaults, overridden by DMS_HOME/config.toml, overridden by DMS_* variables; while
    this home's node runs, the settings it runs with (its 'dms run' flags included)."""
    cfg = settings()
    data = _running(cfg)
    if data is None:
        data = {**cfg.shown(), "daemon": None}
    if json_out:
        emit_json(data)
    else:
        daemon = data.pop("daemon")
        title = "configuration"
        if daemon:
            title += f" of the running node (pid {daemon['pid']})"
        emit_fields(data, title=title)


def _running(cfg: Settings) -> dict[str, Any] | None:
    """The running daemon's effective settings, or None when no node runs for this home."""
    from dms.node.api import ApiClient, ApiError
    from dms.node.home import NODE_KEY
    from dms.security import Keystore

    keystore = Keystore(cfg.home)
    if not keystore.exists(NODE_KEY):
        return None
    try:
        return ApiClient(cfg.home, keystore.info(NODE_KEY).peer_id).config()
    except ApiError:
        return None
