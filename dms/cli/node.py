"""``dms init`` and ``dms run``: set up this home's keys, then run its node."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer

from dms.cli.common import JsonOption, dialable, settings
from dms.cli.output import duration, emit_fields, emit_json, say_line
from dms.cli.signals import stop_signals
from dms.errors import DmsError
from dms.node.home import NODE_KEY, USER_KEY, NodeError, init_home, load_node_identity
from dms.security import Keystore, agent
from dms.security.keystore import (
    PASSPHRASE_ENV,
    passphrase_from_env_or_prompt,
)
from dms.security.passphrase import PassphraseLookup


def _one_passphrase(home: Path) -> tuple[str | None, bool]:
    """The passphrase both new keys are sealed with, asked once (with a confirmation),
    and whether it was typed at a prompt; (None, False) when both keys exist."""
    keystore = Keystore(home)
    missing = [c for c in (NODE_KEY, USER_KEY) if not keystore.exists(c)]
    if not missing:
        return None, False
    what = " and ".join(f"'{c}'" for c in missing)
    what = f"keys {what}" if len(missing) > 1 else f"key {what}"
    lookup = PassphraseLookup(
        home, lambda c, confirm: passphrase_from_env_or_prompt(c, confirm, what=what)
    )
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


# Libraries whose INFO lines are routine: py-libp2p's connection manager (every 10 s),
# Alembic's migrations on a fresh home (14 lines).
CHATTY = ("libp2p", "multiaddr", "alembic")
# py-libp2p logs a failed dial as an ERROR and raises it too: dms catches it, dials again
# (a peer that starts a second later is reached) and says so itself at INFO.
DIAL_FAILURES = ("Failed to open TCP stream", "Unexpected error opening TCP stream")
# A relay request refused, by a node that is no relay (any node not publicly reachable)
# or one over a budget: dms answers with the status, says so at INFO ('relay refused
# PEER: not a relay (relay_off)') and resets the stream; py-libp2p's hop loop then reads
# and writes the reset stream and logs three ERRORs (RELAY_RESET). Three nodes on
# loopback logged 39 ERRORs and 32 WARNINGs each in 12 minutes.
RELAY = "libp2p.relay"
RELAY_RESET = "stream is reset"
# The refused node's client says it at WARNING ('Reservation failed with relay PEER: code
# 202'), and dms, asking another relay, says nothing: routine for 202, what a node that
# is no relay answers (circuit v2's PERMISSION_DENIED), but for any other code (201: the
# relay's limits are reached) the node is left without the slot it needs to be reached,
# and that WARNING is the only line that says so: shown.
RESERVATION_FAILED = "Reservation failed with relay"
NOT_A_RELAY = 202
# A reservation granted: its client closes the stream (the normal end), and py-libp2p's
# hop loop, waiting for another message on it, reads the end and logs an ERROR with no
# reason ('Error reading from hop stream from PEER: ', the end of a stream says nothing
# more): one on a relay for every reservation and every renewal. A message it could not
# read (too large, not protobuf) has a reason, and is shown.
RELAY_READ_ERROR = "Error reading from hop stream from "


def _relay_refusal(record: logging.LogRecord) -> bool:
    """A relay request refused, or a granted reservation's stream ended (above)."""
    if not record.name.startswith(RELAY):
        return False
    if str(record.msg).startswith(RESERVATION_FAILED):
        args = record.args if isinstance(record.args, tuple) else ()
        return bool(args) and args[-1] == NOT_A_RELAY
    message = record.getMessage()
    ended = message.startswith(RELAY_READ_ERROR) and message.endswith(": ")
    return ended or RELAY_RESET in message


class QuietLibp2p(logging.Filter):
    """Libraries' routine chatter goes to DEBUG, shown only when the daemon logs at
    DEBUG: py-libp2p's and Alembic's records below WARNING, and py-libp2p's errors for a
    dial that dms retries itself (:data:`DIAL_FAILURES`) or for a relay request refused
    (:func:`_relay_refusal`), which dms handles and says itself."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        routine = record.levelno < logging.WARNING and record.name.startswith(CHATTY)
        retried = record.name.startswith("libp2p") and str(record.msg).startswith(DIAL_FAILURES)
        if routine or retried or _relay_refusal(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.level <= logging.DEBUG
        return True


def configure_daemon_logging(
    level: str, log_format: str = "text", log_file: Path | None = None
) -> None:
    """One format for every line the daemon logs, py-libp2p's included.

    py-libp2p detaches its ``libp2p`` logger at import unless ``LIBP2P_DEBUG`` asks
    for its own handlers; its warnings then reach stderr through logging's last
    resort, bare, with no time or source. Send them through ours instead, with its
    routine INFO lines demoted to DEBUG (:class:`QuietLibp2p`).
    """
    if log_format not in LOG_FORMATS:
        raise DmsError(f"--log-format {log_format!r}: use text or json")
    handler: logging.Handler = logging.StreamHandler()
    if log_file is not None:
        handler = PrivateRotatingLog(log_file)
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    numeric = logging.getLevelName(level.upper())
    handler.addFilter(QuietLibp2p(numeric if isinstance(numeric, int) else logging.INFO))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    if not os.environ.get("LIBP2P_DEBUG"):
        logging.getLogger("libp2p").propagate = True


# A node's log: rotated at 10 MiB, three old files kept (dms.log.1 ... dms.log.3).
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3


class PrivateRotatingLog(logging.handlers.RotatingFileHandler):
    """A rotated log file, each new file this user's only (0600) from its first byte."""

    _rotates = True  # a regular file (set at each open)

    def __init__(
        self, path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS
    ) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")

    def _open(self) -> Any:
        open_log(Path(self.baseFilename)).close()  # made private before it is opened
        # Only a regular file rotates (bpo-45401: never /dev/null or a pipe), asked once
        # a file is opened, not twice a line.
        self._rotates = os.path.isfile(self.baseFilename)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        """The line, formatted once: the base class formats each record twice (once to
        measure it against ``max_bytes``) and asks the file system twice a line whether
        the file is regular, ~40 % of a line's cost on a node logging each lease it takes
        and each allocation it runs. Rotates as the base class does: before a line
        that would take the file to ``max_bytes`` or past."""
        try:
            msg = self.format(record) + self.terminator
            if self.stream is None:  # delay was set, or a rollover failed to reopen
                self.stream = self._open()
            if self.maxBytes > 0 and self._rotates:
                self.stream.seek(0, 2)
                if self.stream.tell() + len(msg) >= self.maxBytes:
                    self.doRollover()
                    if self.stream is None:
                        self.stream = self._open()
            self.stream.write(msg)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def log_path(home: Path) -> Path:
    """Where a node started in the background logs (``dms logs`` reads it)."""
    return Path(home) / "logs" / "dms.log"


def open_log(path: Path) -> BinaryIO:
    """The log file for appending, this user's only (folder 0700, file 0600), as every
    file of a home is."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def _in_background() -> bool:
    """Started with ``&`` from an interactive shell: the terminal's foreground process
    group is another one (the shell's, or the next command's)."""
    try:
        fd = sys.stderr.fileno()
        return os.isatty(fd) and os.tcgetpgrp(fd) != os.getpgrp()
    except (OSError, ValueError):
        return False


def _prove_passphrase(home: Path) -> None:
    """Open the node key here, where a prompt can be answered; a passphrase typed now is
    kept for this terminal session (as ``dms unlock`` would), where the detached node,
    of the same session, finds it."""
    typed: list[str] = []

    def ask(context: str, confirm: bool) -> str:
        typed.append(passphrase_from_env_or_prompt(context, confirm))
        return typed[-1]

    keystore = Keystore(home, passphrase=PassphraseLookup(home, ask))
    if not keystore.exists(NODE_KEY):
        raise NodeError(f"{home} holds no node key yet: run 'dms init' first")
    keystore.load(NODE_KEY)
    if typed and os.environ.get(PASSPHRASE_ENV) is None:
        from dms.cli.unlock import remember

        remember(home, typed[-1])


def _detach(home: Path, args: list[str], json_out: bool) -> None:
    """Start ``dms run ARGS`` in the background, its output appended to the log; return
    once its API answers (or say why it did not start)."""
    from dms.node.api import ApiAddress, api_file

    _prove_passphrase(home)
    log = log_path(home)
    with open_log(log) as out:
        out.write(
            f"--- dms run --detach, {datetime.now(UTC).isoformat(timespec='seconds')}\n".encode()
        )
        out.flush()
        start = out.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", "dms", "run", "--background", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            process_group=0,  # Ctrl-C in this terminal is not for it; same session (unlock)
            close_fds=True,
        )
    deadline = time.monotonic() + DETACH_DEADLINE_S
    address: ApiAddress | None = None
    while address is None:
        if proc.poll() is not None:
            with open(log, "rb") as fh:
                fh.seek(start)
                said = fh.read().decode(errors="replace").strip().splitlines()
            reason = said[-1].removeprefix("error: ") if said else f"exit code {proc.returncode}"
            raise NodeError(f"the node did not start: {reason} (its log: {log})")
        if time.monotonic() > deadline:
            proc.terminate()
            raise NodeError(
                f"the node did not start within {DETACH_DEADLINE_S:g} s; its log: {log}"
            )
        with contextlib.suppress(OSError, ValueError):
            found = ApiAddress.model_validate_json(api_file(home).read_text())
            address = found if found.pid == proc.pid else None
        time.sleep(0.2)
    info = {"pid": proc.pid, "peer_id": address.peer_id, "api": f"http://127.0.0.1:{address.port}",
            "home": str(home), "log": str(log)}  # fmt: skip
    if json_out:
        emit_json(info)
    else:
        say_line(
            f"dms node running in the background (pid {proc.pid}); its log: {log} "
            "(dms logs -f); dms stop stops it"
        )


DETACH_DEADLINE_S = 60.0


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
    detach: Annotated[
        bool,
        typer.Option(
            "--detach", help="Run in the background, logging to DMS_HOME/logs/ (dms logs)."
        ),
    ] = False,
    background: Annotated[
        bool, typer.Option("--background", hidden=True, help="The node --detach starts.")
    ] = False,
    faults: Annotated[
        Path | None,
        typer.Option("--faults", hidden=True, help="dms sim only: follow this faults file."),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Run this home's node until SIGINT or SIGTERM (or, with --detach, in the background)."""
    cfg = settings()
    if detach:
        args = [*(f"--listen={a}" for a in listen or []),
                *(f"--bootstrap={a}" for a in bootstrap or []),
                *(["--mdns"] if mdns else []),
                *([f"--api-port={api_port}"] if api_port is not None else []),
                f"--log-format={log_format}"]  # fmt: skip
        _detach(cfg.home, args, json_out)
        return
    from dms.node.allocator import HeapTrimmer, freeze_start_heap, return_large_blocks
    from dms.node.daemon import Node, network_settings  # libp2p loads only for this command

    return_large_blocks(cfg.malloc_mmap_threshold_bytes)  # a refused frame leaves no RSS
    trimmer = HeapTrimmer(cfg.malloc_trim_interval_s, cfg.malloc_trim_freed_bytes)

    log_file = None
    if background:  # started by --detach: the terminal may close; stdout is the log
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        log_file = log_path(cfg.home)  # its lines there too, through the rotating handler
    elif _in_background():  # 'dms run &': its lines would mix with the next commands'
        log_file = log_path(cfg.home)
        say_line(f"dms node logging to {log_file} (dms logs -f shows it)", err=True)
    configure_daemon_logging(cfg.log_level, log_format, log_file)
    network = network_settings(
        cfg,
        listen=listen or None,
        bootstrap=[*cfg.bootstrap, *(bootstrap or [])] or None,
        mdns=mdns or None,
    )
    identity = load_node_identity(cfg)
    # SIGINT and SIGTERM from here until the node has stopped: one during start-up
    # stops the node as soon as it is up, one during its stop changes nothing.
    with stop_signals() as signals:
        layer = None
        if faults is not None:  # a node of 'dms sim' in processes mode (dms.sim.faults)
            from dms.sim.faults import FaultPlan

            layer = FaultPlan.watching(faults).layer
        node = Node(cfg, identity, network, api_port=api_port, layer=layer).start()
        trimmer.start()  # a flood's freed buffers leave no RSS
        from dms.cli import app

        if app.OWN_PROCESS:  # this process is the node's: its start heap out of full collections
            freeze_start_heap()
        try:
            assert node.api is not None
            info = {
                "peer_id": node.peer_id,
                "did": identity.did,
                "addrs": dialable(node.addrs()),
                "api": f"http://127.0.0.1:{node.api.port}",
                "home": str(cfg.home),
            }
            if json_out:
                emit_json(info)
            else:
                # Plain lines, never wrapped: people copy them and scripts parse them.
                typer.echo(f"dms node running (Ctrl-C to stop)\n  peer id: {info['peer_id']}")
                typer.echo(f"  did:     {info['did']}\n  api:     {info['api']}")
                # Each address whole on a line of its own: one is copied into --bootstrap.
                typer.echo("  addresses (give one to --bootstrap on another node):")
                for addr in info["addrs"]:
                    typer.echo(addr)
            sys.stdout.flush()  # scripts wait for these lines before they go on
            # Asleep until a stop signal (polled every 0.5 s, an idle node's main thread
            # woke twice a second); the handler takes no lock (dms.cli.signals).
            signals.wait()
        finally:
            trimmer.stop()
            node.stop()
    if not json_out:
        typer.echo("dms node stopped")


def logs(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines (Ctrl-C stops).")
    ] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="Last lines shown.")] = 50,
) -> None:
    """The log of this home's node started in the background (dms run --detach, or &)."""
    path = log_path(settings().home)
    if not path.exists():
        raise NodeError(
            f"no log in {path.parent} yet: a node started with 'dms run --detach' (or "
            "'dms run &') writes one there; a node in the foreground logs to its terminal"
        )
    fh = open(path, "rb")  # noqa: SIM115 (reopened when the log rotates; closed below)
    try:
        tail: deque[bytes] = deque(fh, maxlen=lines) if lines else deque()
        for line in tail:
            sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()
        while follow:
            chunk = fh.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            elif _replaced(path, fh):  # rotated (or truncated): the new file
                fh.close()
                fh = open(path, "rb")  # noqa: SIM115
            else:
                time.sleep(0.3)
    except KeyboardInterrupt:
        pass
    finally:
        fh.close()


def _replaced(path: Path, fh: BinaryIO) -> bool:
    """The file at ``path`` is another one than ``fh`` reads, or shorter than read."""
    with contextlib.suppress(OSError):
        now = path.stat()
        return now.st_ino != os.fstat(fh.fileno()).st_ino or now.st_size < fh.tell()
    return False


def stop(
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait for it to end.")
    ] = 30.0,
) -> None:
    """Stop this home's running node (started with --detach, with &, or elsewhere)."""
    from dms.node.api import ApiAddress, api_file
    from dms.node.client import running_node

    home = settings().home
    if running_node(home) is None:  # answers, and is this home's node (else an error)
        raise NodeError(_not_running(home))
    pid = ApiAddress.model_validate_json(api_file(home).read_text()).pid
    os.kill(pid, signal.SIGTERM)  # it stops cleanly: peers flushed, api.json removed
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise NodeError(f"the node (pid {pid}) did not stop within {timeout:g} s")
        time.sleep(0.2)
    typer.echo(f"dms node stopped (pid {pid})")


def _not_running(home: Path) -> str:
    """Why ``dms stop`` cannot ask this home's node to stop: none runs, or one does but
    its ``api.json`` is damaged (it said "no node is running" of a running node)."""
    from dms.node.api import ApiAddress, api_file
    from dms.node.lock import holder_of

    path = api_file(home)
    try:
        ApiAddress.model_validate_json(path.read_text())
    except OSError:
        pass  # none written (or unreadable): no node answers
    except ValueError:
        pid = holder_of(home)
        if pid is not None:
            who, how = (f"pid {pid}", f"'kill {pid}'") if pid else ("its pid unknown", "kill")
            return (
                f"{path} is damaged, so the node running for {home} ({who}) cannot be "
                f"asked to stop: stop it with {how} (it stops cleanly and removes the file)"
            )
    return f"no node is running for {home}"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")
