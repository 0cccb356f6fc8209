"""``dms init`` and ``dms run``: set up this home's keys, then run its node."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Annotated

import typer

from dms.cli.common import JsonOption, settings
from dms.cli.output import emit_fields, emit_json
from dms.node.home import init_home, load_node_identity


def init(json_out: JsonOption = False) -> None:
    """Create the node and user keys if missing and make the user root of this node."""
    report = init_home(settings().home)
    if json_out:
        emit_json(report)
    else:
        report["created"] = ", ".join(report["created"]) or "nothing (keys existed)"
        emit_fields(report, title="dms init")


def configure_daemon_logging(level: str) -> None:
    """One format for every line the daemon logs, py-libp2p's included.

    py-libp2p detaches its ``libp2p`` logger at import unless ``LIBP2P_DEBUG`` asks
    for its own handlers; its warnings then reach stderr through logging's last
    resort, bare, with no time or source. Send them through ours instead.
    """
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not os.environ.get("LIBP2P_DEBUG"):
        logging.getLogger("libp2p").propagate = True


def run(
    listen: Annotated[
        list[str] | None, typer.Option("--listen", help="Multiaddr to listen on (repeatable).")
    ] = None,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option("--bootstrap", help="Peer multiaddr with /p2p/ to dial (repeatable)."),
    ] = None,
    mdns: Annotated[bool, typer.Option("--mdns", help="Find peers on the LAN with mDNS.")] = False,
    api_port: Annotated[
        int | None, typer.Option("--api-port", min=0, max=65535, help="Local API port.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Run this home's node until SIGINT or SIGTERM."""
    from dms.node.daemon import Node, network_settings  # libp2p loads only for this command

    cfg = settings()
    configure_daemon_logging(cfg.log_level)
    network = network_settings(
        cfg,
        listen=listen or None,
        bootstrap=[*cfg.bootstrap, *(bootstrap or [])] or None,
        mdns=mdns or None,
    )
    identity = load_node_identity(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = Node(cfg, identity, network, api_port=api_port).start()
    try:
        assert node.api is not None
        info = {
            "peer_id": node.peer_id,
            "did": identity.did,
            "addrs": node.addrs(),
            "api": f"http://127.0.0.1:{node.api.port}",
            "home": str(cfg.home),
        }
        if json_out:
            emit_json(info)
        else:
            # Plain lines, never wrapped: people copy them and scripts parse them.
            typer.echo(f"dms node running (Ctrl-C to stop)\n  peer id: {info['peer_id']}")
            typer.echo(f"  did:     {info['did']}\n  api:     {info['api']}")
            for addr in info["addrs"]:
                typer.echo(f"  listen:  {addr}")
        sys.stdout.flush()  # scripts wait for these lines before they go on
        while not stop.wait(0.5):
            pass
    finally:
        node.stop()
    if not json_out:
        typer.echo("dms node stopped")
