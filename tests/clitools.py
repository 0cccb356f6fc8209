"""Running ``dms`` as a user does: subprocesses with their own DMS_HOME."""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from dms.jobs.spec import load_spec
from dms.node.client import NodeClient
from dms.node.home import USER_KEY, init_home
from dms.security import Keystore
from tests.conftest import wait_for

T = TypeVar("T")

PASSPHRASE = "correct horse battery staple"


# How long Daemon.stop waits for a daemon's exit after SIGTERM, then after SIGABRT; the
# lines of its log before the stacks a failed stop shows.
STOP_WAIT_S = 60.0
ABORT_WAIT_S = 10.0
LOG_TAIL_LINES = 30

# The capability benchmark's measurements at 0.02 s each instead of 0.4 (each runs at
# least once; `dms onboard` then takes about 1.3 s instead of 4); tests/test_onboarding.py
# measures as users do.
BENCHMARK_STEP_S = "0.02"


def env_for(home: Path, *, quick_benchmark: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
    env.update(DMS_HOME=str(home), DMS_PASSPHRASE=PASSPHRASE)
    if quick_benchmark:
        env.update(DMS_BENCHMARK_STEP_S=BENCHMARK_STEP_S)
    return env


def dms(
    home: Path,
    *args: str,
    timeout: float = 60,
    quick_benchmark: bool = True,
    columns: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """``dms *args`` for ``home``; ``columns``: as in a terminal that wide (50 lines)."""
    env = env_for(home, quick_benchmark=quick_benchmark)
    if columns is not None:
        env.update(COLUMNS=str(columns), LINES="50")
    return subprocess.run(
        [sys.executable, "-m", "dms", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def at_80(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return dms(home, *args, timeout=timeout, columns=80)


def dms_json(home: Path, *args: str) -> Any:
    done = dms(home, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


MANY = """
import contextlib, io, json, sys
from dms.cli.app import main
answers = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    answers.append((code, out.getvalue(), err.getvalue()))
print(json.dumps(answers))
"""


def dms_many(home: Path, commands: list[list[str]], **env: str) -> list[tuple[int, str, str]]:
    """Several commands that only read, each through the CLI's own ``main`` as ``python -m
    dms`` calls it, in one subprocess (one start-up, not one per command; ``env`` added to
    the home's): each one's exit code, stdout and stderr."""
    done = subprocess.run(
        [sys.executable, "-c", MANY, json.dumps(commands)],
        env={**env_for(home), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return [(code, out, err) for code, out, err in json.loads(done.stdout)]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(count: int = 1) -> list[int]:
    """``count`` TCP ports free on 127.0.0.1 now, for daemons told to listen on them
    later. Drawn outside the kernel's ephemeral range: a port from bind(0) is one the
    kernel also hands outgoing connections, and between the probe and the daemon's bind
    (a minute in test_readme.py) one of the suite's connections (other workers' nodes
    dialing each other) could hold it, and the daemon failed 'address in use'."""
    low, high = _ephemeral_range()
    ports = range(10000, low) if low > 11000 else range(high + 1, 65536)
    rng = random.SystemRandom()  # not the test's seeded random: workers draw apart
    found: list[int] = []
    while len(found) < count:
        port = rng.choice(ports)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in found:
            found.append(port)
    return found


def side_by_side(calls: Iterable[Callable[[], T]], at_once: int = 4) -> list[T]:
    """Independent calls (``dms`` subprocesses, mostly waiting on Python's start-up and
    the daemon) run a few at a time; their results in the order given."""
    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(lambda call: call(), calls))


# The keys of a home a test only needs initialised are sealed by scrypt of cost 2^10, not
# 'dms init's 2^15: opening one (at every 'dms run' start and every command that signs)
# takes about 2 ms of CPU, not 80, and making the home no 'dms init' process (0.4 s).
# 'dms init' itself runs as users run it in test_daemon_cli.py, test_newcomer.py,
# test_readme.py and test_unlock.py.
TEST_SCRYPT_N = 2**10


def init_home_quick(home: Path) -> dict[str, Any]:
    """``home`` as ``dms init`` makes it (its code, ``dms.node.home.init_home``), its keys
    sealed with ``PASSPHRASE`` at ``TEST_SCRYPT_N``; what ``dms init --json`` reports."""
    return init_home(home, lambda _context, _confirm: PASSPHRASE, scrypt_n=TEST_SCRYPT_N)


def init_homes(*homes: Path, config: str = "heartbeat_s = 0.5\n") -> None:
    """Each home initialised (``init_home_quick``), then its config.toml."""
    for home in homes:
        init_home_quick(home)
        (home / "config.toml").write_text(config)


def submit(home: Path, job: Path, times: int) -> list[str]:
    """Submit ``job`` ``times`` times to the home's daemon as ``dms deploy`` does (same
    spec loading, same behaviour, signed by the user), in this process: for tests that
    need many deployments and check something else. Their ids."""
    spec = {"spec": load_spec(job).model_dump(mode="json")}
    user = Keystore(home, lambda _context, _confirm: PASSPHRASE).load(USER_KEY)
    client = NodeClient(home, user)
    return [client.invoke("/dms/node/deployment/new", spec)["id"] for _ in range(times)]


class Daemon:
    """``dms run`` for ``home``. Its log (stderr) goes to a file beside the home, appended
    to by a restart in the same home (``stderr()``): a pipe nobody reads fills after
    64 KiB and the daemon's next log line blocks the thread that writes it (a provider
    stuck mid-call froze a 40-round collaboration at round 39, and a daemon so blocked
    does not stop on SIGTERM)."""

    def __init__(self, home: Path, *extra: str) -> None:
        self.home = home
        self.log = home.with_name(f"{home.name}.stderr")
        with self.log.open("a") as log:
            self.proc = self._start(home, log, extra)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, self.stderr() or "no output"
        self.info = json.loads(line)

    @staticmethod
    def _start(home: Path, log: Any, extra: tuple[str, ...]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dms",
                "run",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--api-port",
                "0",
                "--json",
                *extra,
            ],
            # A fatal signal's handler writes every thread's stack to the log (stop()).
            env={**env_for(home), "PYTHONFAULTHANDLER": "1"},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )

    def stderr(self) -> str:
        """What the daemon logged (every run in this home, in order)."""
        return self.log.read_text()

    @classmethod
    def joining(cls, first: Daemon, *homes: Path) -> list[Daemon]:
        """Daemons of ``homes`` started side by side, each bootstrapping from ``first``."""
        bootstrap = first.info["addrs"][0]
        return side_by_side(lambda h=h: cls(h, "--bootstrap", bootstrap) for h in homes)

    def stop(self, wait_s: float = STOP_WAIT_S) -> int:
        """SIGTERM, and its exit code. Waited for 60 s: a daemon's own stop is bounded by
        about 20 s (its actors', then its host's, stop_timeout_s each), which a loaded
        machine can stretch. One still running then is a hung stop: it is ended with
        SIGABRT (its threads' stacks go to its log, PYTHONFAULTHANDLER; no core file),
        SIGKILL if even that does not end it, and the test fails with the end of its
        log. It failed with a bare TimeoutExpired, the daemon left running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(OSError, AttributeError):  # prlimit: Linux
            resource.prlimit(self.proc.pid, resource.RLIMIT_CORE, (0, 0))
        self.proc.send_signal(signal.SIGABRT)
        try:
            self.proc.wait(timeout=ABORT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        raise AssertionError(
            f"dms run (pid {self.proc.pid}, DMS_HOME {self.home}) did not stop within "
            f"{wait_s:g} s of SIGTERM, so it was killed; the end of its log ({self.log}), "
            f"with its threads' stacks when it could write them:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        """The log from a few lines before the stacks a fatal signal had written (its
        last 30 lines if there are none)."""
        lines = self.stderr().splitlines()
        dumps = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
        start = (dumps[-1] if dumps else len(lines)) - LOG_TAIL_LINES
        return "\n".join(lines[max(start, 0) :])

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as after a crash or power loss."""
        self.proc.kill()
        self.proc.wait(timeout=20)


def providers_and_owners(
    providers: list[Path],
    owners: list[Path],
    *,
    cpu: str = "1",
    first_args: tuple[str, ...] = (),
) -> list[Daemon]:
    """Nodes for initialised homes: each provider onboarded with ``cpu`` cores (1 GiB of
    RAM and disk), every node running and the first owner hearing every provider's
    resources. The first provider's node starts first (``first_args`` added), the
    others side by side bootstrapping from it while the providers onboard through their
    running nodes (a user's live change; before their start, onboarding came first and
    the nodes one after another). The daemons in the order given, providers first."""
    onboard = ("onboard", "--cpu", cpu, "--ram", "1", "--disk", "1")
    first = Daemon(providers[0], *first_args)
    started = [first]
    try:
        with ThreadPoolExecutor(1) as pool:
            onboarding = pool.submit(dms, providers[0], *onboard, timeout=120)
            started += Daemon.joining(first, *providers[1:], *owners)
            done = [onboarding.result()]
        done += side_by_side(lambda h=h: dms(h, *onboard, timeout=120) for h in providers[1:])
        for one in done:
            assert one.returncode == 0, one.stderr

        def heard() -> bool:
            rows = dms_json(owners[0], "peers", "list")
            return sum(1 for r in rows if r.get("onboarded", {}).get("cpu") == float(cpu)) == len(
                providers
            )

        wait_for(heard, 30, "the first owner to hear every provider")
    except BaseException:
        for daemon in started:
            daemon.stop()
        raise
    return started
