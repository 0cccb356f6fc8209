"""``Requester.start`` over stored deployments, without a network: what fails a
deployment at a restart (its stored record cannot be read) and what does not (the
node stopping while it starts)."""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from dms.orchestrator.messages import REVERT
from dms.orchestrator.requester import Requester
from dms.orchestrator.store import DeploymentStore
from dms.security.identity import Identity
from dms.store.db import open_database
from tests.test_orchestrator import spec


class StoppedSystem:
    def __init__(self) -> None:
        self.stopped = True


class StoppingNode:
    """A node actor whose actor system is stopping (``dms run`` stopped during its
    start): it spawns no actor, as ``ActorSystem.spawn`` then refuses, and records
    whatever would be sent."""

    def __init__(self) -> None:
        self.system = StoppedSystem()
        self.handle = None
        self.sent: list[tuple[Any, str, Any]] = []

    def spawn(self, cls: type, *args: Any, inbox: str | None = None, **kw: Any) -> Any:
        raise RuntimeError("actor system is stopped")

    def invoke(self, to: Any, behaviour: str, payload: Any = None, **kw: Any) -> None:
        self.sent.append((to, behaviour, payload))

    def send(self, to: Any, behaviour: str, payload: Any = None, **kw: Any) -> None:
        self.sent.append((to, behaviour, payload))

    def call_later(self, delay_s: float, fn: Any) -> None:
        return None


def running_row(peer: str) -> dict[str, Any]:
    now = time.time()
    return {
        "id": "d-healthy", "name": "test", "state": "running",
        "spec": spec(params={"seconds": 600.0}),
        "slots": [{
            "slot": "w", "status": "running", "peer_id": peer, "lease_id": "lease-1",
            "allocation": {"id": "ab" * 32, "host": peer, "inbox": "allocation-1"},
            "attempts": 1, "excluded": [], "reasons": {peer: "won"}, "result": None,
            "error": None, "placing_since": now, "running_at": now, "reason": "running",
            "since": now, "deadline": now + 30,
        }],
        "events": [{"at": now, "what": "state: running"}],
        "created_at": now, "running_at": now, "ended_at": None,
    }  # fmt: skip


def test_a_node_stopping_during_its_start_fails_no_healthy_deployment(tmp_path: Path) -> None:
    """The node stopped while it resumed its deployments (its actor system refuses new
    actors): a healthy running deployment could not be spawned, and was failed as
    unreadable and every lease of it reverted. It stays running, for the next start to
    resume, and nothing is sent."""
    peer = Identity.generate().peer_id
    with closing(open_database(f"sqlite:///{tmp_path / 'dms.db'}")) as db:
        DeploymentStore(db).save(running_row(peer))
        node = StoppingNode()
        requester = Requester(node, peer_table=None, db=db)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="actor system is stopped"):
            requester.start()
        row = DeploymentStore(db).get("d-healthy")
        assert row is not None
        assert row["state"] == "running", row["events"]
        assert row["ended_at"] is None
        assert node.sent == [] and requester.reverts.pending == 0


def test_a_slot_that_cannot_be_read_still_gives_back_its_peers_lease(tmp_path: Path) -> None:
    """A running slot stored with no allocation handle cannot be carried on from: its
    deployment fails. The slot still names its peer, and the revert of everything goes
    there too, not only to the peers the readable slots and the bid index name (here
    none: before, nothing was sent, and the lease waited for the provider's held check)."""
    peer = Identity.generate().peer_id
    row = running_row(peer)
    row["slots"][0]["allocation"] = None
    with closing(open_database(f"sqlite:///{tmp_path / 'dms.db'}")) as db:
        DeploymentStore(db).save(row)
        node = StoppingNode()
        node.system.stopped = False
        requester = Requester(node, peer_table=None, db=db)  # type: ignore[arg-type]
        requester.start()
        failed = DeploymentStore(db).get("d-healthy")
        assert failed is not None and failed["state"] == "failed"
        assert [(to.address.host, what, payload) for to, what, payload in node.sent] == [
            (peer, REVERT, {"deployment_id": "d-healthy", "lease_ids": [], "everything": True})
        ]
