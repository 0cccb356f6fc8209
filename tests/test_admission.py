"""The admission budgets' arithmetic (``dms.actor.admission``) where a real host cannot
show it: peers at one IP address other than loopback (every test host is on
loopback, which is exempt), and the per-peer rate beside the global one. The
budgets against real hosts: tests/adversarial/test_adversarial_budgets.py."""

from __future__ import annotations

from dms.actor.admission import Admission, BehaviourLimits, HoldingLimits, Ticket, Verdict

LIMITS = HoldingLimits(
    max_inflight=64,
    max_inflight_per_peer=16,
    max_pending_decode_bytes=1 << 20,
    max_pending_decode_bytes_per_peer=1 << 20,
    unknown_share=0.5,
    ip_share=0.25,
)


def test_peers_at_one_address_share_a_part_of_the_unknown_share() -> None:
    """Eight keys at one address: together 8 requests held (64 x 0.5 x 0.25), whatever
    their per-peer budgets; another address, and a staked peer there, still get in."""
    admission = Admission(LIMITS)
    ips = {f"k{i}": "203.0.113.7" for i in range(8)} | {
        "other": "198.51.100.1",
        "mine": "203.0.113.7",
    }
    admission.peer_ip = ips.get
    admission.stake = lambda peer: peer == "mine"
    held = [admission.admit(f"k{i}", 100) for i in range(8) for _ in range(2)]
    assert sum(isinstance(t, Ticket) for t in held) == 8
    refused = next(v for v in held if isinstance(v, Verdict))
    assert "peers at 203.0.113.7" in refused.reason and "ip_share 0.25" in refused.reason
    assert isinstance(admission.admit("other", 100), Ticket)
    assert isinstance(admission.admit("mine", 100), Ticket)
    # Handled: the address's share is free again.
    for ticket in held:
        if isinstance(ticket, Ticket):
            admission.release(ticket)
    assert isinstance(admission.admit("k0", 100), Ticket)


def test_loopback_is_not_one_address() -> None:
    admission = Admission(LIMITS)
    admission.peer_ip = lambda peer: "127.0.0.1"
    held = [admission.admit(f"k{i}", 100) for i in range(16)]
    assert all(isinstance(t, Ticket) for t in held)


def test_the_global_rate_leaves_staked_peers_their_part() -> None:
    now = [0.0]
    limits = BehaviourLimits(clock=lambda: now[0])
    limits.stake = lambda peer: peer == "mine"
    limits.set("/bid", 10.0, 10, "per peer", total=4.0, total_burst=4)
    unknown = [limits.check("/bid", f"k{i}") for i in range(6)]
    assert [v is None for v in unknown] == [True, True, False, False, False, False]
    assert limits.check("/bid", "mine") is None and limits.check("/bid", "mine") is None
    assert limits.check("/bid", "mine") is not None  # the whole budget is spent now
    now[0] += 1.0  # a second: 4 more in all, 2 of them for unknown peers
    assert [limits.check("/bid", f"n{i}") is None for i in range(3)] == [True, True, False]
    assert limits.refused() == {"total_rate": 6}


def test_a_large_request_counts_for_its_size_in_the_rate_of_all_peers() -> None:
    """A bid request of 256 slots (42 KB) costs the node as much work as 11 small ones."""
    limits = BehaviourLimits(clock=lambda: 0.0)
    limits.set("/bid", 100.0, 100, "per peer", total=40.0, total_burst=40)  # unknown: 20
    assert limits.check("/bid", "k1", 42_000) is None  # 11 units
    verdict = limits.check("/bid", "k2", 42_000)  # 11 more: 22 > 20
    assert verdict is not None and "one per started 4 KiB" in verdict.reason
    assert all(limits.check("/bid", f"s{i}", 1_000) is None for i in range(9))  # 9 x 1 unit
