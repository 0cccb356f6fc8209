"""``dms status [--watch]``: this node on one screen.

The node (id, uptime, connections), its resources, its peers, its deployments and
its mining sessions, from the behaviours the other commands use: ``/public/status``,
``/dms/node/resources/pools``, ``/dms/node/peers/list``,
``/dms/node/deployment/list`` and ``/dms/node/mining/status``. With ``--watch`` the
screen is redrawn in place (rich ``Live``) until Ctrl-C; with ``--json`` each
refresh is one JSON document on a line of its own.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.text import Text

from dms.actor import RemoteError
from dms.cli.actor import TimeoutOption
from dms.cli.common import JsonOption, settings
from dms.cli.output import (
    ago,
    build_table,
    console,
    duration,
    emit_json,
    jsonable,
    stored_state,
)
from dms.errors import DmsError
from dms.node.api import ApiError
from dms.node.client import NodeClient

PEERS_SHOWN = 8
DEPLOYMENTS_SHOWN = 5
MINING_SHOWN = 3
MINING_PREFIX = "mine-"  # the name of a mining session's deployment


def gather(client: NodeClient, timeout: float) -> dict[str, Any]:
    """Everything the screen shows, as one document."""

    def ask(behaviour: str, payload: Any = None) -> Any:
        return client.invoke(behaviour, payload, timeout=timeout)

    node = ask("/public/status")
    try:
        pools = ask("/dms/node/resources/pools")
    except RemoteError as err:  # a node that keeps no ledger
        pools = {"error": err.reason}
    peers = ask("/dms/node/peers/list")
    deployments = ask("/dms/node/deployment/list")
    mining = []
    for row in deployments:
        if str(row.get("name", "")).startswith(MINING_PREFIX) and len(mining) < MINING_SHOWN:
            try:
                session = ask("/dms/node/mining/status", {"id": row["id"]})
            except RemoteError:
                continue  # its session row is gone or not written yet
            mining.append(_session(session, row))
    return {
        "at": time.time(),
        "node": node,
        "resources": pools,
        "peers": peers,
        "deployments": deployments,
        "mining": mining,
    }


def _session(status: dict[str, Any], deployment: dict[str, Any]) -> dict[str, Any]:
    progress = status.get("progress") or {}
    steps = progress.get("steps") or []
    changes = [s.get("change") for s in steps if s.get("change") is not None]
    failed = progress.get("reason") if status.get("phase") == "failed" else None
    return {
        "id": status["id"],
        "algorithm": status.get("algorithm"),
        "phase": status.get("phase"),
        "steps": len(steps),
        "total_steps": progress.get("total_steps"),
        "change": changes[-1] if changes else None,
        "shards": len(progress.get("shards") or []),
        "reason": failed or status.get("unreadable"),
        # Why parts of its stored row cannot be read (None: all can).
        "unreadable": status.get("unreadable"),
        "created_at": deployment.get("created_at"),
    }


# ---- the screen -----------------------------------------------------------------------


def _pair(pools: dict[str, Any], key: str) -> str:
    free, total = pools.get("free", {}).get(key), pools.get("onboarded", {}).get(key)
    return "" if total is None else f"{free:g}/{total:g}"


def _peer_pair(row: dict[str, Any], key: str) -> str:
    free, total = row.get("free", {}).get(key), row.get("onboarded", {}).get(key)
    return "" if total is None else f"{free:g}/{total:g}"


def render(data: dict[str, Any], width: int | None = None) -> RenderableType:
    node, pools, now = data["node"], data["resources"], data["at"]
    parts: list[RenderableType] = []
    connected = sum(1 for p in data["peers"] if p.get("connected"))
    head = Text()
    head.append(f"node {node['peer_id']}\n", style="bold")
    head.append(
        f"{node['status']}, up {duration(node.get('uptime_s'))}, dms {node.get('version')}, "
        f"{connected} connected, {len(data['peers'])} known\n"
    )
    relay = ", relays for others" if node.get("relay") else ""
    head.append(f"reachability: {node.get('reachability', 'unknown')}{relay}\n")
    if "error" in pools:
        head.append(f"resources: {pools['error']}")
    elif not pools.get("onboarded", {}).get("cpu"):
        head.append("resources: nothing onboarded ('dms onboard' contributes this machine)")
    else:
        head.append(
            f"free of onboarded: cpu {_pair(pools, 'cpu')}, ram {_pair(pools, 'ram_gib')} GiB, "
            f"disk {_pair(pools, 'disk_gib')} GiB\n"
            f"in use: {pools.get('allocations', 0)} allocation(s), {pools.get('leases', 0)} "
            "lease(s)"
        )
    parts.append(head)

    peers = [
        [
            p["peer_id"],
            p.get("status", ""),
            ago(now - p["last_seen_s"], now) if p.get("last_seen_s") is not None else "",
            _peer_pair(p, "cpu"),
            _peer_pair(p, "ram_gib"),
        ]
        for p in data["peers"]
    ]
    columns = ["peer id", "status", "seen", "cpu", "ram GiB"]
    parts.extend(
        _table("peers", columns, peers, ["peer id"], columns[2:], PEERS_SHOWN, "dms peers list")
    )

    deployments = [
        [d["id"], d.get("name", ""), stored_state(d.get("state", ""), d.get("unreadable")),
         d.get("allocations", ""), ago(d.get("created_at"), now)]
        for d in data["deployments"]
    ]  # fmt: skip
    columns = ["id", "name", "state", "allocs", "created"]
    parts.extend(
        _table("deployments", columns, deployments, ["id"], ["allocs", "created", "name"],
               DEPLOYMENTS_SHOWN, "dms deployment list")
    )  # fmt: skip

    sessions = [
        [
            m["id"],
            m.get("algorithm") or "",
            stored_state(m.get("phase") or "", m.get("unreadable")),
            f"{m['steps']}/{m['total_steps']}" if m.get("total_steps") else str(m["steps"]),
            "" if m.get("change") is None else f"{m['change']:.4f}",
            m.get("reason") or "",
        ]
        for m in data["mining"]
    ]
    columns = ["session", "algorithm", "phase", "steps", "change", "reason"]
    parts.extend(
        _table("mining sessions", columns, sessions, ["session"], ["change", "reason"], None, "")
    )
    parts.append(Text(f"as of {time.strftime('%H:%M:%S', time.localtime(now))}", style="dim"))
    return Group(*parts)


def _table(
    title: str,
    columns: list[str],
    rows: list[list[Any]],
    whole: list[str],
    hideable: list[str],
    limit: int | None,
    more: str,
) -> list[RenderableType]:
    if not rows:
        return [Text(f"{title}: none", style="dim")]
    table, notes = build_table(
        title, columns, rows, whole, hideable, limit=limit, more=f"'{more}' lists them all"
    )
    return [table, *(Text(note) for note in notes)]


def _problem(err: Exception) -> RenderableType:
    return Text(f"the node does not answer: {err} (retrying)", style="bold red")


def status(
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, help="Seconds between refreshes.")
    ] = 2.0,
    timeout: TimeoutOption = 10.0,
    json_out: JsonOption = False,
) -> None:
    """This node on one screen: itself, resources, peers, deployments, mining sessions."""
    client = NodeClient(settings().home)
    if not watch:
        data = gather(client, timeout)
        if json_out:
            emit_json(jsonable(data))
        else:
            console.print(render(data))
        return
    try:
        if json_out:
            while True:
                emit_json(jsonable(gather(client, timeout)))
                time.sleep(interval)
        with Live(render(gather(client, timeout)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                try:
                    live.update(render(gather(client, timeout)), refresh=True)
                except (ApiError, RemoteError, DmsError) as err:
                    live.update(_problem(err), refresh=True)
    except KeyboardInterrupt:
        return
