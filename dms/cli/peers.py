"""``dms peers``: friendly names for the ``/dms/node/peers/*`` behaviours."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from dms.cli.actor import TimeoutOption
from dms.cli.common import JsonOption, dialable, settings
from dms.cli.output import ago, build_table, console, emit_json, emit_result, jsonable, short_peer
from dms.node.client import NodeClient
from dms.node.home import NodeError
from dms.security.identity import is_peer_id

app = typer.Typer(help="This node's peers: list, self, ping, connect.")


def _call(behaviour: str, payload: dict[str, str] | None, timeout: float, json_out: bool) -> None:
    result = NodeClient(settings().home).invoke(behaviour, payload, timeout=timeout)
    emit_result(result, json_out, title=behaviour)


def _pair(row: dict[str, Any], key: str) -> str:
    free, total = row.get("free", {}).get(key), row.get("onboarded", {}).get(key)
    return "" if total is None else f"{free:g}/{total:g}"


ROWS = 20  # peers shown without --all


@app.command("list")
def list_peers(
    every: Annotated[bool, typer.Option("--all", help="Every peer, not the first 20.")] = False,
    timeout: TimeoutOption = 10.0,
    json_out: JsonOption = False,
) -> None:
    """Peers known from heartbeats or connections: status, free/total resources, scores."""
    rows = NodeClient(settings().home).invoke("/dms/node/peers/list", None, timeout=timeout)
    if json_out:
        emit_json(jsonable(rows))
        return
    if not rows:
        console.print(
            "no peers known yet: they appear as their heartbeats arrive "
            "(dms run --bootstrap ADDRESS, or dms peers connect ADDRESS)",
            highlight=False,
        )
        return
    now = time.time()
    table = []
    for row in rows:
        scores = row.get("scores") or {}
        seen = row.get("last_seen_s")
        table.append(
            [
                row["peer_id"],
                row.get("status", ""),
                "" if seen is None else ago(now - seen, now),
                _pair(row, "cpu"),
                _pair(row, "ram_gib"),
                _pair(row, "disk_gib"),
                _score(scores.get("cpu_single_mops")),
                _score(scores.get("ckks_mul_per_s")),
                row.get("restarts", ""),
            ]
        )
    columns = ["peer id", "status", "seen", "cpu", "ram GiB", "disk GiB",
               "cpu Mops", "ckks mul/s", "restarts"]  # fmt: skip
    title = "peers (resources: free/total)"
    limit = None if every else ROWS
    shape = {"whole": ["peer id"], "hideable": columns[2:], "limit": limit}
    shown, notes = build_table(title, columns, table, **shape)
    if any("not shown" in note for note in notes):
        # A whole peer id leaves no room for the resources: the ids by their end instead
        # (as 'dms deployment manifest' names peers), and the resources shown.
        short = [[short_peer(r[0]), *r[1:]] for r in table]
        shown, notes = build_table(title, ["peer", *columns[1:]], short, **shape)
        notes.append("(peers by the end of their id: --json shows them whole)")
    console.print(shown)
    for note in notes:
        console.print(note)


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


@app.command("self")
def self_info(timeout: TimeoutOption = 10.0, json_out: JsonOption = False) -> None:
    """This node's peer id, DID and the addresses other nodes dial (for --bootstrap)."""
    info = NodeClient(settings().home).invoke("/dms/node/peers/self", None, timeout=timeout)
    info = {**info, "addrs": dialable(list(info.get("addrs") or []))}
    if json_out:
        emit_json(jsonable(info))
        return
    # Plain lines, never wrapped nor split: each address is copied whole into --bootstrap.
    typer.echo(f"peer id: {info['peer_id']}\ndid:     {info['did']}")
    typer.echo(f"reachability: {info.get('reachability', 'unknown')}")
    typer.echo("addresses (give one to --bootstrap on another node):")
    for addr in info["addrs"]:
        typer.echo(addr)


@app.command("ping")
def ping(
    peer_id: Annotated[str, typer.Argument(help="Peer id to ping.")],
    timeout: TimeoutOption = 10.0,
    json_out: JsonOption = False,
) -> None:
    """Round-trip time to a peer (libp2p ping)."""
    if not is_peer_id(peer_id):  # the node said 'peer X is unreachable: no known address'
        raise NodeError(
            f"{peer_id!r} is not a peer id (12D3KooW..., as dms peers list --json shows them)"
        )
    _call("/dms/node/peers/ping", {"peer_id": peer_id}, timeout, json_out)


@app.command("connect")
def connect(
    address: Annotated[str, typer.Argument(help="Multiaddr ending in /p2p/<peer id>.")],
    timeout: TimeoutOption = 10.0,
    json_out: JsonOption = False,
) -> None:
    """Dial a peer."""
    _call("/dms/node/peers/connect", {"address": address}, timeout, json_out)
