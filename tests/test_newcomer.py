"""What a newcomer meets (issue 27): a fresh home and a lone ``dms run``, the commands
and mistakes of the README through the real entry point, at 80 columns. No traceback,
one precise line per mistake, nothing cut."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clitools import (
    Daemon,
    at_80,
    dms,
    dms_json,
    dms_many,
    env_for,
    free_ports,
    init_homes,
    providers_and_owners,
)
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
IRIS = ROOT / "examples" / "iris-features.csv"


def clean(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert all(len(line) <= 80 for line in done.stdout.splitlines()), done.stdout


@pytest.fixture(scope="module")
def lone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A fresh home running its node: no peer, no deployment yet."""
    home = tmp_path_factory.mktemp("lone") / "home"
    assert dms(home, "init").returncode == 0
    daemon = Daemon(home)
    try:
        yield daemon
    finally:
        daemon.stop()


def test_empty_tables_say_so_instead_of_a_traceback(lone: Daemon) -> None:
    for args in (["deployment", "list"], ["peers", "list"]):
        done = at_80(lone.home, *args)
        clean(done)
        assert done.returncode == 0, (args, done.stderr)
        assert " yet: " in done.stdout and "┃" not in done.stdout  # a sentence, no table


class Tmux:
    """A tmux server of this test's own (its own socket), 80 columns wide: what a person
    sees, soft-wrapped lines joined back (``capture-pane -J``) as a copy would."""

    def __init__(self, tmp: Path) -> None:
        if shutil.which("tmux") is None:
            pytest.skip("tmux is not installed (apt-get install -y tmux)")
        self.socket = str(tmp / "tmux.sock")
        self.count = 0

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=60
        )

    def run(self, env: dict[str, str], *argv: str, timeout: float = 120) -> str:
        """``argv`` in a new 80-column window; the screen once it has ended."""
        self.count += 1
        name, signal_ = f"w{self.count}", f"done-{self.count}"
        # The window's own width, not a COLUMNS inherited from the test's environment.
        kept = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES", "TERM")}
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in kept.items())
        done = f"tmux -S {self.socket} wait-for -S {signal_}"
        command = f"env -i TERM=xterm {exports} {shlex.join(argv)}; {done}; sleep 600"
        started = self.tmux("new-session", "-d", "-s", name, "-x", "80", "-y", "100", command)
        assert started.returncode == 0, started.stderr
        subprocess.run(["tmux", "-S", self.socket, "wait-for", signal_], timeout=timeout)
        screen = self.tmux("capture-pane", "-p", "-J", "-t", name, "-S", "-", "-E", "-").stdout
        self.tmux("kill-session", "-t", name)
        return screen

    def close(self) -> None:
        self.tmux("kill-server")


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    made = Tmux(tmp_path)
    try:
        yield made
    finally:
        made.close()


def dms_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "dms", *args]


def test_peers_self_prints_each_dialable_address_whole_never_0000(
    tmp_path: Path, tmux: Tmux
) -> None:
    home = tmp_path / "home"
    assert dms(home, "init").returncode == 0
    daemon = Daemon(home, "--listen", "/ip4/0.0.0.0/tcp/0")
    try:
        screen = tmux.run(env_for(home), *dms_argv("peers", "self"))
    finally:
        daemon.stop()
    lines = screen.splitlines()
    addrs = [line for line in lines if line.startswith("/ip4/")]
    peer = daemon.info["peer_id"]
    assert addrs, screen
    assert all(a.endswith(f"/p2p/{peer}") and len(a.split()) == 1 for a in addrs), screen
    assert "0.0.0.0" not in screen, screen
    assert any(a.startswith("/ip4/127.0.0.1/tcp/") for a in addrs), screen
    assert any(not a.startswith("/ip4/127.") for a in addrs), screen  # the interface's too


def one_line_error(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert done.returncode != 0, done.stdout
    clean(done)
    said = " ".join(done.stderr.split())
    for text in expected:
        assert text in said, done.stderr


def test_mistakes_get_one_line_in_the_flags_words(lone: Daemon, tmp_path: Path) -> None:
    mine = ["mine", "skmeans", "--data", str(IRIS), "--out", str(tmp_path / "o")]
    one_line_error(at_80(lone.home, *mine, "--k", "0"), "--k must be at least 1")
    one_line_error(at_80(lone.home, *mine, "--k", "0", "--local"), "--k must be at least 1")
    # one the node refuses keeps its reply's code, as every error reply does (the line
    # had dropped it: "error: --verify-fraction ..."), the settings' bound said as a flag
    refused = at_80(lone.home, *mine, "--k", "3", "--verify-fraction", "5")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.splitlines()[-1] == (
        "error: bad_payload: --verify-fraction must be at most 1"
    ), refused.stderr
    # past the node's limit: said here before it reaches the node, in the flag's words
    # (the node's refusal was "error: bad_payload: timeout_s: Input should be less than
    # or equal to 604800")
    refused = at_80(lone.home, *mine, "--k", "3", "--timeout", "1e9")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.splitlines() == [
        "error: --timeout must be at most 604800 seconds (7 days), the node's limit"
    ], refused.stderr
    one_line_error(
        at_80(lone.home, *mine, "--k", "3", "--shards", "2", "--local"),
        "--shards 2",
        "drop one of them",
    )
    assert not (tmp_path / "o").exists()
    # an address without the peer it reaches (py-libp2p's words were "The last protocol
    # should be `P_P2P` (421) instead of `6`")
    one_line_error(
        at_80(lone.home, "peers", "connect", "/ip4/127.0.0.1/tcp/4001"),
        "/ip4/127.0.0.1/tcp/4001 does not end in /p2p/<peer id>",
        "dms peers self",
    )
    # a peer id mistyped: not 'peer garbage is unreachable: no known address'
    one_line_error(at_80(lone.home, "peers", "ping", "garbage"), "'garbage' is not a peer id")
    # a peer id of another key type is one (a secp256k1 host's, which dms peers connect
    # reaches): the node answers for it (it was 'not a peer id' too)
    other = "16Uiu2HAmPkngQubrCsKzeg1SZefgJrGtS53feK1PVKQKGFbds5Cd"
    one_line_error(at_80(lone.home, "peers", "ping", other), f"peer {other} is unreachable")
    # an API port in use: the hint to choose another
    busy = lone.info["api"].rsplit(":", 1)[1]
    other = tmp_path / "other"
    assert dms(other, "init").returncode == 0
    one_line_error(
        at_80(other, "run", "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", busy),
        f"127.0.0.1:{busy}",
        "with --api-port",
    )


def test_a_deployment_or_collaboration_not_here_says_where_the_ids_are(lone: Daemon) -> None:
    """A mistyped id said "error: unknown: no deployment 'nope'" (and "unknown:
    collaboration 'nope' is not joined here"): no meaningful code, and not what to do.
    Each deployment command now points at 'dms deployment list'; a collaboration is
    refused ``not_found``, saying where its id comes from. Both lines keep the code
    (the deployment commands' dropped it, where a collaboration's kept it)."""
    commands = [["deployment", what, "nope"] for what in ("status", "logs", "manifest")]
    answers = dms_many(lone.home, [*commands, ["deployment", "shutdown", "nope", "--json"],
                                   ["mine", "collab", "result", "nope"]])  # fmt: skip
    for code, out, err in answers[:-1]:
        assert code == 1 and not out and len(err.splitlines()) == 1, (out, err)
        assert err == ("error: not_found: no deployment 'nope' on this node: 'dms deployment "
                       "list' lists its deployments\n"), err  # fmt: skip
    code, out, err = answers[-1]
    assert code == 1 and not out and len(err.splitlines()) == 1, (out, err)
    assert err.startswith("error: not_found: no collaboration 'nope' is joined on this node: ")
    assert "'dms mine collab propose' printed" in err, err
    # The behaviours themselves, as a script calls them: the code says what happened.
    asked = [["actor", "cmd", f"/dms/node/{what}/status", "id=nope"]
             for what in ("deployment", "mining")]  # fmt: skip
    for (code, out, err), what in zip(dms_many(lone.home, asked), ("deployment", "mining session"),
                                      strict=True):  # fmt: skip
        assert code == 1 and err == f"error: not_found: no {what} 'nope'\n", (out, err)


def test_a_connect_that_fails_says_why_each_address_failed(lone: Daemon) -> None:
    """``dms peers connect`` to a port nobody listens on said "cannot connect to PEER:
    SwarmDialAllFailedError: unable to connect to PEER, no addresses established a
    successful connection (with exceptions)": no reason (the refused connection was in
    py-libp2p's exception's cause), and so did the log at every redial of a bootstrap
    that is down. Now: "every address failed: ConnectionRefusedError: ... refused"."""
    [port] = free_ports()
    peer = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    done = dms(lone.home, "peers", "connect", f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}")
    one_line_error(done, f"cannot connect to {peer}: every address failed:", "refused")
    assert "with exceptions" not in done.stderr, done.stderr


def test_what_a_placed_worker_learns_is_wrapped_between_words(
    lone: Daemon, tmp_path: Path, tmux: Tmux
) -> None:
    """The note a placed job starts with (five lines at 80 columns) was printed bare:
    the terminal cut 'converged' and 'depends on' at its edge."""
    mine = ["mine", "skmeans", "--data", str(IRIS), "--k", "3", "--timeout", "1",
            "--out", str(tmp_path / "o")]  # fmt: skip
    screen = tmux.run(env_for(lone.home), *dms_argv(*mine))
    assert "note: the worker learns" in screen and "Traceback" not in screen, screen
    assert all(len(line) <= 80 for line in screen.splitlines()), screen


def test_onboard_changes_one_amount_and_keeps_the_others(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert dms(home, "init").returncode == 0
    one_line_error(at_80(home, "onboard", "--cpu", "1"), "nothing is onboarded yet", "--ram")
    first = ["onboard", "--cpu", "1", "--ram", "0.5", "--disk", "1", "--price", "2", "--json"]
    assert dms(home, *first, timeout=120).returncode == 0
    one_line_error(at_80(home, "onboard", "--cpu", "999"), "more than this machine has")
    done = dms(home, "onboard", "--cpu", "0.5", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["onboarded"] == {"cpu": 0.5, "ram_gib": 0.5, "disk_gib": 1.0, "gpu": 0}
    assert status["price"] == 2.0


def test_onboard_fits_a_24_line_terminal_the_pools_last_in_one_order(tmp_path: Path) -> None:
    """``dms onboard`` printed 35 lines at 80 columns: the pools (what was onboarded)
    first, then the capability one measure a line, so a 24-line terminal showed only
    the capability. And that capability was in measurement order without a daemon,
    alphabetical with one (its reply's keys sorted). Now: the capability two measures a
    row, then the pools and their price last, in 24 lines with one left for the
    prompt, in the same order both ways."""
    from dms.cli.resources import ABOUT_THE_RUN
    from dms.resources.benchmark import Capability

    measures = [name for name in Capability.model_fields if name not in ABOUT_THE_RUN]

    def shown(done: subprocess.CompletedProcess[str], cpu: str) -> None:
        assert done.returncode == 0, done.stderr
        clean(done)
        lines = done.stdout.rstrip("\n").splitlines()
        assert len(lines) < 24, done.stdout
        found = re.findall(r"\b(?:cpu|memory|disk|ckks|liu)_[a-z_]+\b", done.stdout)
        assert found == measures, done.stdout  # the order they are measured in
        assert lines[-1].startswith("price 2.0"), done.stdout
        onboarded = re.compile(rf"│ onboarded +│ {re.escape(cpu)} +│ 0\.5 +│ 1\.0 +│")
        assert any(onboarded.search(line) for line in lines[-8:]), done.stdout

    home = tmp_path / "home"
    assert dms(home, "init").returncode == 0
    amounts = ["--ram", "0.5", "--disk", "1", "--price", "2"]
    shown(at_80(home, "onboard", "--cpu", "1", *amounts), "1.0")  # the store's
    daemon = Daemon(home)
    try:
        shown(at_80(home, "onboard", "--cpu", "0.5"), "0.5")  # the daemon's reply
    finally:
        daemon.stop()


def leaf_commands() -> list[list[str]]:
    from typer.main import get_command

    from dms.cli.app import build_app

    def walk(command: Any, path: list[str]) -> Iterator[list[str]]:
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            yield path
            return
        for name, sub in subcommands.items():
            yield from walk(sub, [*path, name])

    return list(walk(get_command(build_app()), []))


def helps_at_80(home: Path, paths: list[list[str]]) -> list[tuple[int, str]]:
    """``dms PATH --help`` at 80 columns for every path, in one subprocess: the exit code
    and what it printed."""
    helps = dms_many(home, [[*path, "--help"] for path in paths], COLUMNS="80", LINES="50")
    return [(code, out + err) for code, out, err in helps]


def test_every_help_ends_with_real_examples_and_readable_types(tmp_path: Path) -> None:
    from typer.main import get_command

    from dms.cli.app import build_app
    from dms.cli.examples import EXAMPLES

    commands = leaf_commands()
    assert len(commands) > 30 and ["logs"] in commands
    root = get_command(build_app())
    helps = helps_at_80(tmp_path, commands)
    for path, (code, text) in zip(commands, helps, strict=True):
        assert code == 0, (path, text)
        assert "<bool>" not in text and "<list[" not in text and "<int" not in text, text
        assert "Examples:" in text, f"dms {' '.join(path)}: add its examples to dms/cli/examples.py"
        tail = text[text.rindex("Examples:") :].split("\n")[1:]
        shown = [line.strip() for line in tail if line.strip()]
        assert shown and shown[0].startswith(f"dms {' '.join(path)}"), (path, text)
        # Each example parses against its command: the options exist, the values fit.
        for example in EXAMPLES[" ".join(path)]:
            words = set(text.split())  # each word of each example whole, never folded
            assert all(word in words for word in example.split()), (example, text)
            argv = [a for a in shlex.split(example) if "=" not in a or a.startswith("-")]
            if argv[1].startswith("-"):
                continue  # 'dms --version': run in the test below
            command, args = root, argv[1:]
            while hasattr(command, "commands"):
                command, args = command.commands[args[0]], args[1:]
            command.make_context(" ".join(path), list(args))
    shown = {" ".join(path): text for path, (_, text) in zip(commands, helps, strict=True)}
    assert "INTEGER" in shown["run"]
    assert "PATH" in shown["mine skmeans"]


def test_groups_alone_list_their_commands_and_version_flag(tmp_path: Path) -> None:
    done = at_80(tmp_path, "peers")
    clean(done)
    for name in ("list", "self", "ping", "connect"):
        assert f" {name} " in done.stdout, done.stdout
    assert "Missing command" not in done.stdout + done.stderr
    version = at_80(tmp_path, "--version")
    assert (
        version.returncode == 0
        and version.stdout.strip() == at_80(tmp_path, "version").stdout.strip()
    )


def test_detach_logs_to_the_home_and_dms_logs_follows_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert dms(home, "init").returncode == 0
    assert dms(home, "logs").returncode != 0  # no log yet: said in one line
    done = at_80(home, "run", "--detach", "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0")
    assert done.returncode == 0, done.stderr
    said = done.stdout
    pid = int(said.split("(pid ")[1].split(")")[0])
    with contextlib.suppress(ProcessLookupError):
        try:
            follow_log(home, said, pid)
        finally:
            os.kill(pid, signal.SIGTERM)


def follow_log(home: Path, said: str, pid: int) -> None:
    assert len(said.strip().splitlines()) == 1 and "Traceback" not in said  # one line
    assert str(home / "logs" / "dms.log") in said and "dms logs" in said, said
    follow = subprocess.Popen(
        dms_argv("logs", "-f"), env=env_for(home), stdout=subprocess.PIPE, text=True
    )
    try:
        assert dms_json(home, "peers", "self")["peer_id"]  # the detached node answers
        shown = dms(home, "logs").stdout
        assert "dms node running" in shown, shown
        assert "alembic" not in shown and "Running upgrade" not in shown, shown  # fresh home
        assert "made private" not in shown, shown  # the log is this user's from the start
        assert stat.S_IMODE((home / "logs").stat().st_mode) == 0o700
        assert stat.S_IMODE((home / "logs" / "dms.log").stat().st_mode) == 0o600
        stopped = dms(home, "stop")
        assert stopped.returncode == 0 and f"(pid {pid})" in stopped.stdout, stopped.stderr
        assert dms(home, "stop").returncode != 0  # nothing left to stop: said so
        assert follow.stdout is not None
        lines = iter(follow.stdout.readline, "")
        assert any("dms node stopped" in line for line in lines)  # -f saw the new line
    finally:
        follow.terminate()
        follow.wait(timeout=20)


def test_the_log_rotates_private_and_dms_logs_follows_it_across(tmp_path: Path) -> None:
    from dms.cli.node import PrivateRotatingLog, log_path

    home = tmp_path / "home"
    path = log_path(home)
    handler = PrivateRotatingLog(path, max_bytes=1000, backups=2)
    logger = logging.getLogger("tests.rotation")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("first line")
        follow = subprocess.Popen(
            dms_argv("logs", "-f"), env=env_for(home), stdout=subprocess.PIPE, text=True
        )
        deadline = threading.Timer(60, follow.terminate)  # a read below never hangs
        deadline.start()
        try:
            assert follow.stdout is not None
            assert "first line" in follow.stdout.readline()
            # Read as written: each line once, in order, across two rotations.
            for first in (0, 40):
                for n in range(first, first + 40):  # 1,200 bytes: one rotation
                    logger.info("line %03d %s", n, "x" * 20)
                for n in range(first, first + 40):
                    assert f"line {n:03d}" in follow.stdout.readline()
        finally:
            deadline.cancel()
            follow.terminate()
            follow.wait(timeout=20)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(path.parent.iterdir())
    assert [f.name for f in files] == ["dms.log", "dms.log.1", "dms.log.2"]
    assert all(f.stat().st_size <= 1000 for f in files)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


def test_run_in_the_background_of_a_terminal_logs_to_the_home(tmp_path: Path, tmux: Tmux) -> None:
    home = tmp_path / "home"
    assert dms(home, "init").returncode == 0
    run = shlex.join(dms_argv("run", "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0"))
    peers = shlex.join(dms_argv("peers", "self"))
    # An interactive shell, as a person types it: job control puts '&' in the background.
    # 'peers self' once the node has written its api.json (at most 60 s).
    api = shlex.quote(str(home / "api.json"))
    up = f"for _ in $(seq 600); do [ -e {api} ] && break; sleep 0.1; done"
    script = f"{run} & {up}; {peers}; kill %1; wait"
    screen = tmux.run(env_for(home), "bash", "-i", "-c", script)
    assert "logging to" in screen and str(home / "logs" / "dms.log") in screen, screen
    assert " INFO " not in screen and "alembic" not in screen, screen
    assert (home / "logs" / "dms.log").exists()


def test_a_dial_that_recovers_is_not_an_error(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    # The second dials again every second (not every 10 s): it reaches the first soon
    # after that one is up.
    init_homes(first, second, config="heartbeat_s = 0.5\nreconnect_interval_s = 1\n")
    port = free_ports()[0]
    first_id = dms_json(first, "key", "list")[0]["peer_id"]
    # The second starts first and dials a peer that is not up yet, as when three daemons
    # start together; that peer comes up a moment later.
    early = Daemon(second, "--bootstrap", f"/ip4/127.0.0.1/tcp/{port}/p2p/{first_id}")
    late = None
    try:
        time.sleep(1.5)
        late = Daemon(first, "--listen", f"/ip4/127.0.0.1/tcp/{port}")

        def connected() -> bool:
            return any(p["peer_id"] == first_id for p in dms_json(second, "peers", "list"))

        wait_for(connected, 60, "the second node to reach the first")
        # What it said while dialing, up to the connection: not what a stop under load
        # may add (py-libp2p logs a handshake the stop cuts short at ERROR).
        said = early.stderr()
    finally:
        early.stop()
        if late is not None:
            late.stop()
    assert " ERROR " not in said, said
    assert "Failed to open TCP stream" not in said, said


class Pair:
    """A data owner and one provider of one core, running."""

    def __init__(self, root: Path) -> None:
        self.owner, self.provider = root / "owner", root / "provider"
        init_homes(self.owner, self.provider)
        self.provider_daemon, self.owner_daemon = providers_and_owners(
            [self.provider], [self.owner]
        )
        self.provider_id = self.provider_daemon.info["peer_id"]

    def stop(self) -> None:
        self.owner_daemon.stop()
        self.provider_daemon.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    made = Pair(tmp_path_factory.mktemp("pair"))
    try:
        yield made
    finally:
        made.stop()


def timed_lines(
    home: Path, *args: str, timeout: float = 120
) -> tuple[int, list[tuple[float, str]]]:
    """Run ``dms ARGS`` at 80 columns; its exit code and each output line with the time it
    came (stderr joined to stdout)."""
    env = env_for(home)
    env.update(COLUMNS="80", LINES="50", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        dms_argv(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = [(time.monotonic(), line.rstrip("\n")) for line in iter(proc.stdout.readline, "")]
    return proc.wait(timeout=timeout), lines


def longest_silence(lines: list[tuple[float, str]]) -> float:
    """The longest time between two lines, from the first: the command's start-up before
    it (Python's, the import of dms) is no part of it, and took seconds on a loaded
    machine."""
    times = [at for at, _ in lines]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def test_a_placed_job_that_waits_says_why_and_ends_with_a_hint(pair: Pair, tmp_path: Path) -> None:
    # Two workers of one core each, and one provider of one core: the second waits, and
    # says why (every 5 s: a line at 5 s), until its --timeout.
    mine = ["mine", "skmeans", "--data", str(IRIS), "--k", "3", "--shards", "2",
            "--timeout", "9", "--out", str(tmp_path / "o")]  # fmt: skip
    code, lines = timed_lines(pair.owner, *mine)
    text = "\n".join(line for _, line in lines)
    assert code != 0 and "Traceback" not in text, text
    assert "waiting" in text and "for a provider for shard" in text, text
    # Each peer's reason, by its latest heartbeat: the one provider is full with shard0
    # (it said "declined" to shard1 in the first round, and is not asked again).
    full = "(alive): not asked: too small by its last heartbeat: cpu 0 free < 1"
    assert f"{pair.provider_id[-8:]} {full}" in text, text
    assert "1 peer(s) alive, 0 fit" in text, text
    assert "hint:" in text and "--shards 1" in text and "--local" in text, text
    assert longest_silence(lines) < 10, text


def test_a_deployment_that_waits_says_why_and_ends_with_a_hint(pair: Pair, tmp_path: Path) -> None:
    job = tmp_path / "big.yaml"
    job.write_text(  # waits (a line every 5 s says why) until its deadline
        "name: big\ndeadline_s: 9\nallocations:\n  - {name: w, executor: compute, count: 1, "
        "resources: {cpu: 2, ram: 16MiB}, params: {mode: sleep, seconds: 0.1}}\n"
    )
    code, lines = timed_lines(pair.owner, "deploy", str(job), "--follow")
    text = "\n".join(line for _, line in lines)
    assert code != 0 and "Traceback" not in text, text
    assert "for a provider for w" in text and "0 fit" in text, text
    assert "not asked: too small by its last heartbeat: cpu 1 free < 2" in text, text
    assert "hint:" in text and "onboard more providers" in text, text
    assert longest_silence(lines) < 10, text


def test_sim_wraps_its_lines_instead_of_cutting_them(tmp_path: Path) -> None:
    """The README's first command: a provider killed mid-job, and why the worker was lost,
    said whole at 80 columns."""
    done = at_80(tmp_path, "sim", "run", str(ROOT / "examples" / "sim" / "quickstart.yaml"))
    assert done.returncode == 0, done.stderr
    clean(done)
    # py-libp2p's lines (the killed provider's failed dials) go to the run's sim.log,
    # not bare between the timeline's
    assert done.stderr == ""
    assert not any(line.rstrip().endswith("...") for line in done.stdout.splitlines())
    said = " ".join(done.stdout.split())
    # Whichever notices first (the heartbeat deadline, or the next step's dial) gives
    # the reason; either way it is said whole, up to the action taken.
    reason = r"the provider is gone \(missed its heartbeat deadline\)|the worker failed: .+?"
    assert re.search(rf"worker lost \(({reason})\); placing it again", said), said


SIM_LOGS = """
import logging, sys
from pathlib import Path
from dms.cli.sim import quiet_logging
with quiet_logging(Path(sys.argv[1]), "threads"):
    import dms.sim.threads  # what a scenario's nodes load, py-libp2p first among them
    logging.getLogger("libp2p.transport.tcp").error("Failed to open TCP stream: refused")
"""


def test_sim_sends_py_libp2p_lines_to_its_log_not_the_terminal(tmp_path: Path) -> None:
    """py-libp2p detaches its logger when first imported, which the scenario's nodes did
    after dms sim had sent it to sim.log: its errors went to stderr, bare."""
    done = subprocess.run(
        [sys.executable, "-c", SIM_LOGS, str(tmp_path)],
        env=env_for(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (
        "ERROR libp2p.transport.tcp: Failed to open TCP stream"
        in (tmp_path / "sim.log").read_text()
    )


def test_peers_list_fits_the_resources_in_80_columns(pair: Pair, tmux: Tmux) -> None:
    screen = tmux.run(env_for(pair.owner), *dms_argv("peers", "list"))
    assert "Traceback" not in screen, screen
    assert all(len(line) <= 80 for line in screen.splitlines()), screen
    header = next(line for line in screen.splitlines() if "status" in line)
    for column in ("cpu", "ram", "disk"):
        assert column in header, screen
    row = next(line for line in screen.splitlines() if pair.provider_id[-8:] in line)
    assert "1/1" in row and "alive" in row, screen  # free/total cores of the provider
    assert "--json shows them whole" in screen, screen


def test_what_peers_and_programs_say_is_printed_as_said(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An event, a provider's reason or a job's log line is text from elsewhere: brackets
    in it are printed, not read as markup (a '[/x]' ended dms deploy --follow with a
    MarkupError, a '[red]' vanished)."""
    from dms.cli.jobs import _print_event

    _print_event({"at": 0, "what": "12D3KooW declined: [/x] [red]no gpu"})
    assert "declined: [/x] [red]no gpu" in capsys.readouterr().out


def test_a_table_prints_brackets_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    """Cells hold what peers said (labels, reasons): as a table and stacked (too wide)."""
    from dms.cli.output import build_table, console

    for width in (200, 10):
        table, _ = build_table(
            "peers", ["peer", "labels"], [["12D3", "[/x] [red]gpu"]], width=width
        )
        console.print(table)
    assert capsys.readouterr().out.count("[/x] [red]gpu") == 2
