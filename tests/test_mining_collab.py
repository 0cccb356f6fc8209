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
    RoundStart,
    SeedShares,
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
    phase = data.draw(st.sampled_from([Phase.INPUT, Phase.UNMASK]), label="phase")
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
    relayed: dict[str, SeedShares] | None = None,
) -> tuple[Proposal, dict[str, CollabOwner], CollabAggregator]:
    parts = split(IRIS, 3)
    p = proposal(IRIS, 3, k=3, rounds=2, threshold=2)
    owners = {o: CollabOwner(p, o, x) for o, x in parts.items()}
    agg = CollabAggregator(p)
    for owner in owners.values():
        agg.receive_advert(owner.advert())
    roster = agg.roster()
    for name, owner in owners.items():
        shares = owner.receive_roster(roster)
        agg.receive_seed_shares(shares)
        if relayed is not None:
            relayed[name] = shares
    return p, owners, agg


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
        dropped=["owner3"],
        self_shares={u: s for u, s in requests["owner1"].self_shares.items() if u != "owner3"},
        key_shares={"owner3": b"x" * 100},
    )
    with pytest.raises(Refused, match="second, different unmask request"):
        owners["owner1"].unmask(lying)


def test_below_the_threshold_the_collaboration_fails_naming_who_dropped() -> None:
    p = proposal(IRIS, 3, k=3, rounds=4, threshold=2)
    drops = {"owner2": Drop(2), "owner3": Drop(3)}
    with pytest.raises(CollabFailed, match=r"round 3: only 1 owners sent.*owner2, owner3"):
        run_collab(p, split(IRIS, 3), drops=drops)
    # Sent its input, then went silent: the reason names who did not answer.
    p = proposal(IRIS, 3, k=3, rounds=2, threshold=3)
    with pytest.raises(CollabFailed, match=r"round 2: only 2 survivors.*no answer from: owner3"):
        run_collab(p, split(IRIS, 3), drops={"owner3": Drop(2, Phase.UNMASK)})


def test_bad_proposals_and_rows_are_refused_with_a_reason() -> None:
    with pytest.raises(ValidationError, match="more than half"):
        proposal(IRIS, 4, k=3, rounds=2, threshold=2)
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


def test_an_owner_dropped_mid_job_the_rest_complete_and_are_told_who() -> None:
    parts = split(IRIS, 3)
    p = proposal(IRIS, 3, k=3, rounds=6, threshold=2)
    run = run_collab(p, parts, drops={"owner2": Drop(3)})
    assert set(run.results) == {"owner1", "owner3"}
    expected = plaintext_with_dropouts(parts, IRIS[:3], 6, {"owner2": 2})
    for result in run.results.values():
        assert [(d.owner, d.round) for d in result.dropped] == [("owner2", 3)]
        np.testing.assert_allclose(result.centroids, expected, atol=1e-9)


def test_an_owner_that_sends_its_input_then_drops_still_counts_that_round() -> None:
    parts = split(IRIS, 5)
    p = proposal(IRIS, 5, k=3, rounds=3, threshold=3)
    run = run_collab(p, parts, drops={"owner4": Drop(2, Phase.UNMASK), "owner1": Drop(1)})
    expected = plaintext_with_dropouts(parts, IRIS[:3], 3, {"owner4": 2, "owner1": 0})
    np.testing.assert_allclose(run.results["owner2"].centroids, expected, atol=1e-9)
    assert [(d.owner, d.round) for d in run.results["owner2"].dropped] == [
        ("owner1", 1),
        ("owner4", 3),
    ]


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
    relayed: dict[str, SeedShares] = {}  # what the proposer's session relayed
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
                    shares=list(relayed.values()),
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
    owners["owner1"].unmask(requests["owner1"])  # opened owner3's self mask for round 1
    again = owners["owner1"].contribute(start)  # the round restarted (a new aggregator)
    assert again.round == 1
    lying = UnmaskRequest(
        collab_id=p.collab_id,
        round=1,
        survivors=["owner1", "owner2"],
        dropped=["owner3"],
        self_shares={u: requests["owner1"].self_shares[u] for u in ("owner1", "owner2")},
        key_shares={"owner3": b"x" * 100},
    )
    with pytest.raises(Refused, match="names owner3 dropped"):
        owners["owner1"].unmask(lying)


def test_across_attempts_an_owner_whose_mask_key_was_opened_is_never_a_survivor() -> None:
    """The other order of the two halves. Attempt 1: the aggregator holds owner3's input
    but names it dropped, to have owner1 and owner2 open owner3's mask key, then would
    restart the round with owner3 live and open its fresh self mask. No owner opens a
    mask key at all now: the first half is refused, so the restart over the same owners
    is harmless."""
    p, owners, agg = _one_round()
    start = agg.start_round()
    first = {name: owner.contribute(start) for name, owner in owners.items()}
    key_holders = ("owner1", "owner2")  # owner3's input is held back: "dropped"
    keys = agg._key_shares["owner3"]
    for h in key_holders:
        request = UnmaskRequest(
            collab_id=p.collab_id, round=1, survivors=list(key_holders), dropped=["owner3"],
            self_shares={u: first[u].shares[h] for u in key_holders},
            key_shares={"owner3": keys[h]},
        )  # fmt: skip
        with pytest.raises(Refused, match="names owner3 dropped: a round missing inputs runs"):
            owners[h].unmask(request)
    for owner in owners.values():  # the round restarts over the same owners: fine
        agg.receive_input(owner.contribute(start))
    for name, request in agg.close_inputs().items():
        assert request.dropped == [] and request.key_shares == {}
        reply = owners[name].unmask(request)
        assert reply.key_shares == {}
        agg.receive_unmask(reply)
    assert agg.finish_round().survivors == names(3)


def test_a_round_restarts_only_over_the_owners_it_began_with() -> None:
    """Attempt 1 of round 1 completes over all three owners, but its totals are kept
    back; the round "restarts" (a new aggregator restored, or the proposer's session
    saying so) with owner3 left out. The two totals' difference would be owner3's own
    statistics, so an owner refuses a restart whose live owners differ."""
    relayed: dict[str, SeedShares] = {}
    p, owners, agg = _one_round(relayed)
    start = agg.start_round()
    for owner in owners.values():
        agg.receive_input(owner.contribute(start))
    for name, request in agg.close_inputs().items():
        agg.receive_unmask(owners[name].unmask(request))
    first = agg.finish_round()  # never sent to anyone
    again = CollabAggregator(p)
    adverts = [o.advert() for o in owners.values()]
    shares = list(relayed.values())
    again.restore(
        Restore(collab_id=p.collab_id, adverts=adverts, shares=shares, round=1,
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
        with pytest.raises(Refused, match="restarts with other live owners than it began"):
            owners[name].contribute(restart)
    assert owners["owner1"].contribute(start).round == 1  # the same owners: a restart is fine


def test_a_round_unmasked_once_never_reruns_over_fewer_owners() -> None:
    """A dropout reruns the round among those that sent, but only before an owner
    answered an unmask request for it. Attempt 1 completes over all three owners, its
    totals kept back; a restart over the same owners (allowed: a new aggregator) makes
    each owner forget its answer; then a rerun "without owner3" would give a second total
    whose difference from the first is owner3's statistics. What an owner opened in a
    round is remembered across attempts, so the rerun is refused."""
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
        with pytest.raises(Refused, match="restarts with other live owners than it began"):
            owners[name].contribute(fewer)


def test_an_honest_dropout_does_not_expose_the_owners_earlier_rounds() -> None:
    """Round 1: everyone survives, so every self-mask seed is rebuilt. Round 2: owner3
    crashes before its input, an honest dropout. Opening its mask key s_3 to cancel its
    pairwise masks would give the pairwise masks of every round, hence owner3's round-1
    statistics exactly. Instead the round runs again among owner1 and owner2, and no
    message the aggregator (or the proposer's session, which relays them) holds carries
    a share of s_3: its round-1 input stays masked."""
    _, owners, agg = _one_round()
    seen, opened = {}, {}
    for round_, senders in ((1, list(owners)), (2, ["owner1", "owner2"])):
        start = agg.start_round()
        for name in senders:
            seen[name, round_] = owners[name].contribute(start)
            agg.receive_input(seen[name, round_])
        requests = agg.close_inputs()
        if not requests:  # owner3's input is missing: the round runs again without it
            assert agg.closed == (senders, ["owner3"])
            start = agg.start_round()
            assert start.round == round_ and start.live == senders
            for name in senders:
                agg.receive_input(owners[name].contribute(start))
            requests = agg.close_inputs()
        for name, request in requests.items():
            opened[name, round_] = owners[name].unmask(request)
            agg.receive_unmask(opened[name, round_])
        totals = agg.finish_round()
        for name in senders:
            owners[name].receive_totals(totals)
    assert agg.totals[1].survivors == ["owner1", "owner2"]
    assert [(d.owner, d.round) for d in agg.dropped] == [("owner3", 2)]
    # Before: the round-2 replies carried owner1's and owner2's shares of s_3, which
    # rebuilt give owner3's round-1 pairwise masks; its round-1 self mask was opened
    # when it survived, so its round-1 statistics were read exactly.
    assert all(not reply.key_shares for reply in opened.values()), "a mask key was opened"


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
    shares = owners[0].receive_roster(aggregator.roster())  # the true roster is taken
    assert set(shares.shares) == set(ids)


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
    lying = requests["owner1"].model_copy(
        update={"survivors": ["owner1", "owner2"], "dropped": ["owner3"]}
    )
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
