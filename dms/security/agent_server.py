"""The passphrase agent: ``python -m dms.security.agent_server --socket P --session S``.

Started by ``dms unlock`` (:func:`dms.security.agent.start`). It keeps passphrases in
memory only, answers only processes of this user in session S (SO_PEERCRED), forgets
each after its idle timeout, and exits when it holds none or when the session's
leader (the terminal's shell) is gone. See ``specs/unlock.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import fcntl
import mmap
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from dms.security.agent import (
    DEFAULT_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    MAX_PASSPHRASE_BYTES,
    Entry,
    Reply,
    Request,
)

TICK_S = 1.0  # how often the session leader is looked for, at most
FIRST_PUT_S = 30.0  # an agent nobody gives a passphrase to leaves by itself
CONNECTION_TIMEOUT_S = 2.0  # a client that connects and says nothing does not hold it up
_PR_SET_DUMPABLE = 4


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def harden() -> None:
    """No core dump and no ptrace by this user's other processes (not dumpable also
    makes /proc/<pid>/mem unreadable to them): the passphrase stays in this process."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = _libc()
    if libc is not None and sys.platform.startswith("linux"):
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


class LockedSecret:
    """A passphrase in its own page, locked in memory where the OS allows (so never
    written to swap) and overwritten with zeros when forgotten."""

    def __init__(self, value: bytes) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE)
        self._size = len(value)
        self._page[: self._size] = value
        libc = _libc()
        if libc is not None:
            address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
            libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(mmap.PAGESIZE))  # best effort

    def reveal(self) -> str:
        return self._page[: self._size].decode()

    def wipe(self) -> None:
        self._page[:] = b"\0" * mmap.PAGESIZE
        self._size = 0


@dataclass
class Held:
    secret: LockedSecret
    timeout_s: float
    last_used: float

    def expired(self, now: float) -> bool:
        return now - self.last_used >= self.timeout_s


def proc_stat(pid: int) -> tuple[str, str] | None:
    """The state and start time of ``pid`` (/proc fields 3 and 22): a reused pid has
    another start time, and a zombie leader is gone; None where /proc does not tell."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return fields[0], fields[19]


class Agent:
    def __init__(self, path: Path, session: int) -> None:
        self.path = path
        self.session = session
        self.uid = os.getuid()
        self.held: dict[str, Held] = {}
        self.started = time.monotonic()
        found = proc_stat(session)
        self.leader_start = found[1] if found else None
        self.stopping = False
        self.ever_held = False

    def leader_alive(self) -> bool:
        try:
            os.kill(self.session, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # there, but another user's: a reused pid (checked below)
        if self.leader_start is None:
            return True
        found = proc_stat(self.session)
        return found is not None and found[0] not in "ZX" and found[1] == self.leader_start

    def expire(self) -> None:
        now = time.monotonic()
        for home in [h for h, held in self.held.items() if held.expired(now)]:
            self.held.pop(home).secret.wipe()

    def done(self) -> bool:
        if self.stopping or not self.leader_alive():
            return True
        if self.held:
            return False
        # Empty: after the first passphrase is forgotten, or if none ever came.
        return self.ever_held or time.monotonic() - self.started > FIRST_PUT_S

    def next_wake(self) -> float:
        now = time.monotonic()
        soonest = min((h.last_used + h.timeout_s - now for h in self.held.values()), default=TICK_S)
        return max(0.01, min(TICK_S, soonest))

    def allowed(self, conn: socket.socket) -> str | None:
        """Why this client is refused, or None: only this user, only this session."""
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
        if uid != self.uid:
            return "another user"
        try:
            if os.getsid(pid) != self.session:
                return "another terminal session"
        except OSError:
            return "a process that is gone"
        return None

    def answer(self, request: Request) -> Reply:
        self.expire()
        now = time.monotonic()
        if request.op == "get":
            held = self.held.get(request.home or "")
            if held is None:
                return Reply(ok=True)
            held.last_used = now  # an idle timeout: each use restarts it, as sudo's
            return Reply(ok=True, passphrase=held.secret.reveal())
        if request.op == "put":
            if not request.home or not request.passphrase:
                return Reply(ok=False, error="put needs a home and a passphrase")
            if len(request.passphrase.encode()) > MAX_PASSPHRASE_BYTES:
                return Reply(ok=False, error="passphrase too long")
            old = self.held.pop(request.home, None)
            if old is not None:
                old.secret.wipe()
            self.held[request.home] = Held(
                LockedSecret(request.passphrase.encode()),
                request.timeout_s or DEFAULT_TIMEOUT_S,
                now,
            )
            self.ever_held = True
            return Reply(ok=True, pid=os.getpid())
        if request.op == "forget":
            homes = list(self.held) if request.home is None else [request.home]
            gone = [self.held.pop(h) for h in homes if h in self.held]
            for held in gone:
                held.secret.wipe()
            return Reply(ok=True, forgotten=len(gone), pid=os.getpid())
        entries = [
            Entry(home=h, timeout_s=held.timeout_s, idle_s=round(now - held.last_used, 1))
            for h, held in sorted(self.held.items())
        ]
        return Reply(ok=True, entries=entries, pid=os.getpid())

    def serve_one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(CONNECTION_TIMEOUT_S)
            try:
                # Read before refusing, so that the client reads our reason, not a reset.
                request = Request.model_validate_json(_read_request(conn))
            except (ValidationError, ValueError, OSError):
                request = None
            refused = self.allowed(conn)
            if refused is not None:
                reply = Reply(ok=False, error=f"not for {refused}")
            elif request is None:
                reply = Reply(ok=False, error="unreadable request")
            else:
                reply = self.answer(request)
            with contextlib.suppress(OSError):
                conn.sendall(reply.model_dump_json(exclude_none=True).encode() + b"\n")

    def wipe_all(self) -> None:
        for held in self.held.values():
            held.secret.wipe()
        self.held.clear()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


def bind(path: Path) -> socket.socket:
    """The listening socket, 0600 from the moment it exists (umask at bind)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a socket left by an agent that died: we hold the lock, so it is stale
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(16)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dms-agent")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--session", required=True, type=int)
    args = parser.parse_args(argv)
    harden()
    path: Path = args.socket
    # One agent per session: the lock is held for the agent's life, so a second one
    # started at the same moment says "running" and leaves.
    lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 (held until exit)
    os.chmod(lock.name, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("running", flush=True)
        return 0
    try:
        server = bind(path)
    except OSError as exc:
        print(f"cannot listen on {path}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 1
    agent = Agent(path, args.session)

    def stop(_signum: int, _frame: object) -> None:
        agent.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    inode = os.stat(path).st_ino
    print("ready", flush=True)
    # Nobody reads our output from here on; a write must not fail on a closed pipe.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    try:
        while not agent.done():
            for _key, _events in selector.select(agent.next_wake()):
                conn, _ = server.accept()
                agent.serve_one(conn)
            agent.expire()
    finally:
        agent.wipe_all()
        server.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:  # ours, not a successor's
                path.unlink()
        with contextlib.suppress(OSError):
            os.unlink(lock.name)  # still under the lock: the next agent makes a new one
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
