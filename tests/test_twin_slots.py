"""An offer for one slot of an allocation places any of its twins (``name.0``, ``name.1``...).

A provider that fits one slot of several leases the one it drew; two providers that
drew the same left the other slot without an offer: it was placed a round later, or,
while asked peers still owed answers (a partition's far side), after 2 s of grace.
Real nodes on loopback; the providers' draw is made the same on purpose. Then the
rounds alone, fed bids in a chosen order (``Round``): ``first-offer`` goes by arrival
across twins, and what each peer answered and why it lost reads right.
"""

from __future__ import annotations

import random
import time
import types
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dms.orchestrator.choosing as choosing
import dms.orchestrator.rounds as rounds
from dms.actor import Outcome, RemoteError
from dms.jobs.spec import DeploymentSpec
from dms.network.peertable import Heartbeat, PeerTable
from dms.orchestrator.base import LEFT_REASON, DeploymentBook, Orchestration
from dms.orchestrator.messages import Bid, Decline, Offer
from dms.orchestrator.records import BidRow
from dms.orchestrator.selection import RoundRobin, select
from dms.orchestrator.slots import Slot
from dms.provider import bidder
from dms.sim.cluster import LocalCluster
from tests.test_orchestrator import (
    TERMINAL,
    deploy,
    network,
    owner,
    spec,
    wait_state,
)


@pytest.mark.parametrize("strategy", ["score", "first-offer"])
def test_two_providers_that_lease_the_same_slot_place_both_in_one_round(
    net: LocalCluster, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    requester, peers = network(net, 2, cpu=1)
    # Each provider fits one of the two slots and draws the first: both offer w.0 (the
    # bidder's draw only, not every random.randrange of the process).
    monkeypatch.setattr(bidder, "random", types.SimpleNamespace(randrange=lambda n: 0))
    # A window no loaded machine outlasts: the round closes once both answered (score)
    # or both offered (first-offer); a bid later than the default window and its grace
    # (0.25 + 2 s) queued w.1, as the change under test would have without them.
    job = spec(count=2, cpu="1", strategy=strategy, params={"seconds": 1.0}, bid_window_s=15)
    dep = deploy(requester, job)
    done = wait_state(requester, dep, TERMINAL, 60)
    assert done["state"] == "completed", done["events"]
    events = [e["what"] for e in done["events"]]
    assert not any("queued" in e or e.startswith("round 2") for e in events), events
    slots = done["slots"]
    assert {s["peer_id"] for s in slots} == {p.peer_id for p in peers}, slots
    assert all(s["attempts"] == 1 for s in slots), slots
    # The offer made for w.0 that placed w.1 is recorded as won, under w.1.
    bids = owner(requester, "/dms/node/deployment/manifest", {"id": dep})["bids"]
    won = sorted(b["slot"] for b in bids if b["outcome"] == "won")
    assert won == ["w.0", "w.1"], bids


# ---- the rounds alone ---------------------------------------------------------------------


class _Messenger:
    def __init__(self) -> None:
        self.handle = None
        self.asked: dict[str, Any] = {}  # peer -> the reply callback of its bid request

    def invoke(self, to: str, behaviour: str, payload: Any, **kw: Any) -> None:
        self.asked[to] = kw["on_reply"]

    def call_later(self, delay_s: float, fn: Any) -> None:
        pass  # no window ends: the bids given close the round

    def publish(self, *args: Any, **kw: Any) -> None:
        pass


class _Store:
    def __init__(self) -> None:
        self.bids: list[BidRow] = []

    def save(self, row: Any, bids: list[BidRow]) -> None:
        self.bids += bids

    def record_bids(self, bids: list[BidRow]) -> None:
        self.bids += bids


class Round:
    """One bid round of a deployment of ``count`` twins (``w.0``...) that asks every one
    of ``peers``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, peers: list[str], **job: Any) -> None:
        monkeypatch.setattr(rounds, "node_handle", lambda peer: peer)  # names, not keys
        table = PeerTable()
        room = {"cpu": 4, "ram_gib": 4, "disk_gib": 4, "gpu": 0}
        for peer in peers:
            beat = Heartbeat(
                nonce="n" * 16, seq=1, interval_s=1, deadline_s=60, onboarded=room, free=room
            )
            table.observe(peer, f"did:key:{peer}", beat)
        self.store = _Store()
        o = Orchestration(
            peer_table=table, store=self.store, rng=random.Random(1), min_ask=len(peers)
        )  # type: ignore[arg-type]
        self.messenger = _Messenger()
        self.book = DeploymentBook(
            self.messenger,
            o,
            "dep1",
            DeploymentSpec.model_validate(spec(**job)),  # type: ignore[arg-type]
        )
        self.committed: dict[str, str] = {}  # slot -> lease
        self.placed_on: dict[str, str] = {}  # slot -> peer
        self.gone: list[tuple[str, str]] = []  # (peer, lease) of a slot held, then lost
        self.rounds = rounds.BidRounds(self.book, self.messenger, self)  # type: ignore[arg-type]
        self.rounds._round()
        assert set(self.messenger.asked) == set(peers)

    # RoundsHost
    def excludes(self, name: str, peer: str) -> bool:
        return self.book.excludes(name, peer)

    def commit(self, slot: Slot) -> None:
        assert slot.lease_id is not None and slot.name not in self.committed
        self.committed[slot.name] = slot.lease_id
        self.placed_on[slot.name] = slot.peer_id or ""

    def settle(self) -> None:
        pass

    def abort(self, what: str, per_slot: dict[str, str] | None = None) -> None:
        raise AssertionError(what)

    def bid(
        self, peer: str, offers: list[str], declines: tuple[str, ...] = (), lease: str = ""
    ) -> None:
        """``peer`` answers: a lease for each slot of ``offers``, named ``peer:slot``
        (or ``lease``)."""
        bid = Bid(
            deployment_id="dep1",
            peer_id=peer,
            did=f"did:key:{peer}",
            offers=[
                Offer(slot=s, lease_id=lease or f"{peer}:{s}", price=0, expires_at=time.time() + 60)
                for s in offers
            ],
            declines=[Decline(slot=s, reason="full") for s in declines],
            free={"cpu": 4},
            onboarded={"cpu": 4},
        )
        self.messenger.asked[peer](Outcome(result=bid.model_dump()))

    def reasons(self, name: str) -> dict[str, str]:
        return self.book.slots[name].reasons


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("stopped", "this node is stopping (root)"),
        ("unknown_actor", "no actor root with that key here"),
        ("timeout", "no reply from did:key:p to /dms/deployment/request"),
        ("unreachable", "peer p is unreachable: no known address"),
    ],
)
def test_a_refusal_that_is_no_answer_of_the_peers_keeps_what_it_declined(
    monkeypatch: pytest.MonkeyPatch, code: str, why: str
) -> None:
    """A round that asks a provider in its stop (it declined the round before, its
    leave not heard yet) is refused by its node, not answered by it: that refusal
    replaced the decline, and once the leave came the job that timed out said
    'the provider is gone (it said it was leaving); before: unknown_actor: no actor
    root with that key here' (tests/test_orchestrator.py, 4 workers), not why the
    provider could not run it. It is kept after the refusal, and after 'gone'."""
    r = Round(monkeypatch, ["p"], count=1)
    r.bid("p", [], declines=("w",))
    assert r.reasons("w") == {"p": "declined: full"}
    r.rounds._round()  # the next round asks p again
    r.messenger.asked["p"](Outcome(error=RemoteError(code, why)))
    assert r.reasons("w") == {"p": f"{code}: {why}; before: declined: full"}
    leaving = Heartbeat(nonce="n" * 16, seq=2, interval_s=1, deadline_s=60, leaving=True)
    r.book.o.peer_table.observe("p", "did:key:p", leaving)
    r.rounds._note_gone(list(r.book.slots.values()))  # as the next round starts
    assert r.reasons("w") == {"p": f"{LEFT_REASON}; before: declined: full"}


def test_first_offer_places_the_offers_that_came_in_first_across_twins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = Round(monkeypatch, ["p", "q", "r", "s"], count=3, strategy="first-offer")
    r.bid("p", ["w.2"])  # first in
    r.bid("q", ["w.2"])  # second
    r.bid("r", ["w.0", "w.1", "w.2"])  # third: three leases for three slots, it closes
    # Each slot's own offer was taken before a twin's that came in earlier: r's third
    # offer won two slots and q's, second in, lost ("another offer came in first").
    assert sorted(r.committed.values()) == ["p:w.2", "q:w.2", "r:w.2"], r.committed
    for name in r.committed:
        assert "another offer came in first" not in (r.reasons(name).get("q") or ""), name


def test_an_offer_that_placed_a_twin_says_so_and_declines_of_the_twin_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = Round(monkeypatch, ["p", "q"], count=2, strategy="random")
    # Each had room for one: it offered w.0 and declined w.1.
    r.bid("p", ["w.0"], declines=("w.1",))
    r.bid("q", ["w.0"], declines=("w.1",))
    assert sorted(r.committed.values()) == ["p:w.0", "q:w.0"], r.committed
    for name, lease in r.committed.items():
        winner = lease.partition(":")[0]
        other = next(n for n in r.committed if n != name)
        # On the other slot: its offer placed this one (not "lost: not drawn").
        assert r.reasons(other)[winner] == f"lost: its offer placed {name}", r.reasons(other)
    rows = {(b.peer_id, b.slot, b.outcome) for b in r.store.bids}
    # What each answered for w.1 is in the bid index, though its offer for w.0 was taken
    # for w.1 (or w.0).
    assert {("p", "w.1", "decline"), ("q", "w.1", "decline")} <= rows, rows


def test_a_lease_id_another_peer_named_too_is_still_its_own_providers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = Round(monkeypatch, ["p", "q"], count=2, strategy="score")
    # q names the lease id p chose (a hostile peer that learnt it, or a clash): two
    # leases all the same, each its provider's. Taken as one, the second slot went
    # unplaced and p's lease, counted as won, was neither committed nor given back.
    r.bid("p", ["w.0"], lease="x")
    r.bid("q", ["w.0"], lease="x")
    assert sorted(r.placed_on.values()) == ["p", "q"], r.placed_on
    won = sorted((b.peer_id, b.slot) for b in r.store.bids if b.outcome == "won")
    assert len(won) == 2 and {s for _, s in won} == {"w.0", "w.1"}, won


def test_a_twins_offer_does_not_place_a_slot_that_excludes_its_peer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r = Round(monkeypatch, ["p", "q", "s"], count=3, strategy="first-offer")
    r.book.slots["w.2"].excluded.append("p")  # w.2 was lost on p before
    r.bid("p", ["w.0", "w.1"])
    assert not r.committed  # two leases for three slots: the round waits
    r.bid("q", ["w.0"])  # three, and one that w.2 may take: it closes
    assert r.placed_on == {"w.0": "p", "w.1": "p", "w.2": "q"}, r.placed_on
    assert r.reasons("w.2") == {"q": "won: first in of 1 offer(s)"}, r.reasons("w.2")


@pytest.mark.parametrize(("distinct", "one", "two"), [(False, "b", "a"), (True, "a", "b")])
def test_a_peer_whose_listed_offer_placed_a_twin_offers_its_next(
    monkeypatch: pytest.MonkeyPatch, distinct: bool, one: str, two: str
) -> None:
    r = Round(monkeypatch, ["a", "b", "c"], count=3, strategy="score", distinct_peers=distinct)
    r.bid(one, ["w.2"])
    r.bid(two, ["w.0", "w.1"])
    r.bid("c", [], declines=("w.0", "w.1", "w.2"))  # the last answer: the round closes
    # Each slot listed a peer once, by its first offer: once that lease placed a twin,
    # the slot could not take the peer's next (w.2 went unplaced though a lease of
    # ``two`` was free; with distinct peers, the slot left out of the matching took
    # the lease of the peer matched to another): three leases, three slots, all placed.
    assert sorted(r.committed.values()) == sorted([f"{two}:w.0", f"{two}:w.1", f"{one}:w.2"])
    events = [e["what"] for e in r.book.row.events]
    assert not any("queued" in e for e in events), events


@pytest.mark.parametrize("distinct", [False, True])
def test_first_offer_waits_until_the_offers_in_hand_place_every_slot(
    monkeypatch: pytest.MonkeyPatch, distinct: bool
) -> None:
    r = Round(
        monkeypatch, ["p", "q", "r", "s", "t"], count=3, strategy="first-offer",
        distinct_peers=distinct,
    )  # fmt: skip
    for name in ("w.1", "w.2"):  # both lost on p and r before
        r.book.slots[name].excluded += ["p", "r"]
    r.bid("p", ["w.0"])
    r.bid("r", ["w.0"])
    r.bid("q", ["w.1"])
    # Three leases for three slots (three peers: as many as slots), and each slot has
    # one it may take; but w.1 and w.2 may take q's alone: no placement of all three.
    # Closed here (counting said enough), w.1 took q's lease and w.2 was queued for
    # round 2.
    assert not r.committed, r.committed
    r.bid("s", ["w.2"])  # one for w.1 or w.2: all three place, each on a peer of its own
    assert r.placed_on["w.0"] == "p", r.placed_on
    assert {r.placed_on["w.1"], r.placed_on["w.2"]} == {"q", "s"}, r.placed_on
    events = [e["what"] for e in r.book.row.events]
    assert not any("queued" in e for e in events), events


def test_first_offer_does_not_select_at_each_bid_while_twins_lost_on_most_peers_cannot_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """w.0-w.3 lost on every peer but ``a`` and ``b``: ``a``'s three leases are the only
    ones they may take until ``b`` answers. The count of the allocation's leases passes
    from the tenth bid on, and ``select`` on the offers in hand cannot place every slot:
    it ran at every bid from there (60-100 ms each at 256 twins)."""
    peers = ["a", "b", *(f"p{i}" for i in range(10)), "z"]  # z never answers
    r = Round(monkeypatch, peers, count=12, strategy="first-offer")
    for name in ("w.0", "w.1", "w.2", "w.3"):
        r.book.slots[name].excluded += [p for p in peers if p not in ("a", "b")]
    calls = []
    real = choosing.select
    monkeypatch.setattr(choosing, "select", lambda *a, **k: calls.append(1) or real(*a, **k))
    r.bid("a", ["w.4", "w.5", "w.6"])
    for i in range(10):  # 10 leases for w.4-w.11, more than enough
        r.bid(f"p{i}", [f"w.{4 + i % 8}"])
    assert not r.committed, r.committed
    assert not calls, f"select ran at {len(calls)} bids, the offers placing no w.0-w.3"
    r.bid("b", ["w.11"])  # a fourth lease w.0-w.3 may take: all place, the round closes
    assert len(r.committed) == 12, r.committed
    assert sorted(r.placed_on[f"w.{i}"] for i in range(4)) == ["a", "a", "a", "b"], r.placed_on


@pytest.mark.parametrize("strategy", ["first-offer", "score", "random"])
def test_twins_lost_on_different_peers_all_place_where_a_placement_exists(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    r = Round(monkeypatch, ["a", "b", "c", "z"], count=3, strategy=strategy)
    for name, peer in (("w.0", "b"), ("w.1", "a"), ("w.2", "c")):
        r.book.slots[name].excluded.append(peer)
    r.bid("a", ["w.0"])
    r.bid("b", ["w.1"])
    r.bid("c", ["w.0"])  # w.0 on c's, w.1 on b's, w.2 on a's: every slot places
    if strategy == "first-offer":
        assert r.rounds.round in r.rounds._closed  # closed at that bid
    else:
        r.bid("z", [])
    # Slot by slot, w.0 took a's and w.1 b's, and w.2 (which may take those two alone)
    # none: first-offer waited on, then left w.2 for a second round with the others.
    assert r.placed_on == {"w.0": "c", "w.1": "b", "w.2": "a"}, r.placed_on
    events = [e["what"] for e in r.book.row.events]
    assert not any("queued" in e for e in events), events


BIDDERS = ["a", "b", "c", "d", "e"]


@settings(max_examples=300)
@given(data=st.data())
def test_first_offer_closes_early_exactly_when_select_places_every_open_slot(
    data: st.DataObject,
) -> None:
    """Random twins (and a second allocation), exclusions, holders and bids: the round
    closes before every asked peer answered (``z`` never does) exactly when ``select`` on
    the offers in hand places every open slot, with distinct peers each on a peer of its
    own that holds none."""
    distinct = data.draw(st.booleans(), "distinct")
    allocations = [
        {
            "name": name,
            "executor": "compute",
            "count": data.draw(st.integers(1, top), f"{name} count"),
            "resources": {"cpu": "500m", "ram": "64MiB"},
            "params": {"seconds": 0.2},
        }
        for name, top in (("w", 4), ("v", 2))
        if name == "w" or data.draw(st.booleans(), "a second allocation")
    ]
    with pytest.MonkeyPatch.context() as mp:
        r = Round(
            mp, [*BIDDERS, "z"], strategy="first-offer", distinct_peers=distinct,
            allocations=allocations,
        )  # fmt: skip
        names = list(r.book.slots)
        for name in names:  # slots lost on some peers before
            r.book.slots[name].excluded += data.draw(
                st.lists(st.sampled_from(BIDDERS), unique=True, max_size=3), f"{name} excludes"
            )
        # Peers that hold other slots of the deployment (a slot placed again).
        holders = {
            p: 1 for p in data.draw(st.lists(st.sampled_from(BIDDERS), unique=True, max_size=2))
        }
        mp.setattr(r.rounds.chooser, "holders", lambda: holders)
        order = data.draw(st.permutations(BIDDERS), "order")
        for peer in order:
            offers = data.draw(st.lists(st.sampled_from(names), unique=True), f"{peer} offers")
            # Now and then one lease id for all its offers (named for two allocations).
            same = data.draw(st.booleans(), f"{peer} one lease id") if offers else False
            r.bid(peer, offers, lease=f"{peer}:x" if same else "")
            if r.rounds.round in r.rounds._closed:
                assert set(r.placed_on) == set(names), (
                    r.placed_on,
                    {n: r.reasons(n) for n in names},
                )
                if distinct:
                    peers = list(r.placed_on.values())
                    assert len(set(peers)) == len(peers), r.placed_on
                    assert not set(peers) & set(holders), (r.placed_on, holders)
                return
            # It waits only when it must: select on the offers in hand would not place
            # every slot (apart).
            decision = select(
                "first-offer", r.rounds.chooser.pooled(), random.Random(0), RoundRobin(), holders,
                distinct,
            )  # fmt: skip
            peers = [c.peer_id for c in decision.winners.values()]
            assert len(decision.winners) < len(names) or (
                distinct and (len(set(peers)) < len(peers) or bool(set(peers) & set(holders)))
            ), decision.winners


@pytest.mark.parametrize("strategy", ["score", "first-offer"])
def test_a_bad_bid_after_a_peers_kept_offer_reverts_not_its_lease(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """One offer a peer a slot a round, the first (specs/security.md). A hostile provider
    answers the published request with a good bid, then its direct request with a bad
    one (another deployment named) that names the same lease: before, that reverted the
    lease its kept offer held, which then won the slot (``score``: the round closed once
    both answered) or had won it already (``first-offer``: closed at the good bid), and
    its reason for the slot read "bad bid: ...". A bid cannot make the requester revert
    the lease it chose; what else the bad bid names goes back."""
    r = Round(monkeypatch, ["p", "q"], count=1, strategy=strategy)
    reverted: list[tuple[str, list[str]]] = []
    r.book.o.revert = lambda peer, payload: reverted.append((peer, payload["lease_ids"]))
    offer = Offer(slot="w", lease_id="p:w", price=0, expires_at=time.time() + 60)
    good = Bid(deployment_id="dep1", peer_id="p", did="did:key:p", offers=[offer],
               free={"cpu": 4}, onboarded={"cpu": 4})  # fmt: skip
    r.rounds._take_bid(r.rounds.round, good)  # the published request's bid, first
    other = offer.model_copy(update={"lease_id": "p:other"})
    bad = good.model_copy(update={"deployment_id": "other", "offers": [offer, other]})
    r.messenger.asked["p"](Outcome(result=bad.model_dump()))
    if strategy == "score":
        r.bid("q", [], declines=("w",))  # the last asked answers: the round closes
    assert r.committed == {"w": "p:w"}, r.committed
    assert reverted == [("p", ["p:other"])], reverted
    assert r.reasons("w")["p"].startswith("won: "), r.reasons("w")


@pytest.mark.parametrize("code", ["timeout", "unreachable", "unknown"])
def test_a_direct_request_that_fails_after_a_peers_kept_offer_is_no_decline_of_its_slot(
    monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    """A peer's first answer for a slot stands (specs/security.md): its published
    request's bid came first, then its direct request failed (a hostile or old provider
    answering both, the direct one left to time out). Before, the failure replaced its
    reason for the slot it had offered for, and the bid index read a 'decline' row
    'timeout: ...' beside its 'won' row for the same slot."""
    r = Round(monkeypatch, ["p", "q"], count=2, strategy="score")
    offer = Offer(slot="w.0", lease_id="p:w.0", price=0, expires_at=time.time() + 60)
    good = Bid(deployment_id="dep1", peer_id="p", did="did:key:p", offers=[offer],
               free={"cpu": 4}, onboarded={"cpu": 4})  # fmt: skip
    r.rounds._take_bid(r.rounds.round, good)
    r.messenger.asked["p"](Outcome(error=RemoteError(code, "no reply")))
    r.bid("q", [], declines=("w.0", "w.1"))
    assert r.committed == {"w.0": "p:w.0"}, r.committed
    rows = [(b.outcome, b.reason) for b in r.store.bids if (b.peer_id, b.slot) == ("p", "w.0")]
    assert [o for o, _ in rows] == ["won"], rows


def _stale_bid(deployment: str, price: Any) -> dict[str, Any]:
    """p's reply to round 1's request: an offer of lease ``p:old`` for w."""
    offer = {"slot": "w", "lease_id": "p:old", "price": price, "expires_at": time.time() + 60}
    return {"deployment_id": deployment, "peer_id": "p", "did": "did:key:p", "offers": [offer]}


STALE = {
    "timeout": Outcome(error=RemoteError("timeout", "no reply from did:key:p")),
    "error": Outcome(error=RemoteError("unknown", "no such thing")),
    "no_bid": Outcome(result=_stale_bid("dep1", "lots")),
    "other_deployment": Outcome(result=_stale_bid("other", 0)),
}


@pytest.mark.parametrize("kind", list(STALE))
def test_a_reply_to_an_earlier_rounds_request_is_nothing_of_the_round_in_progress(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Round 1's request to p is answered in round 2 (a slow or hostile provider; a
    timeout comes as late). Before, the reply was taken as p's answer in round 2: the
    round closed once q answered, without p's offer ('best of 1', p's offer then given
    back as late), and its failure became p's reason and a decline row of round 2. It
    is judged against its own round: what it offered goes back, and nothing else."""
    r = Round(monkeypatch, ["p", "q"], count=1, strategy="score")
    reverted: list[tuple[str, list[str]]] = []
    r.book.o.revert = lambda peer, payload: reverted.append((peer, payload["lease_ids"]))
    late = r.messenger.asked["p"]  # round 1's request to p: its reply comes in round 2
    r.bid("q", [], declines=("w",))
    r.rounds._close(1)  # the window and its grace ended: no offer, w queued
    r.rounds._round()  # round 2 asks both again
    assert r.rounds.round == 2
    late(STALE[kind])
    assert "p" not in r.reasons("w"), r.reasons("w")
    r.bid("q", ["w"])
    assert 2 not in r.rounds._closed, "round 2 closed without p's answer"
    r.bid("p", ["w"])
    assert r.rounds.round in r.rounds._closed
    won = [(b.peer_id, b.reason) for b in r.store.bids if b.outcome == "won"]
    assert len(won) == 1 and won[0][1].endswith("best of 2"), won
    p_rows = [(b.outcome, b.reason) for b in r.store.bids if b.peer_id == "p"]
    assert [o for o, _ in p_rows] == ["won" if won[0][0] == "p" else "lost"], p_rows
    stale_leases = [i for _, ids in reverted for i in ids if i == "p:old"]
    assert stale_leases == (["p:old"] if kind in ("no_bid", "other_deployment") else [])


@pytest.mark.parametrize("strategy", ["score", "first-offer"])
def test_a_lease_a_peer_names_for_two_slots_in_two_bids_backs_one(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """One slot a lease (specs/security.md). A hostile provider answers the published
    request with lease ``p:x`` for w.0 and its direct request with the same lease for
    w.1. Before, both offers were candidates, and the one that won wrote a 'won' row
    for each: two 'won' rows for one lease. The second is refused at arrival with its
    row, and gives nothing back (the lease is w.0's offer's)."""
    r = Round(monkeypatch, ["p", "q"], count=2, strategy=strategy)
    reverted: list[tuple[str, list[str]]] = []
    r.book.o.revert = lambda peer, payload: reverted.append((peer, payload["lease_ids"]))
    offer = Offer(slot="w.0", lease_id="p:x", price=0, expires_at=time.time() + 60)
    published = Bid(deployment_id="dep1", peer_id="p", did="did:key:p", offers=[offer],
                    free={"cpu": 4}, onboarded={"cpu": 4})  # fmt: skip
    r.rounds._take_bid(r.rounds.round, published)
    r.bid("p", ["w.1"], lease="p:x")  # its direct reply: the same lease for w.1
    r.bid("q", ["w.1"])
    assert sorted(r.committed.values()) == ["p:x", "q:w.1"], r.committed
    won = [(b.peer_id, b.lease_id) for b in r.store.bids if b.outcome == "won"]
    assert sorted(won) == [("p", "p:x"), ("q", "q:w.1")], r.store.bids
    refused = [b for b in r.store.bids if b.reason.startswith("refused: ")]
    assert [(b.peer_id, b.slot, b.outcome, b.lease_id) for b in refused] == [
        ("p", "w.1", "lost", "p:x")
    ], refused
    assert refused[0].reason.startswith(
        "refused: its lease p:x stands for w.0 (kept for it in round 1): "
    ), refused[0].reason
    r.book.send_held(force=True)
    assert not [i for _, ids in reverted for i in ids if i == "p:x"], reverted


def test_a_lease_a_slot_holds_is_refused_for_another_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """w.0 holds p's lease ``p:x``; in the round that places w.1, p offers that lease
    for w.1. Before, it was a candidate like any, won w.1 (the only offer) and was
    committed for it too: one lease two slots. It is refused at arrival, and given
    nothing back (w.0 holds it)."""
    r = Round(monkeypatch, ["p", "q"], count=2, strategy="score")
    reverted: list[tuple[str, list[str]]] = []
    r.book.o.revert = lambda peer, payload: reverted.append((peer, payload["lease_ids"]))
    r.bid("p", ["w.0"], lease="p:x")
    r.bid("q", [], declines=("w.0", "w.1"))
    assert r.committed == {"w.0": "p:x"}, r.committed  # w.1 queued
    r.rounds._round()
    r.bid("p", ["w.1"], lease="p:x")
    r.bid("q", [], declines=("w.1",))
    assert r.committed == {"w.0": "p:x"}, r.committed
    refused = [b for b in r.store.bids if b.reason.startswith("refused: ")]
    assert [(b.peer_id, b.slot, b.lease_id) for b in refused] == [("p", "w.1", "p:x")]
    assert refused[0].reason.startswith(
        "refused: its lease p:x stands for w.0 (held since round 1): "
    ), refused[0].reason  # refused in round 2: w.0 holds it since round 1
    r.book.send_held(force=True)
    assert not [i for _, ids in reverted for i in ids if i == "p:x"], reverted


# ---- one slot a lease, and earlier rounds' replies, as a property -------------------------

PLAYERS = ["a", "b", "c"]
STRATEGIES = ["score", "first-offer", "random", "two-choices", "round-robin"]


def _step(draw: Any, peer: str, names: list[str], stale: bool) -> dict[str, Any]:
    """What ``peer`` sends: a bid (offers naming leases ``peer:0``-``peer:2``, a lease
    perhaps for two slots; declines), a failure, or a bad bid. A reply to round 1's
    request (``stale``) names leases of its own (``peer:old...``): round 1 leased them."""
    kind = draw(st.sampled_from(["bid", "bid", "failure", "no_bid", "elsewhere"]))
    tag = "old" if stale else ""
    slots = draw(st.lists(st.sampled_from(names), max_size=3))
    leases = [f"{peer}:{tag}{draw(st.integers(0, 2))}" for _ in slots]
    declines = draw(st.lists(st.sampled_from(names), unique=True, max_size=2))
    # A bid also comes as the published request's answer (the BID behaviour), more than
    # once, in this round only: a reply to round 1's request is the direct one.
    published = not stale and kind == "bid" and draw(st.booleans())
    return {"peer": peer, "kind": kind, "offers": list(zip(slots, leases, strict=True)),
            "declines": declines, "stale": stale, "published": published}  # fmt: skip


def _play(
    mp: pytest.MonkeyPatch,
    job: dict[str, Any],
    plan: list[dict[str, Any]],
    stale: bool,
    lose_at: int | None = None,
) -> tuple[Round, list[tuple[str, str, str]]]:
    """Round 1 asks every peer and closes unanswered; round 2 takes ``plan``'s steps (its
    replies to round 1's request too, if ``stale``), closed at its window's end if they
    did not close it; then what was held goes back. With ``lose_at``, a holder ``h``
    won the first slot in round 1 (its lease ``h:0``), and that slot is lost before
    step ``lose_at`` (after the last: at the window's end), a round due at once
    (supervision's ``lost``); the rounds that follow close unanswered, and ``r.gone``
    lists what the lost slot held. What was reverted and committed, in order:
    ``("revert" | "commit", peer, lease)``."""
    # y and z never answer: no round closes for it; as many peers as slots: no gossip.
    r = Round(mp, [*PLAYERS, "y", "z", *(["h"] if lose_at is not None else [])], **job)
    done: list[tuple[str, str, str]] = []
    r.book.o.revert = lambda peer, payload: done.extend(
        ("revert", peer, i) for i in payload["lease_ids"]
    )
    due: list[Any] = []  # what the actor runs next: a round due at once
    r.messenger.call_later = lambda delay_s, fn: due.append(fn) if delay_s == 0 else None  # type: ignore[method-assign]

    def run_due() -> None:
        while due:
            due.pop(0)()

    commit = r.commit

    def committed(slot: Slot) -> None:
        done.append(("commit", slot.peer_id or "", slot.lease_id or ""))
        commit(slot)

    r.commit = committed  # type: ignore[method-assign]
    first = dict(r.messenger.asked)
    held = next(iter(r.book.slots))
    if lose_at is not None:
        offer = {"slot": held, "lease_id": "h:0", "price": 0, "expires_at": time.time() + 60}
        first["h"](Outcome(result={"deployment_id": "dep1", "peer_id": "h",
                                   "did": "did:key:h", "offers": [offer]}))  # fmt: skip
    r.rounds._close(1)
    assert lose_at is None or r.committed == {held: "h:0"}, r.committed
    r.rounds._round()
    second = dict(r.messenger.asked)

    def lose() -> None:
        slot = r.book.slots[held]
        slot.reopen("the allocation does not answer", r.book.deadlines)
        r.gone.append((r.placed_on.pop(held), r.committed.pop(held)))
        r.rounds.schedule(0.0)
        run_due()

    for n, step in enumerate(plan):
        if n == lose_at:
            lose()
        if step["stale"] and not stale:
            continue
        peer = step["peer"]
        offers = [
            {"slot": s, "lease_id": i, "price": 0, "expires_at": time.time() + 60}
            for s, i in step["offers"]
        ]
        raw = {"deployment_id": "dep1", "peer_id": peer, "did": f"did:key:{peer}",
               "offers": offers, "free": {"cpu": 4}, "onboarded": {"cpu": 4},
               "declines": [{"slot": s, "reason": "full"} for s in step["declines"]]}  # fmt: skip
        outcome = {
            "bid": Outcome(result=raw),
            "failure": Outcome(error=RemoteError("timeout", "no reply")),
            "no_bid": Outcome(result={**raw, "price": "lots"}),
            "elsewhere": Outcome(result={**raw, "deployment_id": "other"}),
        }[step["kind"]]
        if step["published"]:
            r.rounds._take_bid(r.rounds.round, Bid.model_validate(raw))
        else:
            (first if step["stale"] else second)[peer](outcome)
        run_due()
    if lose_at == len(plan):
        lose()
    while r.rounds.round not in r.rounds._closed:  # each window ends
        r.rounds._close(r.rounds.round)
        run_due()
    r.book.send_held(force=True)
    return r, done


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_one_slot_a_lease_and_an_earlier_rounds_replies_change_nothing_of_the_round(
    data: st.DataObject,
) -> None:
    """Random bids of round 2 (second bids, a lease named for two slots, failures, bad
    bids) with round 1's late replies among them. Every lease named is committed or
    given back, and none given back once committed; a lease backs one slot and has one
    'won' row; and round 1's replies change nothing of round 2 (what is placed, every
    reason, the bid index, the events) but give back what they named. Sometimes a slot
    held as round 2 begins is lost during it, a round due at once: the next round
    begins at round 2's close (before, at once: round 2's kept offers were neither
    committed nor given back)."""
    draw = data.draw
    allocations = [
        {"name": name, "executor": "compute", "count": draw(st.integers(1, top), name),
         "resources": {"cpu": "500m", "ram": "64MiB"}, "params": {"seconds": 0.2}}
        for name, top in (("w", 3), ("v", 2))
        if name == "w" or draw(st.booleans(), "a second allocation")
    ]  # fmt: skip
    job = {"allocations": allocations, "strategy": draw(st.sampled_from(STRATEGIES)),
           "distinct_peers": draw(st.booleans(), "distinct")}  # fmt: skip
    names = list(dict(DeploymentSpec.model_validate(spec(**job)).slots()))
    plan = [
        _step(draw, draw(st.sampled_from(PLAYERS)), names, draw(st.booleans(), "stale"))
        for _ in range(draw(st.integers(1, 8), "steps"))
    ]
    # A slot held as round 2 begins, lost during it (or at its end): a round due at once.
    lose_at = None
    if len(names) > 1 and draw(st.booleans(), "a held slot lost"):
        lose_at = draw(st.integers(0, len(plan)), "lost before step")
    with pytest.MonkeyPatch.context() as mp:
        r, done = _play(mp, job, plan, stale=True, lose_at=lose_at)
    with pytest.MonkeyPatch.context() as mp:
        alone, alone_done = _play(mp, job, plan, stale=False, lose_at=lose_at)
    placed = [(r.placed_on[n], lease) for n, lease in r.committed.items()] + r.gone
    assert len(set(placed)) == len(placed), r.committed  # one slot a lease
    won = [(b.peer_id, b.lease_id) for b in r.store.bids if b.outcome == "won"]
    assert sorted(won) == sorted(placed), r.store.bids  # one 'won' row a lease won
    reverted = [(peer, lease) for what, peer, lease in done if what == "revert"]
    named = {(s["peer"], i) for s in plan if s["kind"] != "failure" for _, i in s["offers"]}
    assert named <= set(placed) | set(reverted), named - set(placed) - set(reverted)
    # No lease committed is given back after (a lease given back, then named again and
    # chosen, is the provider's to refuse: it released it).
    at = {(peer, lease): n for n, (what, peer, lease) in enumerate(done) if what == "commit"}
    late = [
        (peer, lease)
        for n, (what, peer, lease) in enumerate(done)
        if what == "revert" and n > at.get((peer, lease), n)
    ]
    assert not late, (late, done)

    def seen(x: Round) -> Any:
        rows = [(b.peer_id, b.slot, b.outcome, b.reason, b.lease_id) for b in x.store.bids]
        return (x.committed, x.placed_on, {n: x.reasons(n) for n in names}, rows,
                [e["what"] for e in x.book.row.events])  # fmt: skip

    assert seen(r) == seen(alone)
    stale_named = [(s["peer"], i) for s in plan if s["stale"] and s["kind"] != "failure"
                   for _, i in s["offers"]]  # fmt: skip
    extra = Counter(reverted)
    extra.subtract(Counter((peer, lease) for what, peer, lease in alone_done if what == "revert"))
    # Once a round each: a round due at once (``lose_at``) may begin while they come.
    assert set(+extra) == set(stale_named) and not -extra, (extra, stale_named)


def test_a_round_due_while_one_is_open_waits_for_its_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """w.0 is held on p; round 2 places w.1 and keeps p's offer ``p:w.1``, q owing its
    answer, when w.0 is lost and a round is due at once (``schedule(0.0)``, as
    supervision's ``lost`` does). Before, that round began at once and dropped round 2's
    offers: ``p:w.1`` neither committed nor given back, and q's answer to round 2 was
    stale. The open round keeps its offers and closes as it would (q's answer closes
    it, ``p:w.1`` wins w.1); the round that places w.0 again begins at its close."""
    r = Round(monkeypatch, ["p", "q"], count=2, strategy="score")
    done: list[tuple[str, str, str]] = []
    r.book.o.revert = lambda peer, payload: done.extend(
        ("revert", peer, i) for i in payload["lease_ids"]
    )
    due: list[Any] = []
    r.messenger.call_later = lambda delay_s, fn: due.append(fn) if delay_s == 0 else None
    r.bid("p", ["w.0"])
    r.bid("q", [], declines=("w.0", "w.1"))
    assert r.committed == {"w.0": "p:w.0"}, r.committed  # w.1 queued
    r.rounds._round()  # the retry: round 2 asks p and q for w.1
    r.bid("p", ["w.1"])  # kept; q owes its answer
    slot = r.book.slots["w.0"]
    slot.reopen("the allocation does not answer", r.book.deadlines)  # supervision's lost
    r.rounds.schedule(0.0)
    while due:  # what the actor runs next
        due.pop(0)()
    r.bid("q", [], declines=("w.1",))  # its answer to round 2
    while due:
        due.pop(0)()
    if r.rounds.round not in r.rounds._closed:
        r.rounds._close(r.rounds.round)  # the last round's window ends
    r.book.send_held(force=True)
    # Every lease named is committed or given back: before, p:w.1 was neither.
    given_back = {(peer, lease) for _, peer, lease in done}
    assert ("p", "p:w.1") in given_back or r.committed.get("w.1") == "p:w.1", (r.committed, done)
    # Round 2 closed at q's answer as it would have, and the next round placed w.0 again.
    assert r.committed == {"w.0": "p:w.0", "w.1": "p:w.1"}, r.committed
    assert r.rounds.round == 3 and list(r.rounds.intake.offers) == ["w.0"]
    events = [e["what"] for e in r.book.row.events if e["what"].startswith("round ")]
    assert events[-1] == "round 3: no acceptable bid for w.0; queued", events


def test_a_lease_given_back_in_the_round_and_named_again_is_refused_not_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The property's counterexample, played step by step: w.0 is held on h (round 1,
    its lease ``h:0``, its allocate in flight); in round 2 b offers ``b:0`` for w.0,
    not open: given back, its revert held for the allocate. w.0 is lost (a round due
    at round 2's close), then b names ``b:0`` again, for w.0 and w.1. Before, the offer
    for w.1 was kept and won: ``b:0`` committed, then the held revert sent after it
    (a committed lease given back). A lease given back in the round is refused when
    named again, with its row, and goes back no second time."""
    job = {"allocations": [{"name": "w", "executor": "compute", "count": 2,
                            "resources": {"cpu": "500m", "ram": "64MiB"},
                            "params": {"seconds": 0.2}}],
           "strategy": "score", "distinct_peers": False}  # fmt: skip

    def step(peer: str, offers: list[tuple[str, str]], stale: bool = False) -> dict[str, Any]:
        return {"peer": peer, "kind": "bid", "offers": offers, "declines": [],
                "stale": stale, "published": False}  # fmt: skip

    plan = [step("a", [], stale=True), step("a", [], stale=True), step("a", []),
            step("a", [], stale=True), step("b", [("w.0", "b:0")]), step("a", []),
            step("b", [("w.0", "b:0"), ("w.1", "b:0")])]  # fmt: skip
    r, done = _play(monkeypatch, job, plan, stale=True, lose_at=5)
    commits = [(peer, lease) for what, peer, lease in done if what == "commit"]
    assert ("b", "b:0") not in commits, done  # before: committed, then reverted
    assert commits == [("h", "h:0")] and r.gone == [("h", "h:0")], (done, r.gone)
    assert done.count(("revert", "b", "b:0")) == 1, done  # before: twice
    refused = [(b.peer_id, b.slot, b.lease_id, b.reason) for b in r.store.bids
               if b.reason.startswith("refused: ")]  # fmt: skip
    assert refused == [("b", "w.1", "b:0", "refused: its lease b:0 was given back in round 2: "
                        "a lease given back is not taken again")], refused  # fmt: skip


def test_a_lease_named_again_for_a_slot_not_open_goes_back_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """w.0 is held on p (round 1, its allocate in flight); in round 2, open for w.1, p
    names its lease ``p:x`` for w.0 twice in one bid, then once more in its answer to
    the published request. Before, each naming gave it back: one revert naming ``p:x``
    three times, and three give-backs of 500m counted free on p (1.5 cores it never
    had free). A lease goes back once a round, however often it is named."""
    r = Round(monkeypatch, ["p", "q"], count=2, strategy="score")
    sent: list[tuple[str, list[str]]] = []
    r.book.o.revert = lambda peer, payload: sent.append((peer, payload["lease_ids"]))
    r.bid("p", ["w.0"])
    r.bid("q", [], declines=("w.0", "w.1"))
    assert r.committed == {"w.0": "p:w.0"}, r.committed  # w.1 queued
    r.rounds._round()  # round 2: w.1
    r.bid("p", ["w.0", "w.0"], lease="p:x")
    again = Bid(deployment_id="dep1", peer_id="p", did="did:key:p", free={"cpu": 4},
                onboarded={"cpu": 4}, offers=[Offer(slot="w.0", lease_id="p:x", price=0,
                                                    expires_at=time.time() + 60)])  # fmt: skip
    r.rounds._take_bid(r.rounds.round, again)
    r.book.send_held(force=True)
    assert sent == [("p", ["p:x"])], sent
    record = r.book.o.peer_table.get("p")
    assert record is not None
    assert r.rounds.given_back.credit(record).human()["cpu"] == 0.5
