"""The timer thread behind invoke deadlines: fires what is due, skips what was cancelled."""

from __future__ import annotations

import random
import threading
import time

from dms.actor.timers import SWEEP_AT, Timers


def test_due_timers_fire_once_and_cancelled_ones_never() -> None:
    timers = Timers()
    rng = random.Random(7)
    fired: list[int] = []
    lock = threading.Lock()

    def record(i: int) -> None:
        with lock:
            fired.append(i)

    handles = [timers.call_later(rng.uniform(0, 0.05), lambda i=i: record(i)) for i in range(300)]
    cancelled = {i for i in range(300) if rng.random() < 0.5}
    for i in cancelled:
        handles[i].cancel()
    time.sleep(0.3)
    timers.stop()
    # A timer may already have fired before its cancel came: the rest are exact.
    assert len(fired) == len(set(fired))
    assert set(range(300)) - cancelled <= set(fired)
    assert len(set(fired) & cancelled) < 30


def test_a_cancelled_deadline_does_not_wake_the_thread() -> None:
    """An invoke cancels its deadline when the reply comes: many invokes must not
    mean as many wake-ups of the timer thread."""
    timers = Timers()
    live = threading.Event()
    timers.call_later(10, live.set)
    time.sleep(0.05)
    before = timers.wakeups
    # 200 deadlines spread over 100 ms, all cancelled straight away.
    for i in range(200):
        timers.call_later(0.05 + i * 0.0005, lambda: None).cancel()
    time.sleep(0.3)
    assert timers.wakeups - before <= 3
    assert not live.is_set()
    timers.stop()


def test_cancelled_entries_do_not_pile_up() -> None:
    timers = Timers()
    due = threading.Event()
    timers.call_later(0.2, due.set)
    for _ in range(4 * SWEEP_AT):
        timers.call_later(60, lambda: None).cancel()
    assert len(timers) < 2 * SWEEP_AT
    assert due.wait(2), "a live timer must survive the sweeps"
    timers.stop()
