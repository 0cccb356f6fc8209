"""The budgets for signature work remote peers cause (dms.security.budget): one per
peer, one for all, and a share of it for the peers the node has no stake in."""

from __future__ import annotations

from dms.security.budget import UNKNOWN_SHARE, WorkBudget


def test_fresh_keys_cannot_spend_the_budget_of_a_peer_with_a_stake() -> None:
    now = [0.0]
    budget = WorkBudget("checks", rate=10.0, burst=20, peer_rate=5.0, peer_burst=5,
                        clock=lambda: now[0])  # fmt: skip
    budget.stake = lambda peer: peer == "member"
    # A crowd of fresh keys, each within its own budget, spends the unknown share.
    refusals = [budget.take(f"sybil{i}") for i in range(40)]
    allowed = refusals.count(None)
    assert allowed == 20 * UNKNOWN_SHARE
    assert "no stake" in str(refusals[-1]) and budget.refused["unknown"] == 40 - allowed
    # The member still finds the rest, within its own per-peer budget.
    takes = [budget.take("member") for _ in range(6)]
    assert takes[:5] == [None] * 5 and "from one peer" in str(takes[5])
    assert budget.take(None) is None  # this node's own work is never refused
    now[0] += 10.0  # refilled
    assert budget.take("sybil0") is None
