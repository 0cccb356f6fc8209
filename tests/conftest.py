"""Shared fixtures: real actor systems on an in-memory network, temporary homes."""

from __future__ import annotations

import compileall
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import dms
from dms.actor import ActorSystem, Limits, MemoryNetwork
from dms.security import Identity
from dms.sim.cluster import LocalCluster

NodeFactory = Callable[..., ActorSystem]

# Hypothesis without its timing checks, for every test (a test's own settings inherit
# these): its default deadline of 200 ms an example and its too_slow health check count
# the machine's pauses, not the code's. Paused 0.3 s mid-run (SIGSTOP, as a busy CI
# machine pauses a process), test_encode_decode_round_trips failed as FlakyFailure,
# "Unreliable test timings" (an example of 0.23 ms took 303 ms).
settings.register_profile("dms", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("dms")

# A suite started with Ctrl-C ignored (a background job of a shell without job
# control, nohup-like launchers) passed SIG_IGN on to every process it started, and
# a dms command then never saw the Ctrl-C its tests send: the Ctrl-C tests of
# test_readable_cli.py waited out their timeouts. A handler, unlike SIG_IGN, is not
# inherited across exec: each child starts with the default and Python's own.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config: pytest.Config) -> None:
    """With PYTHONDONTWRITEBYTECODE set (as on this project's shared machine), no Python
    process writes its bytecode, and every ``dms`` the suite starts (hundreds of CLI
    commands and daemons a run) compiled dms's ~150 modules again: 0.2 s of CPU a
    daemon, 10 % of a CLI-heavy file's. They are compiled once here, in the main
    process (the flag stops only writing: the processes read them)."""
    if sys.flags.dont_write_bytecode and not hasattr(config, "workerinput"):
        compileall.compile_dir(Path(dms.__file__).parent, quiet=1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", help="also run the long scale tests (marked slow)"
    )


# The files that take longest (about 30 s to 2 min each, measured in full runs), longest
# first. They start the run: xdist (--dist loadfile, --no-loadscope-reorder) hands out
# files in collection order, so the long ones are spread over the workers early and the
# run ends on short files, not on one worker finishing test_readme.py while the others
# idle. By default xdist orders files by how many tests they hold, which put these
# (one to five tests each) last.
LONGEST_FIRST = (
    # Every file of 12 s or more, longest first: the sum of its tests' durations in one
    # full run (pytest --durations=0, three workers on two cores, at b30395d; the four
    # Ctrl-C tests of test_readable_cli.py, which timed out there, counted as passing).
    # A long file left to the end kept one worker busy alone while the others had
    # finished. test_store_failures.py (about 2 min then) was not listed: it started
    # among the last files.
    "test_network_budgets.py",
    "test_orchestrator.py",
    "test_newcomer.py",
    "test_store_failures.py",
    "test_nat.py",
    "test_mining_placed.py",
    "test_mining_hostile.py",
    "test_sim_faults.py",
    "test_collab_cli.py",
    "test_readable_cli.py",
    "test_collab_nodes.py",
    "test_adversarial_heap.py",
    "test_relay.py",
    "test_adversarial_budgets.py",
    "test_readme.py",
    "test_mining_blind.py",
    "test_adversarial_leases.py",
    "test_unlock.py",
    "test_orchestrator_hostile.py",
    "test_resources_ledger.py",
    "test_mining_algorithms.py",
    "test_libp2p_patches.py",
    "test_sim_collab.py",
    "test_sim_processes.py",
    "test_adversarial_gossip.py",
    "test_onboarding.py",
    "test_daemon_logs.py",
    "test_heartbeats.py",
    "test_nat_sim.py",
    "test_bench_placement.py",
    "test_adversarial_tokens.py",
    "test_adversarial_flood.py",
    "test_private_groups.py",
    "test_careless_user.py",
    "test_adversarial_decode.py",
    "test_mine_network_cli.py",
    "test_mining_cheats.py",
    "test_mining_active.py",
    "test_cap_cli.py",
    "test_mine_cli.py",
    "test_config_cli.py",
    "test_cli_startup.py",
    "test_daemon_cli.py",
    "test_js_gossipsub.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (``LONGEST_FIRST``), each file's tests in their order.
    Scale tests (``@pytest.mark.slow``) run with ``--run-slow`` or DMS_RUN_SLOW=1; the
    default suite stays within its 10 minutes on two cores."""
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if config.getoption("--run-slow") or os.environ.get("DMS_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="a slow scale test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def memnet() -> Iterator[MemoryNetwork]:
    net = MemoryNetwork()
    yield net
    net.close()


@pytest.fixture
def make_node(memnet: MemoryNetwork) -> Iterator[NodeFactory]:
    """Start actor systems ("nodes") on one in-memory network; all stop at teardown."""
    started: list[ActorSystem] = []

    def make(limits: Limits | None = None, network: MemoryNetwork | None = None) -> ActorSystem:
        identity = Identity.generate()
        net = network or memnet
        system = ActorSystem(identity, net.transport(identity.peer_id), limits=limits)
        started.append(system)
        return system

    yield make
    for system in started:
        system.stop()


@pytest.fixture
def dms_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("DMS_HOME", str(home))
    monkeypatch.setenv("DMS_PASSPHRASE", "correct horse battery staple")
    for var in ("DMS_DB_URL", "DMS_API_PORT"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCluster]:
    """Real dms nodes (libp2p on 127.0.0.1, SQLite homes) in this process; all stop at the end.

    ``cluster.start(n)`` starts n nodes, each bootstrapping from up to three
    running ones; ``cluster.restart(node)`` restarts one from its home.
    """
    for var in ("DMS_HOME", "DMS_DB_URL", "DMS_API_PORT", "DMS_BOOTSTRAP", "DMS_LISTEN"):
        monkeypatch.delenv(var, raising=False)
    with LocalCluster(tmp_path / "cluster") as nodes:
        yield nodes


# Heartbeats every second, so a provider is gone after 3 s without one: a running slot
# on a provider gone is lost and placed again, and at 0.5 s (1.5 s) a loaded machine's
# pause could lose a healthy one against the exact attempts and rounds the placement
# tests assert.
PLACEMENT_HEARTBEAT_S = 1.0


@pytest.fixture
def net(cluster: LocalCluster) -> LocalCluster:
    """The cluster placement tests use: heartbeats every second, and an allocation
    whose requester is gone (or, alive, let it go) stops after 3 s of silence. A test
    file that needs other settings defines its own ``net``."""
    cluster.settings.update(heartbeat_s=PLACEMENT_HEARTBEAT_S, orphan_s=3.0)
    return cluster


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Libp2p transports a test started (appended to the list it gets), stopped at
    its end side by side: one after another, a dozen hosts' goodbyes took 3 s."""
    from tests.clitools import side_by_side

    out: list[Any] = []
    yield out
    side_by_side((lambda t=t: t.stop() for t in out), at_once=max(len(out), 1))


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Poll until ``predicate()`` is true; fail the test with ``what`` if it never is.

    Between two polls it sleeps 0.05 s, or as long as the last poll took if longer (1 s
    at most: a poll that waited, e.g. a ping's dial, is no measure of its CPU): a
    predicate that runs a ``dms`` command (a Python start-up, ~0.3 s of CPU) polled back
    to back kept a core busy for the whole wait, taken from the other workers' tests on
    this two-core machine. A condition met is still seen within one poll's time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = time.monotonic()
        if predicate():
            return
        time.sleep(min(max(0.05, time.monotonic() - started), 1.0))
    pytest.fail(f"timed out after {timeout:g} s waiting for {what or predicate}")


def raised_by(
    fn: Callable[[], object], timeout: float = 60.0, what: str = ""
) -> BaseException | None:
    """Run ``fn`` on a thread of its own and wait, at most ``timeout``, for it to end;
    what it raised (None if it returned). For a call that must end by itself before
    its own, longer deadline: the test asserts how it ended, never how long it took."""
    ended: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # kept for the caller's assertions
            ended.append(exc)
        else:
            ended.append(None)

    threading.Thread(target=run, daemon=True).start()
    wait_for(lambda: ended, timeout, what)
    return ended[0]
