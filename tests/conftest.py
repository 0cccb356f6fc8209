"""Shared fixtures: real actor systems on an in-memory network, temporary homes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dms.actor import ActorSystem, Limits, MemoryNetwork
from dms.security import Identity
from dms.sim.cluster import LocalCluster

NodeFactory = Callable[..., ActorSystem]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", help="also run the long scale tests (marked slow)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Scale tests (``@pytest.mark.slow``) run with ``--run-slow`` or DMS_RUN_SLOW=1; the
    default suite stays within its 10 minutes on two cores."""
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


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, what: str = "") -> None:
    """Poll until ``predicate()`` is true; fail the test with ``what`` if it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what or predicate}")
