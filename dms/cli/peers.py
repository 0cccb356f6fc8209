"""``dms peers``: friendly names for the ``/dms/node/peers/*`` behaviours."""

from __future__ import annotations

from typing import Annotated

import typer

from dms.cli.actor import TimeoutOption
from dms.cli.common import JsonOption, settings
from dms.cli.output import emit_result
from dms.node.client import NodeClient

app = typer.Typer(help="This node's peers: list, self, ping, connect.")


def _call(behaviour: str, payload: dict[str, str] | None, timeout: float, json_out: bool) -> None:
    result = NodeClient(settings().home).invoke(behaviour, payload, timeout=timeout)
    emit_result(result, json_out, title=behaviour)


@app.command("list")
def list_peers(timeout: TimeoutOption = 10.0, json_out: JsonOption = False) -> None:
    """Peers this node is connected to."""
    _call("/dms/node/peers/list", None, timeout, json_out)


@app.command("self")
def self_info(timeout: TimeoutOption = 10.0, json_out: JsonOption = False) -> None:
    """This node's peer id, DID and listen addresses."""
    _call("/dms/node/peers/self", None, timeout, json_out)


@app.command("ping")
def ping(
    peer_id: Annotated[str, typer.Argument(help="Peer id to ping.")],
    timeout: TimeoutOption = 10.0,
    json_out: JsonOption = False,
) -> None:
    """Round-trip time to a peer (libp2p ping)."""
    _call("/dms/node/peers/ping", {"peer_id": peer_id}, timeout, json_out)


@app.command("connect")
def connect(
    address: Annotated[str, typer.Argument(help="Multiaddr ending in /p2p/<peer id>.")],
    timeout: TimeoutOption = 10.0,
    json_out: JsonOption = False,
) -> None:
    """Dial a peer."""
    _call("/dms/node/peers/connect", {"address": address}, timeout, json_out)
