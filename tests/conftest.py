"""Shared fixtures: real actor systems on an in-memory network, temporary homes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dms.actor import ActorSystem, Limits, MemoryNetwork
from dms.security import Identity

NodeFactory = Callable[..., ActorSystem]


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
