"""The cool-down of requesters that let committed leases lapse (``dms.provider.lapses``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dms.provider.lapses import Lapses


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_lapse_doubles_the_wait_up_to_the_cap_and_it_runs_out() -> None:
    clock = Clock()
    lapses = Lapses(60.0, max_s=300.0, clock=clock)
    assert lapses.waiting("p") == 0
    assert [lapses.note("p") for _ in range(5)] == [60, 120, 240, 300, 300]
    assert lapses.waiting("p") == 300 and lapses.waiting("q") == 0
    clock.now += 300
    assert lapses.waiting("p") == 0
    clock.now += 301  # over for longer than max_s: forgiven
    assert lapses.note("p") == 60


def test_zero_means_no_cooldown() -> None:
    lapses = Lapses(0.0)
    assert lapses.note("p") == 0 and lapses.waiting("p") == 0


@given(st.lists(st.integers(min_value=0, max_value=50), max_size=300))
def test_it_remembers_at_most_capacity_peers_and_the_newest_ones(peers: list[int]) -> None:
    lapses = Lapses(10.0, capacity=8, clock=Clock())
    for peer in peers:
        lapses.note(str(peer))
    kept = [str(p) for p in dict.fromkeys(reversed(peers))][:8]
    assert len(lapses._peers) == len(kept)
    assert all(lapses.waiting(p) > 0 for p in kept)
