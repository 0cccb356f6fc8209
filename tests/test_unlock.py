"""dms unlock / dms lock: a real agent process, real terminal sessions (one ``setsid``
runner per session, whose children are that session's commands), the OS keyring
through keyring's own API with an in-memory backend."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dms.security import Keystore
from tests.conftest import wait_for

PASSPHRASE = "unlock me, 7 horses"
OTHER = "a different one entirely"
DID = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"  # an audience for cap grant
NEEDS_KEY = ("cap", "grant", DID, "--cap", "/dms/deployment", "--expiry", "1d", "--json")
DEADLINE_S = 30.0

# The session leader: runs each command it is sent (one JSON line) as its child, so every
# command shares its session id, the way commands typed in one terminal share the shell's.
RUNNER = textwrap.dedent(
    """
    import json, os, pty, select, signal, subprocess, sys, time
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def typed(argv, env, text, every):
        # On a terminal: answer the prompt once it shows (getpass flushes what came before),
        # or with ``every`` each prompt and its confirmation, counted.
        master, slave = pty.openpty()
        proc = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        seen, sent, answered, deadline = b"", False, 0, time.monotonic() + 120
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break  # the command closed the terminal
            if not chunk:
                break
            seen += chunk
            if every:
                asked = seen.count(b"Passphrase for key") + seen.count(b"Repeat passphrase")
                for _ in range(asked - answered):
                    os.write(master, text.encode())
                answered = max(answered, asked)
            elif not sent and b"Passphrase for key" in seen:
                os.write(master, text.encode())
                sent, answered = True, 1
        os.close(master)
        screen = seen.decode(errors="replace").replace("\\r\\n", "\\n")
        return {"rc": proc.wait(timeout=30), "out": screen, "err": screen, "asked": answered}

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("tty_input") is not None:
            out = typed(cmd["argv"], cmd["env"], cmd["tty_input"], cmd.get("every_prompt"))
        else:
            done = subprocess.run(cmd["argv"], env=cmd["env"], stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=120)
            out = {"rc": done.returncode, "out": done.stdout, "err": done.stderr}
        print(json.dumps(out), flush=True)
    """
)


class Terminal:
    """One terminal session: its own session id, commands run inside it."""

    def __init__(self, home: Path, runtime: Path) -> None:
        self.home = home
        self.runtime = runtime
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.sid = self.proc.pid  # a session leader's pid is its session id
        self.prompts = 0

    def env(self, passphrase: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
        env.update(DMS_HOME=str(self.home), XDG_RUNTIME_DIR=str(self.runtime), COLUMNS="80")
        if passphrase is not None:
            env["DMS_PASSPHRASE"] = passphrase
        return env

    def run(
        self,
        *argv: str,
        passphrase: str | None = None,
        tty_input: str | None = None,
        every_prompt: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        cmd = {"argv": list(argv), "env": self.env(passphrase), "tty_input": tty_input,
               "every_prompt": every_prompt}  # fmt: skip
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the session runner died"
        out = json.loads(line)
        self.prompts = int(out.get("asked", 0))  # prompts answered on the terminal
        return subprocess.CompletedProcess(argv, out["rc"], out["out"], out["err"])

    def dms(
        self,
        *args: str,
        passphrase: str | None = None,
        tty_input: str | None = None,
        every_prompt: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            sys.executable, "-m", "dms", *args, passphrase=passphrase, tty_input=tty_input,
            every_prompt=every_prompt,
        )  # fmt: skip

    def close(self) -> None:
        """The terminal closes: its session leader exits (and is reaped)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


@pytest.fixture
def runtime() -> Iterator[Path]:
    # Short: a Unix socket path must fit in 107 bytes, and pytest's tmp_path is long.
    folder = Path(tempfile.mkdtemp(prefix="dmsrt-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home made by ``dms init`` once for the module (its keys sealed with PASSPHRASE);
    each test gets a copy of its own (``home``): init's key derivations took about 1 s a
    test. Nothing in it names its folder, and its files keep their modes."""
    home = tmp_path_factory.mktemp("unlock") / "home"
    done = subprocess.run(
        [sys.executable, "-m", "dms", "init", "--json"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("DMS_")},
            "DMS_HOME": str(home),
            "DMS_PASSPHRASE": PASSPHRASE,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return home


@pytest.fixture
def home(initialised: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(initialised, home)
    return home


@pytest.fixture
def terminals(home: Path, runtime: Path) -> Iterator[Callable[[], Terminal]]:
    opened: list[Terminal] = []

    def open_terminal() -> Terminal:
        terminal = Terminal(home, runtime)
        opened.append(terminal)
        return terminal

    yield open_terminal
    try:
        for terminal in opened:
            terminal.close()
        # Every agent leaves with its session (a bug otherwise, failing here).
        wait_for(lambda: not list(runtime.rglob("agent-*.sock")), DEADLINE_S, "every agent gone")
    finally:
        for pid in agents_of(runtime):  # by its own pid: nothing outlives the test
            os.kill(pid, signal.SIGTERM)


def agents_of(runtime: Path) -> list[int]:
    """The pids of agents whose socket is in ``runtime`` (their command line says so)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"dms.security.agent_server" in cmdline and str(runtime).encode() in cmdline:
                found.append(int(proc.name))
    return found


def unlock(terminal: Terminal, *extra: str) -> dict[str, Any]:
    done = terminal.dms("unlock", "--json", *extra, passphrase=PASSPHRASE)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert "Traceback" not in done.stdout, done.stdout


def test_unlock_once_then_commands_need_no_passphrase(
    terminals: Callable[[], Terminal], home: Path, runtime: Path
) -> None:
    term = terminals()
    before = term.dms(*NEEDS_KEY)  # no DMS_PASSPHRASE, no terminal to prompt on
    assert before.returncode == 1
    assert "no passphrase for key 'dms'" in before.stderr
    info = unlock(term)
    assert info["where"] == "agent" and info["session"] == term.sid
    assert info["timeout_s"] == 900.0 and info["home"] == str(home.resolve())
    for _ in range(2):
        done = term.dms(*NEEDS_KEY)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["token"].startswith("dmscap1")
        assert "note:" not in done.stderr
    status = json.loads(term.dms("unlock", "--status", "--json").stdout)
    assert status["unlocked"] is True and status["agent_pid"] == info["pid"]

    locked = term.dms("lock", "--json")
    assert locked.returncode == 0, locked.stderr
    assert json.loads(locked.stdout)["forgotten"] == 1
    after = term.dms(*NEEDS_KEY)
    assert after.returncode == 1 and "no passphrase for key 'dms'" in after.stderr
    # Holding nothing, the agent leaves and takes its socket with it.
    wait_for(lambda: not alive(info["pid"]), DEADLINE_S, "the agent exits after dms lock")
    assert not Path(info["socket"]).exists()
    assert term.dms(*NEEDS_KEY, passphrase=PASSPHRASE).returncode == 0  # DMS_PASSPHRASE as ever


def test_socket_and_folder_are_private_and_hold_no_secret(
    terminals: Callable[[], Terminal], home: Path, runtime: Path
) -> None:
    term = terminals()
    info = unlock(term)
    sock = Path(info["socket"])
    assert sock.parent == runtime / "dms"
    assert sock.name == f"agent-{term.sid}.sock"
    folder = os.lstat(sock.parent)
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    meta = os.lstat(sock)
    assert stat.S_ISSOCK(meta.st_mode)
    assert stat.S_IMODE(meta.st_mode) == 0o600 and meta.st_uid == os.getuid()
    assert term.dms(*NEEDS_KEY).returncode == 0
    secret = PASSPHRASE.encode()
    for root in (home, runtime):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret not in path.read_bytes(), f"the passphrase is in {path}"
    # Nor on the agent's command line or in its environment.
    assert secret not in Path(f"/proc/{info['pid']}/cmdline").read_bytes()
    try:
        environ = Path(f"/proc/{info['pid']}/environ").read_bytes()
    except PermissionError:
        environ = b""  # not dumpable: not readable by its own user either
    assert secret not in environ


def test_wrong_passphrase_is_refused_and_nothing_kept(
    terminals: Callable[[], Terminal], runtime: Path
) -> None:
    term = terminals()
    done = term.dms("unlock", passphrase="not the passphrase")
    assert done.returncode == 1
    no_traceback(done)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "wrong passphrase" in lines[0] and "nothing stored" in lines[0]
    assert not list(runtime.rglob("agent-*.sock"))
    status = json.loads(term.dms("unlock", "--status", "--json").stdout)
    assert status["unlocked"] is False and status["agent_pid"] is None


def test_another_session_does_not_get_it(terminals: Callable[[], Terminal], home: Path) -> None:
    first, second = terminals(), terminals()
    assert first.sid != second.sid
    info = unlock(first)
    other = second.dms(*NEEDS_KEY)
    assert other.returncode == 1 and "no passphrase for key 'dms'" in other.stderr
    status = json.loads(second.dms("unlock", "--status", "--json").stdout)
    assert status["unlocked"] is False and status["session"] == second.sid
    # Even asked on the first session's own socket, the agent refuses the second session.
    probe = (
        "import sys; from pathlib import Path; from dms.security import agent\n"
        "try:\n"
        f"    agent.ask(agent.Request(op='get', home={str(home.resolve())!r}), Path(sys.argv[1]))\n"
        "    print('GOT IT')\n"
        "except agent.AgentError as err:\n"
        "    print(err)\n"
    )
    asked = second.run(sys.executable, "-c", probe, info["socket"])
    assert "GOT IT" not in asked.stdout
    assert "another terminal session" in asked.stdout, asked
    assert first.dms(*NEEDS_KEY).returncode == 0  # still there for the first one


def test_forgotten_after_the_idle_timeout(terminals: Callable[[], Terminal]) -> None:
    term = terminals()
    info = unlock(term, "--timeout", "1s")
    assert info["timeout_s"] == 1.0

    def locked() -> bool:
        status = json.loads(term.dms("unlock", "--status", "--json").stdout)
        return status["unlocked"] is False

    wait_for(locked, DEADLINE_S, "the passphrase is forgotten after its idle timeout")
    wait_for(lambda: not alive(info["pid"]), DEADLINE_S, "the agent exits, holding nothing")
    done = term.dms(*NEEDS_KEY)
    assert done.returncode == 1 and "no passphrase" in done.stderr


def test_agent_leaves_with_its_session(terminals: Callable[[], Terminal]) -> None:
    term = terminals()
    info = unlock(term)
    assert alive(info["pid"])
    term.close()
    wait_for(lambda: not alive(info["pid"]), DEADLINE_S, "the agent exits when its terminal closes")
    assert not Path(info["socket"]).exists()


def test_remembered_passphrase_that_does_not_open_a_key_falls_back(
    terminals: Callable[[], Terminal], home: Path
) -> None:
    # The user key is sealed with another passphrase than the node key.
    (home / "key" / "user.json").unlink()
    Keystore(home, passphrase=lambda _c, _n: OTHER, scrypt_n=2**14).new("user")
    term = terminals()
    unlock(term)
    as_user = (*NEEDS_KEY, "--context", "user")
    note = "the passphrase unlocked in this terminal session does not open key 'user'"

    by_env = term.dms(*as_user, passphrase=OTHER)
    assert by_env.returncode == 0, by_env.stderr
    assert note in by_env.stderr

    typed = term.dms(*as_user, tty_input=OTHER + "\n")
    assert typed.returncode == 0, typed.stderr
    assert note in typed.stderr and "Passphrase for key 'user'" in typed.stderr

    nothing = term.dms(*as_user)
    assert nothing.returncode == 1
    no_traceback(nothing)
    assert note in nothing.stderr
    assert nothing.stderr.strip().splitlines()[-1].startswith("error: no passphrase for key")

    assert term.dms(*NEEDS_KEY).returncode == 0  # the node key still opens from the agent


def test_human_output_fits_80_columns(terminals: Callable[[], Terminal]) -> None:
    term = terminals()
    outputs = [
        term.dms("unlock", "--timeout", "20m", passphrase=PASSPHRASE),
        term.dms("unlock", "--status"),
        term.dms("lock"),
        term.dms("lock"),
        term.dms("unlock", "--timeout", "forever", passphrase=PASSPHRASE),
    ]
    for done in outputs:
        no_traceback(done)
        for line in (done.stdout + done.stderr).splitlines():
            assert len(line) <= 80, line
    assert "forgotten after 20 min unused" in outputs[0].stdout
    assert "unlocked here" in outputs[1].stdout
    assert "forgot the passphrase" in outputs[2].stdout
    assert "nothing to forget, not unlocked here" in outputs[3].stdout
    assert outputs[4].returncode == 1 and "--timeout 'forever'" in outputs[4].stderr


# --- the OS keyring: keyring's real API, an in-memory backend in this process ---------

try:
    import keyring
    from keyring.backend import KeyringBackend
    from keyring.errors import PasswordDeleteError
except ImportError:  # the optional extra dms[keyring] is not installed: those tests skip
    keyring = None
    KeyringBackend = object  # type: ignore[assignment,misc]


class MemoryKeyring(KeyringBackend):  # type: ignore[misc,valid-type]
    """A secure-enough backend for a test: the secrets live in this process only."""

    priority = 5

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.secrets.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.secrets[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.secrets.pop((service, username), None) is None:
            raise PasswordDeleteError("not found")


class PlaintextKeyring(MemoryKeyring):
    """Named as keyrings.alt's file backend: refused whatever its priority says."""


InProcess = Callable[..., int]


@pytest.fixture
def in_process(home: Path, runtime: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcess]:
    """``dms ...`` in this process (the in-memory keyring is this process's)."""
    if keyring is None:
        pytest.skip("keyring is not installed (pip install 'dms[keyring]')")
    from dms.cli.app import main

    monkeypatch.setenv("DMS_HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))  # no agent there
    previous = keyring.get_keyring()

    def run(*argv: str, passphrase: str | None = None) -> int:
        if passphrase is None:
            monkeypatch.delenv("DMS_PASSPHRASE", raising=False)
        else:
            monkeypatch.setenv("DMS_PASSPHRASE", passphrase)
        return main(list(argv))

    yield run
    keyring.set_keyring(previous)


def test_keyring_unlock_lookup_and_lock(
    in_process: InProcess, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    assert in_process(*NEEDS_KEY) == 1  # nothing anywhere yet
    capsys.readouterr()

    assert in_process("unlock", "--keyring", "--json", passphrase=PASSPHRASE) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["where"] == "keyring" and out["backend"].endswith("MemoryKeyring")
    assert list(backend.secrets.values()) == [PASSPHRASE]
    marker = home / "keyring.json"
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600
    for path in home.rglob("*"):
        if path.is_file():
            assert PASSPHRASE.encode() not in path.read_bytes(), path

    assert in_process(*NEEDS_KEY) == 0  # no DMS_PASSPHRASE, no prompt: the keyring
    assert json.loads(capsys.readouterr().out)["token"].startswith("dmscap1")
    assert in_process("unlock", "--status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["keyring"]["backend"].endswith("MemoryKeyring")

    assert in_process("lock", "--keyring", "--json") == 0
    assert json.loads(capsys.readouterr().out)["keyring_deleted"] is True
    assert backend.secrets == {} and not marker.exists()
    assert in_process(*NEEDS_KEY) == 1
    assert "no passphrase" in capsys.readouterr().err


def test_keyring_is_asked_only_after_opting_in(in_process: InProcess, home: Path) -> None:
    from dms.security import osring

    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    backend.set_password(osring.SERVICE, osring.account(home), PASSPHRASE)  # not via dms
    assert in_process(*NEEDS_KEY) == 1  # no marker: the keyring is not asked


def test_a_wrong_passphrase_in_the_keyring_falls_back(
    in_process: InProcess, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    assert in_process("unlock", "--keyring", passphrase=PASSPHRASE) == 0
    (account,) = backend.secrets
    backend.secrets[account] = OTHER  # changed behind dms's back
    capsys.readouterr()
    assert in_process(*NEEDS_KEY, passphrase=PASSPHRASE) == 0
    assert "the passphrase in the OS keyring does not open key 'dms'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fail", "plaintext"])
def test_insecure_keyring_backends_are_refused(
    in_process: InProcess, home: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    from keyring.backends import fail

    keyring.set_keyring(fail.Keyring() if kind == "fail" else PlaintextKeyring())
    assert in_process("unlock", "--keyring", passphrase=PASSPHRASE) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "plain text or nowhere: nothing stored" in err
    assert "Traceback" not in err
    assert not (home / "keyring.json").exists()


def test_init_asks_once_and_a_confirmation_then_remembers_it(runtime: Path, tmp_path: Path) -> None:
    """A fresh home: two prompts (the passphrase, then its confirmation) for both keys,
    and the next command of this terminal needs none."""
    term = Terminal(tmp_path / "fresh", runtime)
    try:
        done = term.dms("init", tty_input=PASSPHRASE + "\n", every_prompt=True)
        no_traceback(done)
        assert done.returncode == 0, done.stdout
        assert term.prompts == 2, done.stdout
        assert "Passphrase for keys 'dms' and 'user':" in done.stdout  # it seals both
        assert "unlocked for this terminal session" in done.stdout
        keys = Keystore(tmp_path / "fresh", passphrase=lambda _c, _n: PASSPHRASE)
        assert keys.load("dms") and keys.load("user")  # both under the one passphrase
        granted = term.dms(*NEEDS_KEY)  # no DMS_PASSPHRASE, no terminal: the agent's
        assert granted.returncode == 0, granted.stderr
    finally:
        term.close()
        wait_for(lambda: not list(runtime.rglob("agent-*.sock")), DEADLINE_S, "the agent gone")
