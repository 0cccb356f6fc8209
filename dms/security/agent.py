"""The passphrase agent's client side: where it listens, what it is asked, how to start it.

One agent per user and terminal session (``os.getsid(0)``) keeps the passphrases
given to ``dms unlock`` in memory, one per ``DMS_HOME``. It listens on
``<runtime dir>/agent-<session>.sock``; the runtime dir is ``$XDG_RUNTIME_DIR/dms``
or ``/tmp/dms-<uid>``, mode 0700, and must belong to this user: in ``/tmp`` another
user could otherwise make it first and listen in our place. The server side is
:mod:`dms.security.agent_server`; ``specs/unlock.md`` has the threats and rules.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from dms.errors import DmsError

MAX_PASSPHRASE_BYTES = 1024
MAX_MESSAGE_BYTES = 64 * 1024
CLIENT_TIMEOUT_S = 3.0
DEFAULT_TIMEOUT_S = 15 * 60.0
MAX_TIMEOUT_S = 7 * 86400.0
# The longest path a Unix socket can bind on Linux (sun_path is 108 bytes with its NUL).
_MAX_SOCKET_PATH = 107


class AgentError(DmsError):
    """The agent cannot be reached or used as asked; the message says why."""


class Request(BaseModel):
    """One request per connection, one JSON line."""

    op: Literal["get", "put", "forget", "status"]
    home: str | None = None  # None with "forget": every home
    passphrase: str | None = Field(default=None, max_length=MAX_PASSPHRASE_BYTES)
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S)


class Entry(BaseModel):
    """What ``status`` tells of one remembered passphrase (never the passphrase)."""

    home: str
    timeout_s: float
    idle_s: float


class Reply(BaseModel):
    ok: bool
    error: str | None = None
    passphrase: str | None = None  # "get" when found
    forgotten: int = 0  # "forget"
    entries: list[Entry] = Field(default_factory=list)  # "status"
    pid: int | None = None


def session_id() -> int:
    """This process's terminal session: what the agent is keyed by."""
    return os.getsid(0)


def home_key(home: Path | str) -> str:
    """One spelling per home folder, so ``~/.dms`` and ``/root/.dms`` are the same entry."""
    return str(Path(home).expanduser().resolve())


def runtime_dir(create: bool = False) -> Path:
    """The per-user folder of agent sockets, checked (and made, with ``create``) 0700."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(base) / "dms" if base else Path(f"/tmp/dms-{os.getuid()}")
    if create:
        old = os.umask(0o077)
        try:
            folder.mkdir(mode=0o700, parents=bool(base), exist_ok=True)
        finally:
            os.umask(old)
    check_private_dir(folder)
    return folder


def check_private_dir(folder: Path) -> None:
    """Refuse a folder that is a link, is someone else's, or that others can enter."""
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return  # nothing there yet: nothing to trust or distrust
    if not stat.S_ISDIR(info.st_mode):
        raise AgentError(f"{folder} is not a folder (a link?); remove it or set XDG_RUNTIME_DIR")
    if info.st_uid != os.getuid():
        raise AgentError(
            f"{folder} belongs to another user (uid {info.st_uid}); it is not used: "
            "remove it or set XDG_RUNTIME_DIR"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        # Ours but open to others (made by hand?): close it rather than refuse.
        os.chmod(folder, 0o700)


def socket_path(session: int | None = None, create: bool = False) -> Path:
    path = runtime_dir(create) / f"agent-{session_id() if session is None else session}.sock"
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise AgentError(f"the agent socket path {path} is too long: set a shorter XDG_RUNTIME_DIR")
    return path


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end (Linux SO_PEERCRED), None where unknown."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def supported() -> bool:
    """The agent checks who connects by SO_PEERCRED; without it, it does not run."""
    return hasattr(socket, "SO_PEERCRED") and hasattr(socket, "AF_UNIX")


def require_supported() -> None:
    if not supported():
        raise AgentError(
            "the passphrase agent needs Linux (SO_PEERCRED); use DMS_PASSPHRASE or "
            "dms unlock --keyring"
        )


def ask(request: Request, path: Path | None = None, timeout: float = CLIENT_TIMEOUT_S) -> Reply:
    """Send one request to this session's agent; ``AgentError`` when none answers."""
    path = path or socket_path()
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise AgentError("no agent runs for this terminal session") from None
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        raise AgentError(f"{path} is not this user's agent socket; it is not used")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            # The same check the other way: never hand a passphrase to another user's server.
            uid = peer_uid(sock)
            if uid is not None and uid != os.getuid():
                raise AgentError(f"{path} is served by another user (uid {uid}); it is not used")
            sock.sendall(request.model_dump_json(exclude_none=True).encode() + b"\n")
            data = _read_line(sock)
        except OSError as exc:
            reason = exc.strerror or exc
            raise AgentError(f"the agent at {path} does not answer ({reason})") from None
    try:
        reply = Reply.model_validate_json(data)
    except ValidationError:
        raise AgentError(f"the agent at {path} answered something unreadable") from None
    if not reply.ok:
        raise AgentError(f"the agent refused: {reply.error}")
    return reply


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk or size > MAX_MESSAGE_BYTES:
            break
    return b"".join(chunks).split(b"\n", 1)[0]


def lookup(home: Path | str) -> str | None:
    """The passphrase this session's agent holds for ``home``, or None (no agent, none
    held, or an agent that cannot be used: the caller asks elsewhere)."""
    if not supported():
        return None
    try:
        path = socket_path()
        if not path.exists():
            return None  # the common case costs one stat
        return ask(Request(op="get", home=home_key(home)), path).passphrase
    except AgentError:
        return None


def start(session: int | None = None) -> Path:
    """This session's agent socket, starting the agent first when none answers."""
    require_supported()
    session = session_id() if session is None else session
    path = socket_path(session, create=True)
    try:
        ask(Request(op="status"), path)
        return path
    except AgentError:
        pass
    # Its own session, so the terminal's hangup or Ctrl-C does not reach it; it watches
    # the terminal's session leader itself and leaves when that is gone.
    proc = subprocess.Popen(
        [sys.executable, "-m", "dms.security.agent_server", "--socket", str(path),
         "--session", str(session)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        # Not DMS_PASSPHRASE above all: /proc/<pid>/environ would show it for the agent's life.
        env={k: v for k, v in os.environ.items() if not k.startswith("DMS_")},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline().decode(errors="replace").strip()
    proc.stdout.close()
    if line not in ("ready", "running"):
        detail = proc.stderr.read().decode(errors="replace").strip().splitlines()
        proc.stderr.close()
        proc.wait(timeout=5)
        reason = detail[-1] if detail else f"exit code {proc.returncode}"
        raise AgentError(f"the passphrase agent did not start: {reason}")
    proc.stderr.close()
    if line == "running":  # another 'dms unlock' of this session started it just now
        proc.wait(timeout=5)
    return path


def as_json(reply: Reply) -> dict[str, Any]:
    return json.loads(reply.model_dump_json(exclude={"passphrase"}))
