"""How many connections a node's connection manager aims at: py-libp2p's 175 for a node
of its own, a dozen for nodes sharing one process's trio loop (specs/sim.md, "Threads
mode at tens of nodes")."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from dms.config import ConfigError, Settings, load_settings
from dms.network.settings import NetworkSettings
from dms.node.daemon import Node, network_settings
from dms.sim.cluster import LocalCluster
from tests.conftest import wait_for

TARGET = re.compile(r"below target \((\d+),")


class _Targets(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = TARGET.search(record.getMessage())
        if found:
            self.seen.append(int(found.group(1)))


def aimed_at(node: Node) -> int:
    """The target py-libp2p's own auto-connector computes on the node's running swarm, as
    it says when below it (a node alone: no connection, nobody to dial)."""
    transport: Any = node.transport
    swarm = transport._host.get_network()
    targets = _Targets()
    logger = logging.getLogger("libp2p.network.auto_connector")
    logger.addHandler(targets)
    try:

        async def cycle() -> None:
            await swarm.auto_connector.maybe_connect()

        def said() -> bool:
            transport._call(cycle)  # skipped while its own periodic cycle runs
            return bool(targets.seen)

        wait_for(said, timeout=30, what="the auto-connector's cycle")
    finally:
        logger.removeHandler(targets)
    return targets.seen[-1]


def test_nodes_sharing_a_loop_aim_at_a_dozen_connections(cluster: LocalCluster) -> None:
    """Before, 175 (py-libp2p's midpoint of 50 and 300): every node of a cluster under 176
    dialed every other at start, 780 handshakes on one loop at 40 nodes."""
    node = cluster.add(bootstrap=[])
    assert aimed_at(node) == 12
    settings = node.network_settings
    assert (settings.dial_timeout_s, settings.handshake_timeout_s) == (15.0, 15.0)


def test_a_node_of_its_own_keeps_py_libp2ps_aim(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "own", shared_loop=False) as own:
        node = own.add(bootstrap=[])
        assert aimed_at(node) == 175
        settings = node.network_settings
        assert (settings.dial_timeout_s, settings.handshake_timeout_s) == (5.0, 5.0)
    real = network_settings(load_settings(home=tmp_path / "real"))
    assert (real.connection_aim, real.aimed_connections()) == (None, 175)
    mine = network_settings(load_settings(home=tmp_path / "mine", connection_aim=30))
    assert mine.connection_watermarks() == (30, 30, 30) and mine.aimed_connections() == 30


def test_an_aim_past_the_most_connections_is_refused(tmp_path: Path) -> None:
    """An aim past ``max_connections`` (py-libp2p's high watermark, 300) was taken, shown
    by ``dms config show``, and cut to 300 without a word when the node started."""
    most = NetworkSettings().max_connections
    assert load_settings(home=tmp_path, connection_aim=most).connection_aim == most
    with pytest.raises(ConfigError, match=r"connection_aim.*less than or equal to 300"):
        load_settings(home=tmp_path, connection_aim=most + 1)
    bound = Settings.model_fields["connection_aim"].metadata
    assert [m.le for m in bound if hasattr(m, "le")] == [most]  # one limit, the node's
