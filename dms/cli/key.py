"""``dms key``: the node's and the user's keys."""

from __future__ import annotations

from typing import Annotated

import typer

from dms.cli.common import JsonOption, settings
from dms.cli.output import emit_fields, emit_json, emit_table
from dms.security import Keystore

app = typer.Typer(help="Create and inspect keys (contexts: dms = the node, user = you).")

ContextArg = Annotated[str, typer.Argument(help="Key context, e.g. 'dms' or 'user'.")]


@app.command("new")
def new(context: ContextArg, json_out: JsonOption = False) -> None:
    """Create a key, encrypted with a passphrase (DMS_PASSPHRASE or a prompt)."""
    info = Keystore(settings().home).new(context)
    if json_out:
        emit_json(info.model_dump())
    else:
        emit_fields(info.model_dump(), title=f"new key '{context}'")


@app.command("did")
def did(context: ContextArg, json_out: JsonOption = False) -> None:
    """Print the DID of a key (no passphrase needed)."""
    info = Keystore(settings().home).info(context)
    if json_out:
        emit_json({"context": context, "did": info.did, "peer_id": info.peer_id})
    else:
        typer.echo(info.did)


@app.command("list")
def list_keys(json_out: JsonOption = False) -> None:
    """List the keys in DMS_HOME."""
    keys = Keystore(settings().home).list()
    if json_out:
        emit_json([k.model_dump() for k in keys])
    else:
        emit_table(
            "keys",
            ["context", "did", "peer id", "created"],
            [(k.context, k.did, k.peer_id, k.created_at) for k in keys],
            whole=["did", "peer id"],
            hideable=["peer id", "created"],
        )
