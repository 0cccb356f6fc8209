"""Collaborative k-means by secure aggregation: the crypto identities, refusals, and the
joint result against plaintext k-means on the union (dms.mining.collab, in one process)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from dms.mining.collab import (
    CollabAggregator,
    CollabFailed,
    CollabOwner,
    Proposal,
    Refused,
    ring,
    shamir,
)
from dms.mining.collab.messages import (
    MaskedInput,
    Privacy,
    Restore,
    RosterAccepted,
    RoundStart,
    RoundTotals,
    UnmaskRequest,
)
from dms.mining.collab.simulate import Drop, Phase, run_collab
from dms.mining.collab.stats import kmeans_statistics, next_centroids
from dms.mining.data import blobs, read_table
from dms.mining.errors import MiningError
from dms.mining.plain import ClusteringParams, kmeans
from dms.mining.wire import decode

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IRIS = read_table(EXAMPLES / "iris-features.csv").features


def names(m: int) -> list[str]:
    return [f"owner{i}" for i in range(1, m + 1)]


def proposal(data: np.ndarray, m: int, k: int, rounds: int, threshold: int, **kw) -> Proposal:
    return Proposal(
        collab_id="collab-1",
        owners=names(m),
        a=data.shape[1],
        k=k,
        rounds=rounds,
        threshold=threshold,
        centroids=data[:k].tolist(),
        **kw,
    )


def split(data: np.ndarray, m: int) -> dict[str, np.ndarray]:
    return dict(zip(names(m), np.array_split(data, m), strict=True))


def joint_labels(run, owners: list[str]) -> np.ndarray:
    return np.concatenate([run.results[o].labels for o in owners])


def plaintext_with_dropouts(
    parts: dict[str, np.ndarray], init: np.ndarray, rounds: int, last: dict[str, int]
) -> np.ndarray:
    """Plain k-means where owner o's rows count up to round last[o] only."""
    centroids = init.copy()
    for r in range(1, rounds + 1):
        rows = np.concatenate([x for o, x in parts.items() if last.get(o, rounds) >= r])
        centroids = next_centroids(kmeans_statistics(rows, centroids)[1], centroids)
    return centroids


# -- the crypto identities ----------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    holders=st.integers(1, 12),
    data=st.data(),
)
def test_shamir_rebuilds_from_any_threshold_of_shares(secret: bytes, holders: int, data) -> None:
    threshold = data.draw(st.integers(1, holders))
    shares = shamir.split(secret, range(1, holders + 1), threshold)
    chosen = data.draw(st.permutations(list(shares)))[:threshold]
    assert shamir.combine({x: shares[x] for x in chosen}) == secret
    if threshold > 1:  # one share short gives something else
        fewer = {x: shares[x] for x in chosen[:-1]}
        with contextlib.suppress(MiningError):  # or it does not even combine
            assert shamir.combine(fewer) != secret


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_masks_cancel_and_the_total_is_the_plain_sum_for_any_dropouts(data) -> None:
    m = data.draw(st.integers(2, 7), label="owners")
    threshold = data.draw(st.integers(m // 2 + 1, m), label="threshold")
    dropped = data.draw(st.sets(st.sampled_from(names(m)), max_size=m - threshold), label="drop")
    # at setup (never in a round), or after its input (its self mask rebuilt from others)
    phase = data.draw(st.sampled_from([Phase.ACCEPT, Phase.UNMASK]), label="phase")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rows = np.random.default_rng(seed).normal(0.0, 50.0, size=(m * 7, 3))
    parts = split(rows, m)
    p = proposal(rows, m, k=2, rounds=1, threshold=threshold)
    # one survivor at least must answer the unmask request: keep threshold answering
    run = run_collab(p, parts, drops={o: Drop(1, phase) for o in dropped})
    counted = [o for o in names(m) if phase is Phase.UNMASK or o not in dropped]
    expected = sum(
        ring.encode(kmeans_statistics(parts[o], np.asarray(p.centroids))[1], p.scale_bits, m)
        for o in counted
    )
    assert run.totals[0].survivors == counted
    assert run.totals[0].values == ring.decode(np.asarray(expected, np.uint64), 32).tolist()


def test_the_aggregator_sees_only_masked_inputs() -> None:
    parts = split(IRIS, 3)
    p = proposal(IRIS, 3, k=3, rounds=2, threshold=2)
    seen: list[tuple[str, bytes]] = []
    run_collab(p, parts, tap=lambda kind, who, raw: seen.append((kind, raw)))
    inputs = [decode(MaskedInput, raw) for kind, raw in seen if kind == "MaskedInput"]
    assert len(inputs) == 6
    true = {
        o: ring.encode(kmeans_statistics(x, IRIS[:3])[1], 32, 3) for o, x in parts.items()
    }  # round 1's true statistics
    for message in inputs:
        carried = ring.from_bytes(message.vector, p.length(1))
        for vector in true.values():
            assert not np.any(carried == vector)


# -- refusals -----------------------------------------------------------------


def _one_round(
    relayed: dict[str, RosterAccepted] | None = None,
    privacy: Privacy | None = None,
) -> tuple[Proposal, dict[str, CollabOwner], CollabAggregator]:
    parts = split(IRIS, 3)
    p = proposal(IRIS, 3, k=3, rounds=2, threshold=2, privacy=privacy)
    owners = {o: CollabOwner(p, o, x) for o, x in parts.items()}
    agg = CollabAggregator(p)
    for owner in owners.values():
        agg.receive_advert(owner.advert())
    roster = agg.roster()
    for name, owner in owners.items():
        shares = owner.receive_roster(roster)
        agg.receive_accept(shares)
        if relayed is not None:
            relayed[name] = shares
    return p, owners, agg


def _summed_round(
    relayed: dict[str, RosterAccepted],
    privacy: Privacy | None = None,
) -> tuple[Proposal, dict[str, CollabOwner], CollabAggregator, RoundStart, RoundTotals]:
    """Round 1 run to its totals over all three owners (the totals sent to no one)."""
    p, owners, agg = _one_round(relayed, privacy)
    start = agg.start_round()
    for owner in owners.values():
        agg.receive_input(owner.contribute(start))
    for name, request in agg.close_inputs().items():
        agg.receive_unmask(owners[name].unmask(request))
    return p, owners, agg, start, agg.finish_round()


def test_a_malformed_or_replayed_contribution_is_refused_with_a_reason_never_summed() -> None:
    _, owners, agg = _one_round()
    start = agg.start_round()
    good = owners["owner1"].contribute(start)
    bad = {
        "collaboration": good.model_copy(update={"collab_id": "other"}),
        "round 2": good.model_copy(update={"round": 2}),
        "bytes": good.model_copy(update={"vector": good.vector[:-8]}),
        "signature": good.model_copy(update={"vector": bytes(len(good.vector))}),
        "not a live owner": good.model_copy(update={"owner": "stranger"}),
    }
    for expected, message in bad.items():
        with pytest.raises(Refused, match=expected) as refused:
            agg.receive_input(message)
        assert refused.value.reason
    agg.receive_input(good)
    with pytest.raises(Refused, match="replay"):
        agg.receive_input(good)
    for name in ("owner2", "owner3"):
        agg.receive_input(owners[name].contribute(start))
    for name, request in agg.close_inputs().items():
        agg.receive_unmask(owners[name].unmask(request))
    totals = agg.finish_round()
    expected = sum(
        ring.encode(kmeans_statistics(x, IRIS[:3])[1], 32, 3) for x in split(IRIS, 3).values()
    )
    assert totals.values == ring.decode(np.asarray(expected, np.uint64), 32).tolist()
    with pytest.raises(Refused, match="round 1, but round 2"):
        agg.receive_input(good)  # last round's input replayed


def test_an_owner_never_opens_both_halves_of_one_owners_masks() -> None:
    p, owners, agg = _one_round()
    start = agg.start_round()
    for owner in owners.values():
        agg.receive_input(owner.contribute(start))
    requests = agg.close_inputs()
    first = owners["owner1"].unmask(requests["owner1"])
    assert owners["owner1"].unmask(requests["owner1"]) == first  # asked again: same answer
    # the aggregator now claims owner3 dropped, to get its mask-key shares too
    lying = UnmaskRequest(
        collab_id=p.collab_id,
        round=1,
        survivors=["owner1", "owner2"],
        self_shares={u: s for u, s in requests["owner1"].self_shares.items() if u != "owner3"},
    )
    with pytest.raises(Refused, match="second, different unmask request"):
        owners["owner1"].unmask(lying)


def test_below_the_threshold_the_collaboration_fails_naming_who_dropped() -> None:
    p = proposal(IRIS, 3, k=3, rounds=4, threshold=2)
    drops = {"owner2": Drop(1, Phase.ACCEPT), "owner3": Drop(1, Phase.ACCEPT)}
    with pytest.raises(CollabFailed, match=r"round 1: only 1 owners are live.*owner2, owner3"):
        run_collab(p, split(IRIS, 3), drops=drops)
    # Sent its input, then went silent: the reason names who did not answer.
    p = proposal(IRIS, 3, k=3, rounds=2, threshold=3)
    with pytest.raises(CollabFailed, match=r"round 2: only 2 survivors.*no answer from: owner3"):
        run_collab(p, split(IRIS, 3), drops={"owner3": Drop(2, Phase.UNMASK)})


def test_bad_proposals_and_rows_are_refused_with_a_reason() -> None:
    with pytest.raises(ValidationError, match=r"more than half \(3\.\.4\)") as low:
        proposal(IRIS, 4, k=3, rounds=2, threshold=2)
    # The reason given is today's (no mask key is shared since 65f4a5b): two lists of
    # live owners that can open their self-mask seeds share an owner only above half.
    reason = str(low.value)
    assert "share an owner only above half" in reason and "live lists" in reason
    assert "both halves" not in reason and "masks" not in reason
    with pytest.raises(ValidationError, match="3 x 4 finite centroids"):
        Proposal(collab_id="c", owners=names(2), a=4, k=3, rounds=1, threshold=2)
    p = proposal(IRIS, 3, k=3, rounds=1, threshold=2, scale_bits=52)
    with pytest.raises(MiningError, match="smaller scale_bits"):
        run_collab(p, split(IRIS * 1000, 3))
    with pytest.raises(MiningError, match="rows of 4 attributes"):
        CollabOwner(proposal(IRIS, 3, k=3, rounds=1, threshold=2), "owner1", IRIS[:, :3])


# -- the joint result ---------------------------------------------------------


def test_iris_in_three_equals_plaintext_kmeans_on_the_union() -> None:
    run = run_collab(proposal(IRIS, 3, k=3, rounds=10, threshold=2), split(IRIS, 3))
    plain = kmeans(
        IRIS, ClusteringParams(3, min_error=-1.0, max_iterations=10), centroids=IRIS[:3].copy()
    )
    assert (joint_labels(run, names(3)) == plain.labels).all()
    for result in run.results.values():
        np.testing.assert_allclose(result.centroids, plain.centroids, rtol=0, atol=1e-9)
        assert result.dropped == [] and result.epsilon_spent is None


def test_blobs_30000_by_8_in_three_equals_plaintext_kmeans() -> None:
    data, _ = blobs(30_000, 8, 5, seed=7, std=2.0)
    run = run_collab(proposal(data, 3, k=5, rounds=8, threshold=2), split(data, 3))
    plain = kmeans(
        data, ClusteringParams(5, min_error=-1.0, max_iterations=8), centroids=data[:5].copy()
    )
    assert (joint_labels(run, names(3)) == plain.labels).all()
    np.testing.assert_allclose(run.results["owner1"].centroids, plain.centroids, atol=1e-8)
    bytes_per_round = {b for per in run.owner_bytes.values() for b in per}
    assert max(bytes_per_round) < 4096  # k x a + k numbers and shares, whatever n is


def test_an_owner_dropped_mid_job_ends_the_collaboration_naming_it() -> None:
    """A round is never summed over fewer owners than another (the difference would be
    the missing owner's statistics): a missing input stops the collaboration."""
    p = proposal(IRIS, 3, k=3, rounds=6, threshold=2)
    with pytest.raises(CollabFailed, match=r"round 3: no input from owner2 \(2 of 3 live"):
        run_collab(p, split(IRIS, 3), drops={"owner2": Drop(3)})


def test_an_owner_dropped_at_setup_the_rest_complete_and_are_told_who() -> None:
    parts = split(IRIS, 3)
    p = proposal(IRIS, 3, k=3, rounds=6, threshold=2)
    run = run_collab(p, parts, drops={"owner2": Drop(1, Phase.ACCEPT)})
    assert set(run.results) == {"owner1", "owner3"}
    expected = plaintext_with_dropouts(parts, IRIS[:3], 6, {"owner2": 0})
    for result in run.results.values():
        assert [(d.owner, d.round) for d in result.dropped] == [("owner2", -1)]
        np.testing.assert_allclose(result.centroids, expected, atol=1e-9)


def test_an_owner_that_sends_its_input_then_drops_still_counts_that_round() -> None:
    parts = split(IRIS, 5)
    p = proposal(IRIS, 5, k=3, rounds=2, threshold=3)
    drops = {"owner4": Drop(2, Phase.UNMASK), "owner1": Drop(1, Phase.ACCEPT)}
    run = run_collab(p, parts, drops=drops)
    expected = plaintext_with_dropouts(parts, IRIS[:3], 2, {"owner1": 0})
    np.testing.assert_allclose(run.results["owner2"].centroids, expected, atol=1e-9)
    assert [(d.owner, d.round) for d in run.results["owner2"].dropped] == [("owner1", -1)]


def test_initial_centroids_from_aggregated_moments_need_no_rows_revealed() -> None:
    p = Proposal(
        collab_id="c", owners=names(3), a=4, k=3, rounds=5, threshold=2, init="moments", seed=9
    )
    run = run_collab(p, split(IRIS, 3))
    init = np.asarray(run.results["owner1"].initial_centroids)
    mean, spread = IRIS.mean(axis=0), IRIS.std(axis=0)
    drawn = mean + spread * np.random.default_rng(9).standard_normal((3, 4))
    np.testing.assert_allclose(init, drawn, atol=1e-8)
    plain = kmeans(IRIS, ClusteringParams(3, min_error=-1.0, max_iterations=5), centroids=init)
    assert (joint_labels(run, names(3)) == plain.labels).all()


def test_differential_privacy_reports_what_it_spent() -> None:
    privacy = Privacy(epsilon=0.5, delta=1e-5, clip=10.0)
    p = proposal(IRIS, 3, k=3, rounds=4, threshold=2, privacy=privacy)
    run = run_collab(p, split(IRIS, 3))
    result = run.results["owner1"]
    assert result.epsilon_spent == pytest.approx(2.0) and result.delta_spent == pytest.approx(4e-5)
    plain = kmeans(
        IRIS, ClusteringParams(3, min_error=-1.0, max_iterations=4), centroids=IRIS[:3].copy()
    )
    assert not np.allclose(result.centroids, plain.centroids, atol=1e-6)  # noised


def test_a_new_aggregator_restored_between_rounds_gives_the_same_result() -> None:
    relayed: dict[str, RosterAccepted] = {}  # what the proposer's session relayed
    p, owners, lost = _one_round(relayed)
    adverts = [o.advert() for o in owners.values()]
    for round_ in (1, 2):
        agg = lost if round_ == 1 else CollabAggregator(p)
        if round_ == 2:  # the first aggregator died during round 2's inputs
            start = lost.start_round()
            for owner in owners.values():
                lost.receive_input(owner.contribute(start))
            lost.close_inputs()  # its unmask requests never reach anyone
            agg.restore(
                Restore(
                    collab_id=p.collab_id,
                    adverts=adverts,
                    accepted=list(relayed.values()),
                    round=2,
                    live=list(owners),
                )
            )
        start = agg.start_round()
        for owner in owners.values():
            agg.receive_input(owner.contribute(start))  # round 2: a fresh input each
        for name, request in agg.close_inputs().items():
            agg.receive_unmask(owners[name].unmask(request))
        totals = agg.finish_round()
        for owner in owners.values():
            owner.receive_totals(totals)
    plain = kmeans(
        IRIS, ClusteringParams(3, min_error=-1.0, max_iterations=2), centroids=IRIS[:3].copy()
    )
    np.testing.assert_allclose(owners["owner1"].result().centroids, plain.centroids, atol=1e-9)


def test_across_attempts_of_a_round_an_owner_never_opens_both_halves() -> None:
    p, owners, agg = _one_round()
    start = agg.start_round()
    for owner in owners.values():
        agg.receive_input(owner.contribute(start))
    requests = agg.close_inputs()
    sent = owners["owner1"].contribute(start)  # asked again: the same message
    owners["owner1"].unmask(requests["owner1"])  # opened owner3's self mask for round 1
    again = owners["owner1"].contribute(start)  # the round restarted (a new aggregator)
    assert again == sent
    lying = UnmaskRequest(
        collab_id=p.collab_id,
        round=1,
        survivors=["owner1", "owner2"],
        self_shares={u: requests["owner1"].self_shares[u] for u in ("owner1", "owner2")},
    )
    with pytest.raises(Refused, match="a second, different unmask request"):
        owners["owner1"].unmask(lying)  # the restart kept the answer


def test_no_share_of_a_mask_key_is_sent_and_an_unmask_without_an_owner_is_refused() -> None:
    """No mask key is ever opened, so none is split: the setup carries the owners' public
    keys and their signed acceptance of the roster, and no share (each owner used to send
    a sealed Shamir share of its mask key s to every owner, which only t colluding owners
    could open, and nobody needed). The aggregator holds owner3's input back and asks
    owner1 and owner2 to unmask the round without it: refused."""
    seen: list[tuple[str, bytes]] = []
    p = proposal(IRIS, 3, k=3, rounds=1, threshold=2)
    run_collab(p, split(IRIS, 3), tap=lambda kind, who, raw: seen.append((kind, raw)))
    setup = {kind for kind, _ in seen} - {"MaskedInput", "UnmaskReply"}
    assert setup == {"KeysAdvert", "RosterAccepted"}
    for kind, raw in seen:
        if kind == "RosterAccepted":
            assert set(decode(RosterAccepted, raw).model_dump()) == {
                "collab_id", "owner", "roster", "signature"
            }  # fmt: skip
    assert "key_shares" not in UnmaskRequest.model_fields
    _, owners, agg = _one_round()
    start = agg.start_round()
    first = {name: owner.contribute(start) for name, owner in owners.items()}
    for h in ("owner1", "owner2"):  # owner3's input is held back: "dropped"
        request = UnmaskRequest(
            collab_id=p.collab_id, round=1, survivors=["owner1", "owner2"],
            self_shares={u: first[u].shares[h] for u in ("owner1", "owner2")},
        )  # fmt: skip
        with pytest.raises(Refused, match="the unmask request leaves out owner3"):
            owners[h].unmask(request)
    for name in owners:
        agg.receive_input(first[name])
    for name, request in agg.close_inputs().items():
        agg.receive_unmask(owners[name].unmask(request))
    assert agg.finish_round().survivors == names(3)


def test_a_round_restarts_only_over_the_owners_it_began_with() -> None:
    """Attempt 1 of round 1 completes over all three owners, but its totals are kept
    back; the round "restarts" (a new aggregator restored, or the proposer's session
    saying so) with owner3 left out. The two totals' difference would be owner3's own
    statistics, so an owner refuses a restart whose live owners differ."""
    relayed: dict[str, RosterAccepted] = {}
    p, owners, _, start, first = _summed_round(relayed)  # first: never sent to anyone
    again = CollabAggregator(p)
    adverts = [o.advert() for o in owners.values()]
    accepted = list(relayed.values())
    again.restore(
        Restore(collab_id=p.collab_id, adverts=adverts, accepted=accepted, round=1,
                live=["owner1", "owner2"])
    )  # fmt: skip
    restart = again.start_round()
    with contextlib.suppress(Refused):
        for name in ("owner1", "owner2"):
            again.receive_input(owners[name].contribute(restart))
        for name, request in again.close_inputs().items():
            again.receive_unmask(owners[name].unmask(request))
        second = again.finish_round()
        own = kmeans_statistics(split(IRIS, 3)["owner3"], IRIS[:3].copy())[1]
        leaked = np.asarray(first.values) - np.asarray(second.values)
        assert not np.allclose(leaked, own, atol=1e-6), "owner3's statistics leaked"
        raise AssertionError("a round restarted over fewer owners")
    for name in ("owner1", "owner2"):
        with pytest.raises(Refused, match="round 1 leaves out owner3"):
            owners[name].contribute(restart)
    assert owners["owner1"].contribute(start).round == 1  # the same owners: a restart is fine


def test_a_round_unmasked_once_never_reruns_over_fewer_owners() -> None:
    """Attempt 1 completes over all three owners, its totals kept back; a restart over
    the same owners (allowed: a new aggregator) gets the same messages again; then a
    rerun "without owner3" would give a second total whose difference from the first is
    owner3's statistics: refused, as any start that leaves out an owner is once the first
    round began."""
    p, owners, agg = _one_round()
    start = agg.start_round()
    for owner in owners.values():
        agg.receive_input(owner.contribute(start))
    for name, request in agg.close_inputs().items():
        agg.receive_unmask(owners[name].unmask(request))
    for owner in owners.values():
        owner.contribute(start)  # the same owners again: its answer is forgotten
    fewer = RoundStart(collab_id=p.collab_id, round=1, live=["owner1", "owner2"])
    for name in ("owner1", "owner2"):
        with pytest.raises(Refused, match="round 1 leaves out owner3"):
            owners[name].contribute(fewer)


def test_an_honest_dropout_does_not_expose_the_owners_earlier_rounds() -> None:
    """Round 1: everyone survives, so every self-mask seed is rebuilt. Round 2: owner3
    crashes before its input, an honest dropout. Opening its mask key s_3 to cancel its
    pairwise masks would give the pairwise masks of every round, hence owner3's round-1
    statistics exactly; running round 2 again among owner1 and owner2 would give a sum
    without owner3 beside round 1's with it (its row count and attribute sums). Neither
    happens: the collaboration stops, naming owner3, and no message the aggregator (or
    the proposer's session, which relays them) holds opens anything of owner3's but its
    round-1 self mask, of a round summed with it."""
    _, owners, agg = _one_round()
    start = agg.start_round()
    for owner in owners.values():
        agg.receive_input(owner.contribute(start))
    opened = {name: owners[name].unmask(r) for name, r in agg.close_inputs().items()}
    for reply in opened.values():
        agg.receive_unmask(reply)
    totals = agg.finish_round()
    for owner in owners.values():
        owner.receive_totals(totals)
    start = agg.start_round()
    for name in ("owner1", "owner2"):
        agg.receive_input(owners[name].contribute(start))
    with pytest.raises(CollabFailed, match="round 2: no input from owner3"):
        agg.close_inputs()
    assert [(d.owner, d.round) for d in agg.dropped] == [("owner3", 2)]
    assert all(set(reply.self_shares) == set(owners) for reply in opened.values())


def test_a_roster_entry_not_signed_by_its_owners_node_is_refused_with_the_reason() -> None:
    """The aggregator relays the roster: it must not put keys of its own in an owner's
    name. Each advert is signed by its owner's node key (whose peer id the proposal
    lists), and each owner checks every entry; the aggregator refuses such an advert too."""
    from dms.jobs.collab import node_signed
    from dms.mining.collab.messages import KeysAdvert, Roster
    from dms.security import Identity

    nodes = [Identity.generate() for _ in range(3)]
    ids = [n.peer_id for n in nodes]
    p = Proposal(
        collab_id="bound", owners=ids, a=4, k=3, rounds=1, threshold=2,
        centroids=IRIS[:3].tolist(),
    )  # fmt: skip
    parts = np.array_split(IRIS, 3)
    owners = [CollabOwner(p, ids[i], parts[i], check_node=node_signed) for i in range(3)]

    def vouched(node: Identity, owner: CollabOwner) -> KeysAdvert:
        advert = owner.advert()
        return advert.model_copy(update={"node_signature": node.sign(advert.payload())})

    adverts = [vouched(n, o) for n, o in zip(nodes, owners, strict=True)]
    # Keys the aggregator made in the third owner's name: its own collaboration key
    # signs them (that check passes), but no key of that owner's node does.
    impostor = CollabOwner(p, ids[2], parts[2])
    for forged, why in (
        (vouched(Identity.generate(), impostor), f"its keys are not signed by the node {ids[2]}"),
        (impostor.advert(), f"its keys are not signed by the node {ids[2]}"),  # unsigned
    ):
        roster = Roster(collab_id=p.collab_id, adverts=[*adverts[:2], forged])
        with pytest.raises(Refused, match=f"the roster's entry for {ids[2]}: {why}"):
            owners[0].receive_roster(roster)
        aggregator = CollabAggregator(p, check_node=node_signed)
        with pytest.raises(Refused, match=why):
            aggregator.receive_advert(forged)
    for advert in adverts:
        aggregator.receive_advert(advert)
    accepted = owners[0].receive_roster(aggregator.roster())  # the true roster is taken
    assert accepted.roster == ids


def test_an_owner_restored_from_its_snapshot_answers_as_before_and_finishes_the_same() -> None:
    """What the node keeps across a restart (``snapshot``, through its byte encoding):
    the restored owner finishes with the same result, and still refuses to open the
    second half of a mask it opened before the restart."""
    from dms.mining.collab.messages import OwnerState
    from dms.mining.wire import encode

    p, owners, agg = _one_round()
    start = agg.start_round()
    for owner in owners.values():
        agg.receive_input(owner.contribute(start))
    requests = agg.close_inputs()
    first = owners["owner1"].unmask(requests["owner1"])
    kept = decode(OwnerState, encode(owners["owner1"].snapshot()))
    back = CollabOwner.restored(p, "owner1", split(IRIS, 3)["owner1"], kept)
    assert back.unmask(requests["owner1"]) == first  # the same question, the same answer
    lying = requests["owner1"].model_copy(update={"survivors": ["owner1", "owner2"]})
    with pytest.raises(Refused, match="a second, different unmask request"):
        back.unmask(lying)
    owners["owner1"] = back
    for name, request in requests.items():
        if name != "owner1":
            agg.receive_unmask(owners[name].unmask(request))
    agg.receive_unmask(first)
    while True:
        totals = agg.finish_round()
        for owner in owners.values():
            owner.receive_totals(totals)
        if agg.done:
            break
        start = agg.start_round()
        for owner in owners.values():
            agg.receive_input(owner.contribute(start))
        for name, request in agg.close_inputs().items():
            agg.receive_unmask(owners[name].unmask(request))
    plain = kmeans(IRIS, ClusteringParams(3, min_error=-1.0, max_iterations=2), centroids=IRIS[:3])
    result = back.result()
    np.testing.assert_allclose(result.centroids, plain.centroids, atol=1e-9)
    assert np.concatenate([owners[o].result().labels for o in names(3)]).tolist() == (
        plain.labels.tolist()
    )
    with pytest.raises(MiningError, match="the rows changed"):
        CollabOwner.restored(p, "owner1", IRIS[:10], kept)


# -- two sums the aggregator could difference ------------------------------------------


def _attack_round(
    p: Proposal,
    relayed: dict,
    round_: int,
    live: list[str],
    owners: dict[str, CollabOwner],
) -> object:
    """A hostile aggregator's own run of ``round_`` over ``live`` (a fresh aggregator
    restored from what the session relayed): its totals, or the owner's refusal."""
    adverts = [owners[o].advert() for o in p.owners]
    again = CollabAggregator(p)
    again.restore(
        Restore(collab_id=p.collab_id, adverts=adverts, accepted=list(relayed.values()),
                round=round_, live=live)
    )  # fmt: skip
    try:
        start = again.start_round()
        for name in live:
            again.receive_input(owners[name].contribute(start))
        for name, request in again.close_inputs().items():
            again.receive_unmask(owners[name].unmask(request))
        return again.finish_round()
    except Refused as exc:
        return exc


def test_a_claimed_dropout_after_a_summed_round_gives_no_sum_without_that_owner() -> None:
    """Round 1 is summed over all three owners. In round 2 the aggregator holds owner3's
    input back and names it dropped (no collusion needed). A sum of round 2 over owner1
    and owner2 beside round 1's over all three gives owner3's row count and attribute
    sums exactly: the counts and the sums over clusters do not depend on the centroids
    (once converged, every per-cluster statistic is the same too). So no round runs
    without an owner once a round was summed: the owners refuse, and the aggregator ends
    the collaboration naming who did not send."""
    relayed: dict = {}
    p, owners, agg, _, first = _summed_round(relayed)
    for owner in owners.values():
        owner.receive_totals(first)
    start = agg.start_round()
    for owner in owners.values():
        owner.contribute(start)  # owner3's input is sent, and held back
    second = _attack_round(p, relayed, 2, ["owner1", "owner2"], owners)
    if not isinstance(second, Refused):
        own = split(IRIS, 3)["owner3"]
        t1, t2 = np.asarray(first.values), np.asarray(second.values)
        ka = p.k * p.a
        count = t1[ka:].sum() - t2[ka:].sum()
        sums = (t1[:ka] - t2[:ka]).reshape(p.k, p.a).sum(axis=0)
        assert not (round(count) == len(own) and np.allclose(sums, own.sum(axis=0), atol=1e-6)), (
            f"the aggregator read owner3's row count ({count:.0f}) and attribute sums {sums}"
        )
        raise AssertionError("round 2 was summed without owner3")
    assert "leaves out owner3" in second.reason
    # The honest aggregator: a missing input ends the collaboration, it does not rerun.
    for name in ("owner1", "owner2"):
        agg.receive_input(owners[name].contribute(start))  # the same input again: kept
    with pytest.raises(CollabFailed, match=r"round 2: no input from owner3"):
        agg.close_inputs()


def test_a_rerun_of_the_first_round_gives_an_aggregator_and_one_owner_nothing() -> None:
    """Fewer than t owners colluding with the aggregator learn only totals (the claim).
    m = 3, t = 2, owner2 colludes. Round 1: all three send; the aggregator asks only
    owner2 and owner3 to unmask (two shares rebuild every seed): a total over all three.
    Then it tells owner1, which answered nothing yet, that the round runs again without
    owner3, and owner2 plays along: a total over owner1 and owner2, and the difference is
    owner3's statistics. An owner refuses any attempt that leaves out an owner it began
    the round with."""
    relayed: dict = {}
    p, owners, agg = _one_round(relayed)
    parts = split(IRIS, 3)
    colluder = CollabOwner.restored(p, "owner2", parts["owner2"], owners["owner2"].snapshot())
    start = agg.start_round()
    for owner in owners.values():
        agg.receive_input(owner.contribute(start))
    requests = agg.close_inputs()
    for name in ("owner2", "owner3"):
        agg.receive_unmask(owners[name].unmask(requests[name]))
    first = agg.finish_round()  # over all three, sent to no one
    again = {"owner1": owners["owner1"], "owner2": colluder, "owner3": owners["owner3"]}
    second = _attack_round(p, relayed, 1, ["owner1", "owner2"], again)
    if not isinstance(second, Refused):
        own = kmeans_statistics(parts["owner3"], IRIS[:3].copy())[1]
        leaked = np.asarray(first.values) - np.asarray(second.values)
        assert not np.allclose(leaked, own, atol=1e-6), "owner3's statistics leaked"
        raise AssertionError("round 1 was summed again without owner3")
    assert "leaves out owner3" in second.reason


def test_a_restarted_round_resends_the_same_input_so_attempts_differ_in_nothing() -> None:
    """A round restarted over the same owners (a new aggregator, or the proposer's node
    restarted) after its first attempt was unmasked. Before, each owner sent a fresh
    input under a fresh self mask and answered a second unmask: the aggregator rebuilt
    both self masks, and each owner's two inputs differ by what changed between them
    (the pairwise masks are the same). Here owner3's node restarted between the attempts
    with one of its rows edited: the two totals' difference was that edit, exactly. Now
    an owner sends the identical stored message again and gives the same answer."""
    from dms.mining.collab.messages import OwnerState
    from dms.mining.wire import encode

    relayed: dict = {}
    p, owners, agg = _one_round(relayed)
    start = agg.start_round()
    sent = {name: owner.contribute(start) for name, owner in owners.items()}
    for message in sent.values():
        agg.receive_input(message)
    replies = {n: owners[n].unmask(r) for n, r in agg.close_inputs().items()}
    for reply in replies.values():
        agg.receive_unmask(reply)
    first = agg.finish_round()  # kept back: the aggregator is "lost"
    rows = split(IRIS, 3)["owner3"].copy()
    edited = rows.copy()
    edited[0] += 0.5  # the owner's file changed while its node was down
    kept = decode(OwnerState, encode(owners["owner3"].snapshot()))
    owners["owner3"] = CollabOwner.restored(p, "owner3", edited, kept)
    second = _attack_round(p, relayed, 1, list(owners), owners)
    if isinstance(second, Refused):
        raise AssertionError(f"the restart was refused: {second.reason}")
    leaked = np.asarray(first.values) - np.asarray(second.values)
    change = kmeans_statistics(rows, IRIS[:3].copy())[1] - kmeans_statistics(edited, IRIS[:3])[1]
    assert np.any(change != 0)
    assert not np.allclose(leaked, change, atol=1e-6), "the aggregator read owner3's edit"
    assert second.values == first.values
    for name, owner in owners.items():
        assert owner.contribute(start) == sent[name]  # asked again: the very same message


def test_under_privacy_a_restart_gives_no_second_noised_total_of_a_round() -> None:
    """With differential privacy each owner noises its statistics. A fresh input on a
    restart drew fresh noise: the aggregator got two independently noised totals of one
    round (a lost aggregator is placed up to four times, the proposer's node restarts
    any number), and averaged the noise away. The restart now resends the same input."""
    relayed: dict[str, RosterAccepted] = {}
    privacy = Privacy(epsilon=0.5, delta=1e-5, clip=10.0)
    p, owners, _, _, first = _summed_round(relayed, privacy)
    totals = [first]
    for _ in range(3):
        again = _attack_round(p, relayed, 1, list(owners), owners)
        assert not isinstance(again, Refused), again
        totals.append(again)
    assert all(t.values == first.values for t in totals), "a second noise draw for round 1"
