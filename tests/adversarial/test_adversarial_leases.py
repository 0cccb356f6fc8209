"""Issue 17, item 4: nothing a remote peer does holds a provider's resources without a
deadline. The hostile requester is a real node on loopback that speaks the placement
protocol directly (bid request, commit, allocate), or a provider that drops reverts."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from dms.actor import ErrorCode, RemoteError, Request
from dms.node.daemon import Node
from dms.orchestrator.base import node_handle
from dms.orchestrator.messages import (
    ALLOCATE,
    COMMIT,
    DEPLOYMENT_TOPIC,
    REQUEST,
    REVERT,
    BidRequest,
    RevertRequest,
)
from dms.orchestrator.store import DeploymentStore
from dms.orchestrator.supervision import STATUS
from dms.sim.cluster import LocalCluster
from tests.adversarial.hostile import envelope, frame_of, me, publish, refusal_code
from tests.adversarial.test_adversarial_budgets import staked_requester
from tests.conftest import wait_for
from tests.test_orchestrator import (
    TERMINAL,
    allocations_of,
    deploy,
    live_leases,
    network,
    providers,
    spec,
    wait_state,
)

PREFERENCES = {
    "max_leases_per_peer": 4,
    "bid_requests_per_s": 2.0,
    "bid_request_burst": 3,
    "max_lease_s": 60.0,
    "allocate_within_s": 2.0,
    "lapse_cooldown_s": 30.0,
}


@pytest.fixture
def net(cluster: LocalCluster) -> LocalCluster:
    cluster.settings.update(heartbeat_s=1.0, orphan_s=3.0, preferences=PREFERENCES)
    return cluster


def ask(attacker: Node, victim: Node, behaviour: str, payload: Any) -> Any:
    """From the attacker's root actor, signed by its node key, to the victim's root."""
    assert attacker.node is not None
    return attacker.node.ask(node_handle(victim.peer_id), behaviour, payload, timeout=10)


def bid_request(slots: int, lease_s: float = 10.0, **constraints: Any) -> dict[str, Any]:
    slot = {"executor": "compute", "params": {"seconds": 1}, "constraints": constraints,
            "resources": {"cpu": "100m", "ram": "16MiB"}}  # fmt: skip
    return BidRequest.model_validate(
        {
            "deployment_id": "attack",
            "lease_s": lease_s,
            "slots": [{"slot": f"w.{i}", **slot} for i in range(slots)],
        }
    ).model_dump()


def attacker_and_victim(net: LocalCluster) -> tuple[Node, Node]:
    attacker = net.add()
    (victim,) = providers(net, 1)
    net.wait_linked()
    return attacker, victim


def test_a_committed_lease_never_allocated_is_released(net: LocalCluster) -> None:
    attacker, victim = attacker_and_victim(net)
    assert victim.ledger is not None
    bid = ask(attacker, victim, REQUEST, bid_request(1))
    lease = bid["offers"][0]["lease_id"]
    committed = ask(
        attacker, victim, COMMIT, {"deployment_id": "attack", "slot": "w.0", "lease_id": lease}
    )
    # As the commit left it (read afterwards, a pause of allocate_within_s had released it).
    assert committed["state"] == "allocated"
    # It never allocates: the lease goes back after allocate_within_s, not never.
    wait_for(lambda: victim.ledger.lease(lease).state == "released", 30, "the lease released")
    with pytest.raises(RemoteError) as late:
        ask(attacker, victim, ALLOCATE, {"deployment_id": "attack", "slot": "w.0",
                                         "lease_id": lease, "executor": "compute"})  # fmt: skip
    assert late.value.code == "ended" and "not committed" in late.value.reason


def test_a_lease_committed_again_and_again_is_watched_once(net: LocalCluster) -> None:
    """Each commit of a lease not yet allocated put one more watch on the node's timers,
    each held ``allocate_within_s`` (30 s by default): a requester committing its lease
    again in a loop grew them without bound. Committing twice is harmless, and only
    the first commit's watch stands now."""
    net.settings.update(preferences={**PREFERENCES, "allocate_within_s": 120.0})
    attacker, victim = attacker_and_victim(net)
    assert victim.system is not None and victim.ledger is not None
    lease = ask(attacker, victim, REQUEST, bid_request(1))["offers"][0]["lease_id"]
    commit = {"deployment_id": "attack", "slot": "w.0", "lease_id": lease}
    ask(attacker, victim, COMMIT, commit)
    before = len(victim.system.timers)
    for _ in range(100):
        assert ask(attacker, victim, COMMIT, commit)["state"] == "allocated"
    # The node's own timers (heartbeats, sweeps) come and go meanwhile: a few at most.
    assert len(victim.system.timers) < before + 20


def test_a_requester_that_let_a_commit_lapse_gets_no_bids_for_a_while(
    net: LocalCluster,
) -> None:
    attacker, victim = attacker_and_victim(net)
    honest = net.add()
    net.wait_linked()
    assert victim.ledger is not None
    bid = ask(attacker, victim, REQUEST, bid_request(1))
    lease = bid["offers"][0]["lease_id"]
    ask(attacker, victim, COMMIT, {"deployment_id": "attack", "slot": "w.0", "lease_id": lease})
    wait_for(lambda: victim.ledger.lease(lease).state == "released", 30, "the lease released")
    with pytest.raises(RemoteError) as cooling:
        ask(attacker, victim, REQUEST, bid_request(1))
    assert cooling.value.code == ErrorCode.RATE_LIMITED
    assert "never allocated" in cooling.value.reason and "lapse_cooldown_s" in cooling.value.reason
    # Over gossip it is simply not answered; and other requesters are served as before.
    assert ask(honest, victim, REQUEST, bid_request(1))["offers"]
    events = victim.ledger.db.events("allocation.never_started")
    assert events[0].data["holder"] == attacker.peer_id and events[0].data["cooldown_s"] == 30


def test_one_bid_request_locks_no_more_than_the_provider_offers(net: LocalCluster) -> None:
    attacker, victim = attacker_and_victim(net)
    assert victim.ledger is not None
    bid = ask(attacker, victim, REQUEST, bid_request(10, lease_s=600))
    answered = time.time()  # no lease was made later (before the ask: a pause failed it)
    assert len(bid["offers"]) == 4  # max_leases_per_peer, of ten asked
    capped = "this requester holds 4 leases and allocations here, the most one peer may hold"
    assert [d["reason"].startswith(capped) for d in bid["declines"]] == [True] * 6
    assert not any(d["permanent"] for d in bid["declines"])
    # A lease lasts max_lease_s (60 s) whatever the request asks (600 s).
    assert all(o["expires_at"] <= answered + 60 for o in bid["offers"])
    again = ask(attacker, victim, REQUEST, bid_request(10))
    assert again["offers"] == [] and len(victim.ledger.live()) == 4
    # With max_allocations, leases and allocations together stay within it.
    ask(attacker, victim, REVERT, {"deployment_id": "attack", "everything": True})
    assert victim.ledger.live() == []
    victim.settings.preferences.max_allocations = 2
    bid = ask(attacker, victim, REQUEST, bid_request(5))
    assert len(bid["offers"]) == 2
    assert bid["declines"][0]["reason"].startswith("this node holds 2 leases and allocations")


def test_one_requester_holds_no_more_than_its_share_and_others_still_place(
    net: LocalCluster,
) -> None:
    """Commit-never-allocate: the attacker asks for the whole node, commits every offer
    and never allocates. Leases counted per peer did not stop it (a lease can be any
    size): with ``max_peer_share`` it holds half the node, and an honest requester
    places on the other half while the attacker still holds its commits."""
    attacker, victim = attacker_and_victim(net)
    assert victim.ledger is not None
    # The honest requester placed here before: the peers without a stake share half of
    # the node (unknown_share), which the attacker's half fills.
    honest = staked_requester(net, victim)
    victim.settings.preferences.max_leases_per_peer = 0  # the count alone: no limit
    victim.settings.preferences.max_peer_share = 0.5
    # The commits stay held through the test. At 2 s, ten commits and one more request
    # one after another on a loaded machine could outlast it: the first commits went
    # back, and the request was refused rate_limited (the lapse), or the honest job
    # placed only once the attacker's half was free again.
    victim.settings.preferences.allocate_within_s = 120.0
    bid = ask(attacker, victim, REQUEST, bid_request(20))  # 20 x 100m: both cores
    assert len(bid["offers"]) == 10
    over = (
        "this requester would hold 1.1 cores of this node's 2 cores, more than its share "
        "(max_peer_share 0.5)"
    )
    assert [d["reason"] for d in bid["declines"]] == [over] * 10
    assert not any(d["permanent"] for d in bid["declines"])
    for offer in bid["offers"]:
        commit = {"deployment_id": "attack", "slot": offer["slot"], "lease_id": offer["lease_id"]}
        ask(attacker, victim, COMMIT, commit)
    again = ask(attacker, victim, REQUEST, bid_request(1))
    assert again["offers"] == [] and again["declines"][0]["reason"].startswith(
        "this requester would hold 1.1 cores"
    )
    job = spec(cpu="500m", params={"seconds": 0}, constraints={"include_peers": [victim.peer_id]})
    done = wait_state(honest, deploy(honest, job), TERMINAL, 30)
    assert done["state"] == "completed", done["events"]
    attack = victim.ledger.live_ids("", attacker.peer_id)
    assert len(attack) == 10  # all the while
    assert {victim.ledger.lease(i).state for i in attack} == {"allocated"}


def slow_bid_rate(net: LocalCluster) -> None:
    """Bid requests: 3 at once, then one per 10 s, not 2 a second. The tests ask one
    after another, and at 2 a second a loaded machine's round trips (over 300 ms each)
    could let the budget refill between them, and none be refused."""
    net.settings["preferences"] = {**PREFERENCES, "bid_requests_per_s": 0.1}


def test_bid_requests_beyond_the_rate_are_refused_with_the_reason(net: LocalCluster) -> None:
    slow_bid_rate(net)
    attacker, victim = attacker_and_victim(net)
    refused: list[RemoteError] = []
    answered = 0
    for _ in range(12):  # burst 3, then one per 10 s; nothing fits, so nothing is locked
        try:
            ask(attacker, victim, REQUEST, bid_request(1, labels=["none-has-it"]))
            answered += 1
        except RemoteError as err:
            refused.append(err)
    assert answered >= 3 and refused
    assert {e.code for e in refused} == {"rate_limited"}
    assert "bid requests a second from this peer (bid_requests_per_s)" in refused[0].reason
    assert victim.ledger is not None and victim.ledger.live() == []


def test_bid_requests_over_the_rate_are_refused_before_their_signature_is_checked(
    net: LocalCluster,
) -> None:
    """The rate was checked in the handler: every flooded request was verified, decoded,
    validated and queued in the node actor's mailbox first, ahead of every other peer's
    requests. Now it is checked on the header: over the rate, even a forged signature
    is refused rate_limited, unverified."""
    slow_bid_rate(net)
    attacker, victim = attacker_and_victim(net)
    codes = []
    for _ in range(6):  # burst 3, then one per 10 s
        env = envelope(attacker, REQUEST, bid_request(1), to=victim, expect_reply=True)
        forged = frame_of(attacker, env)[:-64] + b"\x00" * 64
        codes.append(refusal_code(attacker, forged, env))
    assert codes[:3] == [ErrorCode.BAD_SIGNATURE] * 3
    assert ErrorCode.RATE_LIMITED in codes[3:]
    assert set(codes) == {ErrorCode.BAD_SIGNATURE, ErrorCode.RATE_LIMITED}


def test_a_gossip_bid_request_a_provider_cannot_serve_costs_it_no_write(
    net: LocalCluster,
) -> None:
    """Every subscriber hears every gossip bid request. Each wrote the declines of one it
    could not serve to its bid index (and a node that takes no work tried a lease):
    at the publisher's rate, rows on every node of the network."""
    attacker, victim = attacker_and_victim(net)
    assert victim.db is not None
    store = DeploymentStore(victim.db)
    reply_to = me(attacker).model_dump()

    def publish_both() -> None:
        unfit = bid_request(2, labels=["none-has-it"]) | {"deployment_id": "heard"}
        fits = bid_request(1) | {"deployment_id": "marker"}
        for request in (unfit, fits):
            env = envelope(attacker, REQUEST, request | {"reply_to": reply_to},
                           topic=DEPLOYMENT_TOPIC)  # fmt: skip
            publish(attacker, DEPLOYMENT_TOPIC, frame_of(attacker, env))

    # The one it can serve, heard after the other, is an offer: recorded.
    last = [0.0]

    def marker_recorded() -> bool:
        if time.monotonic() - last[0] > 0.5:
            last[0] = time.monotonic()
            publish_both()
        return bool(store.bids("marker"))

    wait_for(marker_recorded, 40, "the offer to the second request in the bid index")
    assert store.bids("heard") == []


def test_a_revert_is_retried_until_the_provider_answers(net: LocalCluster) -> None:
    requester, peers = network(net, 2)
    calls = {p.peer_id: 0 for p in peers}
    for provider in peers:
        assert provider.node is not None
        actor = provider.node.pykka_ref._actor_weakref()

        def dropping(request: Request, actor: Any = actor, peer: str = provider.peer_id) -> Any:
            calls[peer] += 1
            if calls[peer] == 1:  # the first revert is lost: no answer, nothing released
                request.defer()
                return None
            return actor.bidding.revert(request)

        proxy = provider.node.pykka_ref.proxy()
        proxy.register(REVERT, dropping, public=True, payload=RevertRequest).get(timeout=5)
    # One slot, two bids: the loser's lease (held 60 s) is reverted, and its first revert
    # is lost.
    dep = deploy(requester, spec(params={"seconds": 0.2}, lease_s=60))
    done = wait_state(requester, dep, TERMINAL, 30)
    assert done["state"] == "completed", done["events"]
    wait_for(lambda: live_leases(peers) == 0, 30, "the loser's lease released by a retry")
    assert sorted(calls.values())[-1] >= 2


def test_an_allocation_whose_requester_the_table_forgot_stops_when_it_goes(
    net: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Orphaned after 10 s without a call, not 3 or 6: its status polls (every second) are
    # all that keep it, and a loaded machine's pause of 2-5 s comes on top of a gap.
    net.settings["orphan_s"] = 10.0
    requester, (provider,) = network(net, 1)
    table_get = provider.peer_table.get
    # The provider's peers table does not hold the requester (dropped, or never heard).
    monkeypatch.setattr(
        provider.peer_table,
        "get",
        lambda peer: None if peer == requester.peer_id else table_get(peer),
    )
    dep = deploy(requester, spec(params={"seconds": 120}))
    wait_state(requester, dep, ("running",), 30)
    time.sleep(10.0 + 2)  # orphan_s and more: its status polls keep it alive
    assert live_leases([provider]) == 1
    net.crash(requester)
    wait_for(lambda: live_leases([provider]) == 0, 30, "the orphaned allocation stopped")


def allocation_threads(besides: frozenset[threading.Thread] = frozenset()) -> int:
    """Threads of allocation actors in this process (pykka names them by class), other
    than ``besides``: the worker process ran other tests before, and a node stopped
    there may have left a busy actor's thread to finish on its own."""
    return sum(
        1
        for t in threading.enumerate()
        if t.name.startswith("AllocationActor-") and t not in besides
    )


def test_ended_allocations_keep_no_thread_and_still_answer_late_polls(
    net: LocalCluster,
) -> None:
    """An ended allocation lingered (120 s) on a thread of its own to answer a late
    status poll: a requester placing short jobs one after another held a thread (and
    ~65 KB) per job on the provider, up to 256. Its actor now stops at its end; the
    provider answers its polls from a record, the same answer, to the same callers, for
    the last ``ended_allocations_kept`` of them."""
    net.settings.update(ended_allocations_kept=4)
    earlier = frozenset(threading.enumerate())
    requester, (provider,) = network(net, 1)
    stranger = net.add()
    assert provider.system is not None and requester.node is not None
    assert stranger.node is not None
    jobs = 6
    deps = []
    for _ in range(jobs):
        dep = deploy(requester, spec(params={"seconds": 0}))
        done = wait_state(requester, dep, TERMINAL, 30)
        assert done["state"] == "completed", done["events"]
        deps.append((dep, done["slots"][0]["result"]))

    def allocations() -> int:
        assert provider.system is not None
        return sum(1 for inbox in list(provider.system._actors) if inbox.startswith("alloc-"))

    wait_for(
        lambda: allocations() == 0 and allocation_threads(earlier) == 0,
        30,
        "every ended allocation's actor and thread to stop",
    )
    kept = deps[-4:]
    for dep, result in kept:  # a late poll of each: its final state, as before
        (handle,) = allocations_of(requester, dep)
        answer = requester.node.ask(handle, STATUS, timeout=10)
        assert answer["state"] == "completed" and answer["result"] == result
        assert answer["peer_id"] == provider.peer_id and answer["ended_at"] is not None
        assert set(answer) == {"lease_id", "deployment_id", "slot", "executor", "state",
                               "result", "error", "started_at", "ended_at", "peer_id"}  # fmt: skip
        logs = requester.node.ask(handle, "/dms/allocation/logs", timeout=10)
        assert logs[-1].endswith("state: completed")
        stop = requester.node.ask(handle, "/dms/allocation/stop", timeout=10)
        assert stop["state"] == "completed"  # stopping an ended one changes nothing
        with pytest.raises(RemoteError) as other:  # only its requester (or the node)
            stranger.node.ask(handle, STATUS, timeout=10)
        assert other.value.code == "forbidden" and other.value.rule == "not_requester"
        forged = handle.model_copy(update={"id": me(stranger).id})  # another key there
        with pytest.raises(RemoteError) as unknown:
            requester.node.ask(forged, STATUS, timeout=10)
        assert unknown.value.code == "unknown_actor"
    for dep, _ in deps[:-4]:  # past the count: not here, and the refusal says why
        (handle,) = allocations_of(requester, dep)
        with pytest.raises(RemoteError) as gone:
            requester.node.ask(handle, STATUS, timeout=10)
        assert gone.value.code == "unknown_actor"
        assert "ended_allocations_kept" in gone.value.reason
    # The provider's own actor does not answer as an allocation.
    with pytest.raises(RemoteError) as root:
        requester.node.ask(node_handle(provider.peer_id), STATUS, timeout=10)
    assert root.value.code == "unknown_behaviour"
    assert allocations() == 0 and allocation_threads(earlier) == 0


def test_commit_and_allocate_in_one_exchange_only_for_the_lease_holder(
    net: LocalCluster,
) -> None:
    """The requester's allocate with ``commit: true`` commits the bid's lease and starts
    the allocation at once; another peer naming that lease commits nothing."""
    attacker, victim = attacker_and_victim(net)
    honest = net.add()
    net.wait_linked()
    assert victim.ledger is not None
    lease = ask(honest, victim, REQUEST, bid_request(1))["offers"][0]["lease_id"]
    # 60 s of work: the allocation still holds its lease when the test looks (1 s was
    # no longer than a pause between the reply and the look).
    allocate = {"deployment_id": "attack", "slot": "w.0", "lease_id": lease,
                "executor": "compute", "params": {"seconds": 60}, "commit": True}  # fmt: skip
    with pytest.raises(RemoteError) as stolen:
        ask(attacker, victim, ALLOCATE, allocate)
    assert stolen.value.code == "forbidden" and "not held by the caller" in stolen.value.reason
    assert victim.ledger.lease(lease).state == "locked"
    reply = ask(honest, victim, ALLOCATE, allocate)
    assert reply["allocation"]["address"]["host"] == victim.peer_id
    assert victim.ledger.lease(lease).state == "allocated"
