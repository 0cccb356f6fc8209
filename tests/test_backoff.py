"""The one backoff rule (dms.backoff) every retry loop of the node uses."""

from dms.backoff import Backoff


def test_each_wait_doubles_from_the_first_up_to_the_most() -> None:
    backoff = Backoff(first_s=0.5, max_s=30.0)
    assert [backoff.delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    waits = [0.5]
    while len(waits) < 8:
        waits.append(backoff.after(waits[-1]))
    assert waits == [backoff.delay(n) for n in range(8)]


def test_a_huge_attempt_count_waits_the_most_without_overflow() -> None:
    assert Backoff(first_s=1.0, max_s=3600.0).delay(10**6) == 3600.0
    assert Backoff(first_s=1.0, max_s=3600.0).delay(-3) == 1.0
