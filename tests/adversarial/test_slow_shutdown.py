"""Item 8 of issue 17 (shutdown): ``ActorSystem.stop`` finishes even when an actor is
slow to stop; its pending invokes fail with a reason and its transport stops.

Before, ``stop`` waited 5 s for the slow actor, then raised pykka's ``Timeout``
out of ``stop`` itself: the pending invokes never failed (their callers waited
on futures nobody would complete) and the libp2p host kept running.
"""

from __future__ import annotations

import threading

import pytest

from dms.actor import Actor, ActorContext, ErrorCode, RemoteError, Request, behaviour
from dms.node.client import root_handle
from dms.sim.cluster import LocalCluster
from tests.conftest import wait_for


class Stubborn(Actor):
    """Takes as long as ``release`` says to stop."""

    def __init__(self, context: ActorContext, release: threading.Event) -> None:
        super().__init__(context)
        self.release = release

    def stopping(self) -> None:
        self.release.wait(120)


class Silent(Actor):
    @behaviour("/test/silent", public=True)
    def silent(self, request: Request) -> None:
        request.defer()  # never answers


def test_stop_finishes_with_a_slow_actor(cluster: LocalCluster) -> None:
    node, peer = cluster.start(2)
    cluster.wait_linked()
    assert node.system is not None and node.node is not None and peer.system is not None
    release = threading.Event()
    try:
        node.system.spawn(Stubborn, release)
        silent = peer.system.spawn(Silent)
        pending = node.node.invoke(silent.handle, "/test/silent", timeout=300)
        assert node.transport is not None
        transport = node.transport

        stopper = threading.Thread(target=node.system.stop, kwargs={"timeout": 1.0})
        stopper.start()
        stopper.join(60)
        assert not stopper.is_alive(), "ActorSystem.stop did not return"

        with pytest.raises(RemoteError) as info:
            pending.result(5)
        assert info.value.code == ErrorCode.STOPPED
        # A new invoke fails at once too, and the host is gone from the network.
        late = node.node.invoke(root_handle(peer.peer_id), "/public/hello", timeout=300)
        with pytest.raises(RemoteError) as info:
            late.result(5)
        assert info.value.code == ErrorCode.STOPPED
        wait_for(lambda: transport._stopped, timeout=30, what="the transport to stop")
    finally:
        release.set()
