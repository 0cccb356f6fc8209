"""One running node per home, and listen addresses that are really free.

``RunLock`` holds an OS file lock (``flock``) on ``DMS_HOME/run.lock`` while a
node runs. The kernel releases it when the process ends, however it ends, so a
crashed node never blocks the next start, and a second ``dms run`` on the same
home is refused at once, naming the pid that holds the home. (Before, the second
node ran beside the first and removed the first one's ``api.json`` when it
exited, and the CLI lost the running node.)

``check_listen_free`` refuses a TCP listen address another socket already
listens on. py-libp2p opens its listeners with ``SO_REUSEPORT``, so a second
node on the same port would start without a word and the kernel would share
incoming connections between the two nodes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from dms.node.home import NodeError

LOCK_FILE = "run.lock"


class AlreadyRunning(NodeError):
    """Another process runs a node on this home."""

    code = "already_running"


class AddressInUse(NodeError):
    """A listen address that another socket already listens on."""

    code = "address_in_use"


class RunLock:
    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.path = self.home / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Hold the home, or raise ``AlreadyRunning`` naming the pid that holds it."""
        if self._fd is not None:
            return self
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise NodeError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            who = f"pid {holder}" if holder else "another process"
            raise AlreadyRunning(
                f"a node is already running for {self.home} ({who}): stop it first, "
                "or give this node its own DMS_HOME"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the home go (the file stays: removing it would race the next holder)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_of(home: Path) -> int | None:
    """The pid of the process that holds ``home`` (0: one does, its pid unknown), or None
    when none does: what ``dms stop`` says when the node's ``api.json`` cannot tell it.
    The lock is tried shared and let go at once, never held."""
    path = Path(home) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # never run here (or unreadable: nothing to say about it)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def check_listen_free(addrs: list[str]) -> None:
    """Raise ``AddressInUse`` for the first ``/ip4|ip6/<ip>/tcp/<port>`` (port not 0)
    that another socket listens on."""
    for addr in addrs:
        parts = addr.split("/")
        if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
            continue
        try:
            port = int(parts[4])
        except ValueError:
            continue
        if port == 0:
            continue
        family = socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR passes a port still in TIME_WAIT, never one that is listened on;
            # no SO_REUSEPORT, so the probe cannot share it either.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((parts[2], port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise AddressInUse(
                        f"listen address {addr} is already in use (another dms node?): "
                        "choose another with --listen"
                    ) from None
                raise NodeError(f"cannot listen on {addr}: {exc.strerror or exc}") from None
