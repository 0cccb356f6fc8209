"""``dms init`` and ``dms run``: set up this home's keys, then run its node."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from dms.cli.common import JsonOption, settings
from dms.cli.output import duration, emit_fields, emit_json
from dms.errors import DmsError
from dms.node.home import NODE_KEY, USER_KEY, init_home, load_node_identity
from dms.security import Keystore, agent
from dms.security.keystore import PASSPHRASE_ENV, session_passphrase


def _one_passphrase(home: Path) -> tuple[str | None, bool]:
    """The passphrase both new keys are sealed with, asked once (with a confirmation),
    and whether it was typed at a prompt; (None, False) when both keys exist."""
    keystore = Keystore(home)
    missing = [c for c in (NODE_KEY, USER_KEY) if not keystore.exists(c)]
    if not missing:
        return None, False
    lookup = session_passphrase(home)
    typed = os.environ.get(PASSPHRASE_ENV) is None
    first = next(lookup.candidates(missing[0], True))
    if first.remembered:
        typed = False
        lookup.notice(f"keys sealed with the passphrase remembered ({first.origin}) for {home}")
    return first.value, typed


def init(json_out: JsonOption = False) -> None:
    """Create the node and user keys if missing and make the user root of this node."""
    home = settings().home
    passphrase, typed = _one_passphrase(home)
    report = init_home(home, None if passphrase is None else lambda _c, _confirm: passphrase)
    unlocked = None
    if typed and passphrase is not None and agent.supported():
        # Typed once: kept for this terminal session, as 'dms unlock' would.
        from dms.cli.unlock import remember

        with contextlib.suppress(agent.AgentError):
            unlocked = remember(home, passphrase)
    if json_out:
        emit_json({**report, "unlocked": unlocked is not None})
        return
    report["created"] = ", ".join(report["created"]) or "nothing (keys existed)"
    emit_fields(report, title="dms init")
    if unlocked is not None:
        minutes = duration(unlocked["timeout_s"])
        typer.echo(f"unlocked for this terminal session ({minutes} unused, or dms lock)")


LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    """One JSON object a line, for log shippers: time (ISO 8601, UTC), level, logger,
    message, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class QuietLibp2p(logging.Filter):
    """py-libp2p's routine chatter (its connection manager reports every 10 s) goes to
    DEBUG: its records below WARNING are shown only when the daemon logs at DEBUG."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.name.startswith(("libp2p", "multiaddr")):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.level <= logging.DEBUG
        return True


def configure_daemon_logging(level: str, log_format: str = "text") -> None:
    """One format for every line the daemon logs, py-libp2p's included.

    py-libp2p detaches its ``libp2p`` logger at import unless ``LIBP2P_DEBUG`` asks
    for its own handlers; its warnings then reach stderr through logging's last
    resort, bare, with no time or source. Send them through ours instead, with its
    routine INFO lines demoted to DEBUG (:class:`QuietLibp2p`).
    """
    if log_format not in LOG_FORMATS:
        raise DmsError(f"--log-format {log_format!r}: use text or json")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    numeric = logging.getLevelName(level.upper())
    handler.addFilter(QuietLibp2p(numeric if isinstance(numeric, int) else logging.INFO))
    logging.basicConfig(level=level.upper(), handlers=[handler])
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
    log_format: Annotated[
        str, typer.Option("--log-format", help="text (default) or json: one object a line.")
    ] = "text",
    faults: Annotated[
        Path | None,
        typer.Option("--faults", hidden=True, help="dms sim only: follow this faults file."),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Run this home's node until SIGINT or SIGTERM."""
    from dms.node.daemon import Node, network_settings  # libp2p loads only for this command

    cfg = settings()
    configure_daemon_logging(cfg.log_level, log_format)
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
    layer = None
    if faults is not None:  # a node of 'dms sim' in processes mode (dms.sim.faults)
        from dms.sim.faults import FaultPlan

        layer = FaultPlan.watching(faults).layer
    node = Node(cfg, identity, network, api_port=api_port, layer=layer).start()
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
