"""A provider asks a live requester that went silent whether it still holds its allocation.

An allocation stopped by itself only when its requester was gone. A requester alive
but whose revert never arrived (lost in a restart: the revert outbox is in memory)
left the allocation running until its job ended. Real nodes on loopback.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dms.actor import Outcome
from dms.node.daemon import Node
from dms.provider.heldcheck import HeldChecks
from dms.security.identity import Identity
from dms.sim.cluster import LocalCluster
from dms.sim.faults import FaultPlan
from tests.conftest import wait_for
from tests.test_metrics import scrape, value
from tests.test_orchestrator import (
    HEARTBEAT,
    TERMINAL,
    deploy,
    live_leases,
    network,
    owner,
    spec,
    wait_known,
    wait_state,
)


def held_checks(provider: Node) -> object:
    assert provider.node is not None
    return provider.node.pykka_ref.proxy().bidding.get(timeout=5).held_checks


def test_an_allocation_its_requester_let_go_in_a_restart_stops(tmp_path: Path) -> None:
    plan = FaultPlan()
    # orphan_s 12 s: far longer than the requester is away here (a restart, 2-3 s), so
    # the peers table never holds it gone that long: only the question stops it.
    with LocalCluster(tmp_path, faults=plan, heartbeat_s=HEARTBEAT, orphan_s=12.0) as net:
        net.serve_api = True  # the provider's /metrics, read at the end
        requester, peers = network(net, 1)
        provider = peers[0]
        before = scrape(provider)
        assert value(before, "dms_held_check_let_go_total") == 0
        dep = deploy(requester, spec(params={"seconds": 600.0}))
        wait_state(requester, dep, ("running",), 30)
        # The shutdown's stop and revert are lost on the way, and the requester restarts
        # before a retry gets through: nothing of it reaches the provider.
        plan.partition([[requester.peer_id], [provider.peer_id]])
        done = owner(requester, "/dms/node/deployment/shutdown", {"id": dep})
        assert done["state"] == "shutdown"
        requester = net.restart(requester)
        plan.heal()
        requester.transport.connect(provider.addrs()[0])
        wait_known(requester, peers)
        wait_for(lambda: live_leases(peers) == 0, 60, "the let-go allocation to stop")
        checks = held_checks(provider)
        # Stopped on the requester's answer, not by the requester-gone rule.
        assert checks.let_go == 1 and checks.asked >= 1  # type: ignore[attr-defined]
        # ... and /metrics says so.
        after = scrape(provider)
        assert value(after, "dms_held_check_let_go_total") == 1
        assert value(after, "dms_held_check_questions_total") >= 1
        plan.close()


def test_a_requester_busy_past_orphan_s_keeps_its_allocation(net: LocalCluster) -> None:
    """Its deployment's actor is busy in one long turn (a mining owner's step): no poll
    for longer than ``orphan_s`` (3 s here); the provider asks, and the requester's node
    answers from the deployment's slots, not its busy actor: the work runs on."""
    requester, peers = network(net, 1)
    provider = peers[0]
    dep = deploy(requester, spec(params={"seconds": 10.0}))
    wait_state(requester, dep, ("running",), 30)
    checks = held_checks(provider)
    assert requester.node is not None
    actor = requester.node.pykka_ref.proxy().requester.get(timeout=5).deployments[dep]
    # 6 s: past orphan_s, within the slot's liveness (9 s), so the requester itself
    # keeps the slot when the turn ends.
    actor.tell_call(time.sleep, 6.0)
    asked = lambda: checks.asked >= 1  # type: ignore[attr-defined]  # noqa: E731
    wait_for(asked, 30, "the provider to ask the silent requester")
    done = wait_state(requester, dep, TERMINAL, 60)
    assert done["state"] == "completed", done["events"]
    assert done["slots"][0]["attempts"] == 1, done["slots"]
    assert checks.let_go == 0  # type: ignore[attr-defined]
    wait_for(lambda: live_leases(peers) == 0, 30, "the completed allocation's lease released")


class Asks:
    """A node's messaging that keeps each question it is given, unanswered."""

    def __init__(self) -> None:
        self.questions: list[tuple[dict[str, Any], Any]] = []

    def invoke(self, to: Any, behaviour: str, payload: Any = None, **kw: Any) -> None:
        self.questions.append((payload, kw["on_reply"]))


def test_an_allocation_that_ended_while_its_requester_was_asked_is_not_let_go() -> None:
    """Asked about two allocations, the requester holds neither when it answers: the
    one still running stops; the one that ended meanwhile (completed: its requester saw
    it so) is neither stopped nor counted let go."""
    asks, stopped = Asks(), []
    checks = HeldChecks(asks, lambda lease, why: stopped.append(lease), every_s=3.0)  # type: ignore[arg-type]
    requester = Identity.generate().peer_id
    checks.silent(requester, "dep", "first")  # asked at once
    checks.silent(requester, "dep", "running")  # these two with the next question
    checks.silent(requester, "dep", "ended")
    [(_, answer)] = asks.questions
    answer(Outcome(result={"held": ["first"]}))
    [_, (question, answer)] = asks.questions
    assert [x["lease_id"] for x in question["leases"]] == ["running", "ended"]
    checks.forget("ended")  # its allocation completed while the question was out
    answer(Outcome(result={"held": []}))
    assert stopped == ["running"] and checks.let_go == 1
