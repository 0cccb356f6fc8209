"""Providers that answer the requester with junk.

Each hostile provider is a real node on loopback whose behaviour is replaced
(the requester sees it exactly as it would see any peer). A malformed reply
fails or reopens the slot with a reason and never raises in the deployment
actor.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dms.actor import ErrorCode, Handle, Refusal, Request
from dms.jobs.spec import AllocationSpec
from dms.network.peertable import Heartbeat, PeerRecord, PeerTable
from dms.node.daemon import Node
from dms.orchestrator.givenback import GivenBackBook
from dms.orchestrator.messages import (
    ALLOCATE,
    BID,
    DEPLOYMENT_TOPIC,
    REQUEST,
    UPDATE,
    Bid,
    BidRequest,
    Offer,
)
from dms.orchestrator.rounds import misfit
from dms.orchestrator.store import DeploymentStore
from dms.orchestrator.supervision import STATUS
from dms.resources import Resources
from dms.sim.cluster import LocalCluster
from tests.conftest import wait_for
from tests.test_orchestrator import (
    TERMINAL,
    deploy,
    live_leases,
    network,
    owner,
    providers,
    spec,
    status,
    wait_known,
    wait_state,
)


def replace(node: Node, path: str, handler: Callable[[Request], Any]) -> None:
    """``node`` answers ``path`` with ``handler`` (run in its root actor) from now on."""
    assert node.node is not None
    node.node.pykka_ref.proxy().register(path, handler, public=True).get(timeout=5)


def event_with(requester: Node, dep: str, text: str) -> bool:
    return any(text in e["what"] for e in status(requester, dep)["events"])


def reasons(requester: Node, dep: str) -> dict[str, str]:
    return owner(requester, "/dms/node/deployment/manifest", {"id": dep})["slots"][0]["reasons"]


def test_bids_that_do_not_validate_or_name_another_peer_are_that_peers_reason(
    net: LocalCluster,
) -> None:
    requester, (junk, liar, honest) = network(net, 3)

    def junk_bid(request: Request) -> dict[str, Any]:
        offer = {"slot": "w", "lease_id": "l-1", "price": "lots", "expires_at": 0}
        return {"deployment_id": request.payload["deployment_id"], "peer_id": junk.peer_id,
                "did": "did:key:x", "offers": [offer]}  # fmt: skip

    def lying_bid(request: Request) -> dict[str, Any]:
        # A well-formed bid in the honest provider's name, for a lease it never made.
        offer = Offer(slot="w", lease_id="forged", price=0.0, expires_at=time.time() + 10)
        return Bid(deployment_id=request.payload["deployment_id"], peer_id=honest.peer_id,
                   did="did:key:x", offers=[offer]).model_dump()  # fmt: skip

    replace(junk, REQUEST, junk_bid)
    replace(liar, REQUEST, lying_bid)
    # Two slots: a round asks two peers a slot, so all three hear the first request.
    dep = deploy(requester, spec(count=2, params={"seconds": 0.2}))
    done = wait_state(requester, dep, TERMINAL, 30)
    assert done["state"] == "completed", done["events"]
    assert {s["peer_id"] for s in done["slots"]} == {honest.peer_id}
    why = reasons(requester, dep)
    assert why[junk.peer_id].startswith("bad bid: offers.0.price: Input should be a valid number")
    assert why[liar.peer_id].startswith(f"bad bid: it names peer {honest.peer_id[-8:]!r}")
    assert why[liar.peer_id].endswith("not the peer and deployment asked")
    wait_for(lambda: live_leases([junk, liar, honest]) == 0, 30, "every lease given back")


@pytest.mark.parametrize("direct_late", [False, True], ids=["direct_first", "topic_first"])
def test_a_provider_that_answers_a_round_twice_has_its_second_offer_for_a_slot_refused(
    net: LocalCluster, direct_late: bool
) -> None:
    """One offer a peer a slot a round, the first. A hostile provider asked directly
    also answers the round's published request, though it names it in ``asked``: a
    second lease for one slot, and declines for the slots it offered before. That
    offer is refused at once with its reason and its lease given back; its declines
    do not replace the offers it made; it is one offer among the slot's, not two
    (before: the slot's choice was "best of 3" among two peers, the second offer's
    row "lost: another offer of this peer won the slot" or a loss, and a decline row
    for slots it had offered for). The two bids arrive in either order (``topic_first``:
    the direct one made first, its reply held back a second): the same outcome."""
    requester, (hostile, honest) = network(net, 2)
    assert hostile.node is not None
    bidding = hostile.node.pykka_ref.proxy().bidding.get(timeout=5)
    heard: list[str] = []

    def answers_both(request: Request) -> Any:
        payload: BidRequest = request.payload
        heard.append("topic" if request.envelope.topic else "direct")
        request.payload = payload.model_copy(update={"asked": []})  # it ignores the list
        bid = bidding.bid_request(request)
        if direct_late and not request.envelope.topic:
            responder = request.defer()
            threading.Timer(1.0, responder.ok, args=(bid,)).start()
        return bid

    assert hostile.node is not None
    hostile.node.pykka_ref.proxy().register(
        REQUEST, answers_both, public=True, payload=BidRequest, topic=DEPLOYMENT_TOPIC
    ).get(timeout=5)
    # Three slots, two fitting peers: both asked directly, and the round published. Each
    # provider has room for four slots of 500m. The window takes the topic's bid in.
    dep = deploy(requester, spec(count=3, params={"seconds": 0}, bid_window_s=3))
    done = wait_state(requester, dep, TERMINAL, 40)
    assert done["state"] == "completed", done["events"]
    assert sorted(heard) == ["direct", "topic"]
    rounds = [e["what"] for e in done["events"] if e["what"].startswith("round ")]
    assert rounds == ["round 1: asking 2 peer(s) for 3 slot(s)"]
    bids = owner(requester, "/dms/node/deployment/manifest", {"id": dep})["bids"]
    mine = [b for b in bids if b["peer_id"] == hostile.peer_id]
    refused = [b for b in mine if b["reason"].startswith("refused: ")]
    assert len(refused) == 1, mine
    assert refused[0]["outcome"] == "lost"
    assert refused[0]["reason"].startswith(
        f"refused: a second offer of this peer for {refused[0]['slot']} in round 1"
    )
    kept = [b for b in mine if b not in refused]
    assert sorted((b["slot"], b["outcome"] != "decline") for b in kept) == [
        (f"w.{i}", True) for i in range(3)
    ]
    won = [b["reason"] for b in bids if b["outcome"] == "won"]
    assert len(won) == 3 and all(r.endswith("best of 2") for r in won), won
    wait_for(lambda: live_leases([hostile, honest]) == 0, 30, "every lease given back")


def test_a_provider_that_names_one_lease_for_two_slots_has_it_back_one(
    net: LocalCluster,
) -> None:
    """One slot a lease. A hostile provider with room for one slot answers the direct
    request with its real bid (one lease, declines for the other slots) and the round's
    published request with that lease for a slot it declined. Before, both offers were
    candidates and the lease won a slot: two 'won' rows for one lease. The later of the
    two (they arrive in either order) is refused at arrival with its row; the lease wins
    one slot, and every lease is committed or given back."""
    requester = net.add()
    (hostile,) = providers(net, 1, cpu=0.5)
    (honest,) = providers(net, 1, cpu=1)
    net.wait_linked()
    wait_known(requester, [hostile, honest])
    assert hostile.node is not None
    bidding = hostile.node.pykka_ref.proxy().bidding.get(timeout=5)
    direct: list[dict[str, Any]] = []
    published: list[Handle] = []  # where the published request's bids go

    def forge() -> None:
        (real,) = direct
        offer = real["offers"][0]
        other = next(d["slot"] for d in real["declines"] if d["slot"] != offer["slot"])
        forged = {**real, "offers": [{**offer, "slot": other}], "declines": []}
        bidding.node.invoke(published[0], BID, forged, timeout=10, on_reply=lambda _: None)

    def names_twice(request: Request) -> Any:
        payload: BidRequest = request.payload
        if request.envelope.topic:
            assert payload.reply_to is not None
            published.append(payload.reply_to)
            if direct:
                forge()
            return None
        bid = bidding.bid_request(request)
        direct.append(bid)
        if published:
            forge()
        return bid

    hostile.node.pykka_ref.proxy().register(
        REQUEST, names_twice, public=True, payload=BidRequest, topic=DEPLOYMENT_TOPIC
    ).get(timeout=5)
    # Three slots, two fitting peers: both asked directly, and the round published; room
    # for three slots between them (two on the honest one), so the hostile's lease wins.
    dep = deploy(requester, spec(count=3, params={"seconds": 0}, bid_window_s=3))
    done = wait_state(requester, dep, TERMINAL, 40)
    assert done["state"] == "completed", done["events"]
    assert len(direct) == 1 and len(published) == 1
    lease = direct[0]["offers"][0]["lease_id"]
    assert requester.db is not None
    bids = DeploymentStore(requester.db).bids(dep)  # the bid index, with the leases
    rows = sorted((b.outcome, b.reason) for b in bids if b.lease_id == lease)
    assert [outcome for outcome, _ in rows] == ["lost", "won"], rows
    assert rows[0][1].startswith(f"refused: its lease {lease} stands for w."), rows
    won = [(b.peer_id, b.lease_id) for b in bids if b.outcome == "won"]
    assert len(won) == 3 == len(set(won)), won
    wait_for(lambda: live_leases([hostile, honest]) == 0, 30, "every lease given back")


def test_a_bad_bid_for_an_earlier_round_is_no_reason_in_the_round_in_progress(
    net: LocalCluster,
) -> None:
    """A hostile provider holds back its reply to round 1's request and sends it, a bad
    bid (another deployment named), once round 2 has asked it again; then it answers
    round 2 with a good bid, which wins. Before, the late reply was taken as its answer
    in round 2: its 'bad bid: ...' became its reason there, and round 2's close wrote it
    as a decline row beside the provider's 'won' row for the same slot. It is judged
    against round 1: its lease is given back, and round 2 reads only the good bid."""
    requester, (hostile, other) = network(net, 2)
    assert hostile.node is not None and hostile.ledger is not None
    bidding = hostile.node.pykka_ref.proxy().bidding.get(timeout=5)
    calls: list[tuple[Any, dict[str, Any]]] = []
    answered = threading.Event()

    def answer_both() -> None:
        try:
            (first, old), (second, bid) = calls
            first.ok({**old, "deployment_id": "elsewhere"})  # round 1's reply, in round 2
            old_lease = old["offers"][0]["lease_id"]
            assert hostile.ledger is not None
            wait_for(lambda: old_lease not in [lease.id for lease in hostile.ledger.live()],
                     30, "round 1's lease given back")  # fmt: skip
            second.ok(bid)
        finally:
            answered.set()

    def holds_back(request: Request) -> None:
        bid = bidding.bid_request(request)
        calls.append((request.defer(), bid))
        if len(calls) == 2:  # round 2's request: round 1's reply goes first
            threading.Thread(target=answer_both, daemon=True).start()

    def refuses(request: Request) -> None:
        raise Refusal(ErrorCode.FORBIDDEN, "not this time")

    hostile.node.pykka_ref.proxy().register(
        REQUEST, holds_back, public=True, payload=BidRequest
    ).get(timeout=5)
    replace(other, ALLOCATE, refuses)
    # first-offer: round 1 closes at the other's offer, whose allocate is refused: the
    # slot is placed again in round 2, which asks the hostile provider alone. A window
    # (and so round 1's request's timeout) longer than all of it.
    dep = deploy(requester, spec(strategy="first-offer", params={"seconds": 0}, bid_window_s=30))
    done = wait_state(requester, dep, TERMINAL, 60)
    assert done["state"] == "completed", done["events"]
    assert answered.is_set() and len(calls) == 2
    assert [s["peer_id"] for s in done["slots"]] == [hostile.peer_id]
    bids = owner(requester, "/dms/node/deployment/manifest", {"id": dep})["bids"]
    mine = [(b["outcome"], b["reason"]) for b in bids if b["peer_id"] == hostile.peer_id]
    assert [outcome for outcome, _ in mine] == ["won"], mine
    wait_for(lambda: live_leases([hostile, other]) == 0, 30, "every lease given back")


def test_an_allocate_reply_without_a_handle_reopens_the_slot_with_its_reason(
    net: LocalCluster,
) -> None:
    requester, (hostile,) = network(net, 1)
    replace(hostile, ALLOCATE, lambda request: {"status": {"state": "starting"}})
    dep = deploy(requester, spec(params={"seconds": 0.2}, deadline_s=60))
    wait_for(lambda: event_with(requester, dep, "a malformed allocate reply"), 30, "the reopen")
    # Its committed lease was reverted; the slot waits, queued, for another peer.
    wait_for(lambda: live_leases([hostile]) == 0, 30, "the hostile provider's lease reverted")
    assert status(requester, dep)["slots"][0]["status"] == "open"
    (honest,) = providers(net, 1)
    net.wait_linked()
    wait_known(requester, [honest])
    done = wait_state(requester, dep, TERMINAL, 40)
    assert done["state"] == "completed", done["events"]
    slot = done["slots"][0]
    assert slot["peer_id"] == honest.peer_id and slot["attempts"] >= 2
    assert reasons(requester, dep)[hostile.peer_id] == (
        "a malformed allocate reply from the provider: allocation: Field required"
    )


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (["not", "a", "status"], "not a mapping but list"),
        ({"state": "exploded"}, "state: Input should be 'pending'"),
        ({"state": "completed", "result": b"\x00" * 8}, "result: Value error, the result cannot"),
    ],
)
def test_a_status_answer_that_is_no_status_reopens_the_slot_with_its_reason(
    net: LocalCluster, answer: Any, why: str
) -> None:
    requester, (hostile,) = network(net, 1)
    assert hostile.node is not None
    itself = hostile.node.handle.model_dump()  # the "allocation" it names is its root actor
    replace(hostile, ALLOCATE, lambda request: {"allocation": itself, "status": None})
    replace(hostile, STATUS, lambda request: answer)
    dep = deploy(requester, spec(params={"seconds": 0.2}, deadline_s=60))
    expected = f"a malformed status answer from the provider: {why}"
    wait_for(lambda: event_with(requester, dep, expected), 30, "the malformed answer's reopen")
    wait_for(lambda: live_leases([hostile]) == 0, 30, "the hostile provider's lease reverted")
    (honest,) = providers(net, 1)
    net.wait_linked()
    wait_known(requester, [honest])
    done = wait_state(requester, dep, TERMINAL, 40)
    assert done["state"] == "completed", done["events"]
    assert done["slots"][0]["peer_id"] == honest.peer_id
    assert reasons(requester, dep)[hostile.peer_id].startswith(expected)


def test_an_end_that_overtakes_its_allocate_reply_still_ends_the_slot(net: LocalCluster) -> None:
    """A job of no length ends before its provider's allocate reply leaves, and its end
    (the allocation's update) reaches the requester first: it is kept and applied when
    the reply comes. Here the status polls say "running" for ever, so without it the
    deployment would never end (it was seen only at the next poll, a second later)."""
    requester, (provider,) = network(net, 1)
    assert provider.node is not None
    root = provider.node
    itself = root.handle.model_dump()

    def allocate(request: Request) -> dict[str, Any]:
        p = request.payload
        end = {"slot": p["slot"], "lease_id": p["lease_id"], "state": "completed",
               "result": {"said": "early"}}  # fmt: skip
        root.send(Handle.model_validate(p["reply_to"]), UPDATE, end)
        time.sleep(0.3)  # the reply leaves well after the update
        return {"allocation": itself, "status": {"state": "starting"}}

    replace(provider, ALLOCATE, allocate)
    replace(provider, STATUS, lambda request: {"state": "running"})
    dep = deploy(requester, spec(params={"seconds": 0}, deadline_s=60))
    done = wait_state(requester, dep, TERMINAL, 30)
    assert done["state"] == "completed", done["events"]
    assert done["slots"][0]["result"] == {"said": "early"}
    assert done["slots"][0]["attempts"] == 1


def free_cpu(requester: Node, provider: Node) -> float | None:
    """The provider's free cpu by the last heartbeat the requester has."""
    record = requester.peer_table.get(provider.peer_id)
    return None if record is None or record.heartbeat is None else record.heartbeat.free.get("cpu")


def test_a_provider_too_small_at_first_is_judged_by_its_latest_heartbeat(
    net: LocalCluster,
) -> None:
    """A provider's "not asked: too small" is its reason only while its latest heartbeat
    says so. It was kept from the first round on (``setdefault``): the figures stayed
    those of the first heartbeat, and once the provider had grown and was asked, the
    slot still said it was not asked, too small (so the waiting line counted it as not
    fitting, and a job that timed out named it so). Here it grows, is asked, and never
    answers (a busy provider); another provider, big enough, declines each round (the
    job asks for a label it lacks). The job ends at its deadline saying who was asked."""
    requester, (provider, other) = network(net, 2, cpu=1)
    assert provider.ledger is not None and other.ledger is not None
    other.ledger.onboard(Resources(cpu=4, ram=4, disk=4))
    wait_for(lambda: free_cpu(requester, other) == 4, 30, "the big provider's heartbeat")
    asked = threading.Event()

    def never_answers(request: Request) -> None:
        request.defer()
        asked.set()

    replace(provider, REQUEST, never_answers)
    # A bid window longer than the deadline: once asked, the provider is still waited
    # for when the deadline comes. The deadline (20 s, not 12) must outlast the three
    # steps below, each a heartbeat and a round away (each waits up to 10 s: on a loaded
    # machine the three together could come near 12).
    job = spec(cpu="2", deadline_s=20, bid_window_s=30, constraints={"labels": ["big"]})
    dep = deploy(requester, job)
    peer = provider.peer_id

    def reason_is(expected: str | None) -> Callable[[], bool]:
        return lambda: reasons(requester, dep).get(peer) == expected

    too_small = "not asked: too small by its last heartbeat: cpu {} free < 2"
    wait_for(reason_is(too_small.format(1)), 30, "the first heartbeat's reason")
    provider.ledger.onboard(Resources(cpu=1.5, ram=4, disk=4))
    wait_for(reason_is(too_small.format(1.5)), 30, "the reason of its latest heartbeat")
    provider.ledger.onboard(Resources(cpu=4, ram=4, disk=4))
    wait_for(asked.is_set, 30, "the provider asked once its heartbeat says it fits")
    wait_for(reason_is(None), 30, "its stale 'not asked' reason dropped")
    done = wait_state(requester, dep, TERMINAL, 40)
    assert done["state"] == "failed"
    summary = done["events"][-1]["what"]
    assert "not placed within the deadline" in summary and "not asked" not in summary, summary
    assert f"{peer[-8:]}: asked, no answer yet" in summary, summary
    assert f"{other.peer_id[-8:]}: declined: this node lacks the labels big" in summary, summary


def test_a_provider_whose_last_heartbeat_counts_this_jobs_returned_leases_is_asked(
    net: LocalCluster,
) -> None:
    """A provider's heartbeat can go out while it holds leases it offered a round of
    this very deployment, which the requester then gives back (its bid lost, or came
    after the round closed). Until its next heartbeat (seconds away, longer in a large
    network) the requester read it as too small and did not ask it: a slot placed
    again meanwhile went to the peer holding the job's other slot ("best of 1",
    distinct peers broken) though this provider stood idle (test_mining_cheats.py's
    replicate test, twice in full suites). What the deployment gave back since that
    heartbeat counts as free on it now."""
    requester = net.add()
    first, second = providers(net, 2)
    # Its heartbeats as far apart as a node allows (300 s, longer than this test's
    # deadlines add up to): the one that counts the leases stays its last. At 30 s a
    # loaded CI run's next beat came before the slot was placed again (2 cpu free).
    third = net.add(heartbeat_s=300.0)
    assert third.ledger is not None and third.node is not None
    third.ledger.onboard(Resources(cpu=2, ram=4, disk=4))
    bidding = third.node.pykka_ref.proxy().bidding.get(timeout=5)
    node = bidding.node
    net.wait_linked()
    said = [0.0]

    def third_heard() -> bool:
        """Its beats 300 s apart: it says itself again, once a second, until the
        requester has heard it (one said before the gossip mesh formed was lost, and
        a loaded run waited out the test's deadline for the next)."""
        record = requester.peer_table.get(third.peer_id)
        if record is not None and record.heartbeat and record.heartbeat.onboarded.get("cpu"):
            return True  # its onboarding heard (its first beat, at its start, had none)
        if time.monotonic() - said[0] >= 1.0:
            node.announce()
            said[0] = time.monotonic()
        return False

    wait_for(third_heard, 30, "the requester to hear the third provider")
    wait_known(requester, [first, second, third])
    late, answered = threading.Event(), threading.Event()
    dep = ""

    def chosen() -> bool:
        return sum("chose" in e["what"] for e in status(requester, dep)["events"]) >= 2

    def answers_late_once(request: Request) -> Any:
        """Its first bid (both slots leased) goes with a heartbeat that shows them
        held, and is answered once the round has closed: the requester gives it back."""
        bid = bidding.bid_request(request)
        if late.is_set():
            return bid
        late.set()
        node.announce()
        responder = request.defer()

        def answer() -> None:
            deadline = time.monotonic() + 30
            try:
                while time.monotonic() < deadline:
                    # A status the loaded requester did not answer in time is asked again:
                    # raised here, it ended this thread, and the bid never came.
                    with contextlib.suppress(Exception):
                        if dep and chosen():
                            break
                    time.sleep(0.05)
                responder.ok(bid)
            finally:
                answered.set()

        threading.Thread(target=answer, daemon=True).start()
        return None

    third.node.pykka_ref.proxy().register(
        REQUEST, answers_late_once, public=True, payload=BidRequest, topic=DEPLOYMENT_TOPIC
    ).get(timeout=5)
    # A round waits its whole window for the third (3 s), whose answer comes after it.
    job = spec(count=2, cpu="1", params={"seconds": 600}, deadline_s=120, bid_window_s=3,
               distinct_peers=True)  # fmt: skip
    dep = deploy(requester, job)
    wait_state(requester, dep, ("running",), 30)
    wait_for(answered.is_set, 30, "the third's late bid")
    wait_for(lambda: third.ledger.live() == [] if third.ledger else False, 30, "its leases back")
    wait_for(lambda: free_cpu(requester, third) == 0, 30, "the heartbeat that shows them held")
    placed = {s["slot"]: s["peer_id"] for s in status(requester, dep)["slots"]}
    assert set(placed.values()) == {first.peer_id, second.peer_id}
    lost = next(slot for slot, peer in placed.items() if peer == first.peer_id)
    first.stop()  # its slot is placed again: on the idle third, not beside the other slot

    def placed_again() -> str | None:
        again = {s["slot"]: s for s in status(requester, dep)["slots"]}[lost]
        return again["peer_id"] if again["attempts"] > 1 and again["status"] == "running" else None

    wait_for(placed_again, 30, f"{lost} running again")
    manifest = owner(requester, "/dms/node/deployment/manifest", {"id": dep})
    why = {s["slot"]: s["reasons"] for s in manifest["slots"]}[lost]
    assert placed_again() == third.peer_id, why
    assert free_cpu(requester, third) == 0  # placed before the third's next heartbeat
    owner(requester, "/dms/node/deployment/shutdown", {"id": dep})
    wait_state(requester, dep, TERMINAL, 60)


def provider_seen_with_no_cpu_free(cpu: float, gib: float) -> PeerRecord:
    """A provider's record after a heartbeat showing ``cpu`` cores onboarded, all held."""
    table = PeerTable()
    beat = Heartbeat(nonce="n" * 16, seq=7, interval_s=1, deadline_s=3,
                     onboarded={"cpu": cpu, "ram_gib": gib, "disk_gib": gib, "gpu": 0},
                     free={"cpu": 0.0, "ram_gib": gib, "disk_gib": gib, "gpu": 0})  # fmt: skip
    table.observe("provider", "did:key:provider", beat)
    record = table.get("provider")
    assert record is not None
    return record


def test_leases_given_back_in_several_rounds_count_no_more_than_its_heartbeat_held() -> None:
    """Each round gives back what a losing bid leased, and counts it free on the peer
    until two of its heartbeats later. Rounds come faster than heartbeats (a slot placed
    again ~0.6 s after the first round): the same cores, leased and given back in each
    round, were counted free once a round. A provider of 2 cores whose heartbeat showed
    them all held counted 4 free after two rounds, so it was asked for a slot of 3 it
    can never take (a wasted ask, and a round short of a candidate), and weighted as
    idler than any. What was given back is at most what that heartbeat showed held."""
    record = provider_seen_with_no_cpu_free(cpu=2.0, gib=4.0)
    book = GivenBackBook()
    for rid in (1, 2):  # two rounds between two of its heartbeats, both bids lost
        book.note(record, Resources(cpu=2), rid)

    assert misfit(record, wanting("2"), book.credit(record)) is None  # its 2 are free
    too_big = misfit(record, wanting("3"), book.credit(record))
    assert too_big is not None and "cpu 2 free < 3" in too_big, too_big


def test_leases_given_back_in_several_rounds_count_once_beside_another_jobs_allocation() -> None:
    """What a heartbeat shows held counts other jobs' allocations too, so bounding the
    rounds' give-backs by it (or by what the peer onboarded) let them count once a round
    again beside one: a provider of 4 cores holding 2 for another job, whose heartbeat
    showed this job's lease of 2 held as well, read as 4 free after two rounds each gave
    back those same 2, and was asked for a slot of 3 it cannot take until that other job
    ends. One round's give-back counts, not their sum; offers given back separately in
    one round (a late one, an excluded one) still count together."""
    record = provider_seen_with_no_cpu_free(cpu=4.0, gib=8.0)
    book = GivenBackBook()
    for rid in (1, 2):
        book.note(record, Resources(cpu=2), rid)
    assert misfit(record, wanting("2"), book.credit(record)) is None  # this job's 2 are free
    too_big = misfit(record, wanting("3"), book.credit(record))
    assert too_big is not None and "cpu 2 free < 3" in too_big, too_big
    book.note(record, Resources(cpu=1), 3)  # a round of two offers, given back one by one
    book.note(record, Resources(cpu=1), 3)
    assert misfit(record, wanting("2"), book.credit(record)) is None


def wanting(cpu: str) -> AllocationSpec:
    return AllocationSpec(name="w", executor="compute", resources=Resources(cpu=cpu))


def test_a_round_reads_each_peers_heartbeat_once_whatever_its_slots(tmp_path: Path) -> None:
    """Choosing whom to ask reads each peer's free resources (its last heartbeat with what
    was given back to it) once a round: it was read again for every slot and once more
    for the sample's weights, a requester's largest cost before its first bid request
    with many peers (py-spy, 20 providers). Three providers, a job of two slots: three
    reads (nine before)."""
    import dms.orchestrator.rounds as rounds
    from dms.sim.backend import NodeSpec
    from dms.sim.faults import FaultPlan
    from dms.sim.memory import MemoryBackend
    from dms.sim.scenario import Amounts, NodeSettings

    specs = [NodeSpec("r", "r")] + [
        NodeSpec(f"p{i}", "p", onboard=Amounts(cpu=1, ram=1, disk=1)) for i in range(3)
    ]
    backend = MemoryBackend(tmp_path, specs, NodeSettings(), FaultPlan())
    backend.first = ["r"]
    backend.start(lambda _: None)
    try:
        wait_for(
            lambda: sum(1 for cpu in backend.alive_peers("r").values() if cpu) >= 3,
            60,
            "the providers' heartbeats",
        )
        reads: list[int] = []
        real = rounds.free_with
        rounds.free_with = lambda *a: reads.append(1) or real(*a)  # type: ignore[assignment]
        candidates = rounds.BidRounds._candidates

        def counted(self, open_slots):  # type: ignore[no-untyped-def]
            reads.clear()
            try:
                return candidates(self, open_slots)
            finally:
                per_round.append((len(open_slots), len(reads)))

        per_round: list[tuple[int, int]] = []
        rounds.BidRounds._candidates = counted  # type: ignore[method-assign]
        try:
            job = {
                "name": "two",
                "deadline_s": 30,
                "allocations": [
                    {"name": f"w{i}", "executor": "compute", "resources": {"cpu": "100m"},
                     "params": {"seconds": 0}}
                    for i in range(2)
                ],
            }  # fmt: skip
            backend.call("r", "/dms/node/deployment/new", {"spec": job})
            wait_for(lambda: bool(per_round), 30, "a bid round")
        finally:
            rounds.free_with = real  # type: ignore[assignment]
            rounds.BidRounds._candidates = candidates  # type: ignore[method-assign]
        assert per_round[0] == (2, 3)
    finally:
        backend.stop()
