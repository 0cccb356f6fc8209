"""The timer thread behind invoke deadlines: fires what is due, skips what was cancelled."""

from __future__ import annotations

import random
import threading

from dms.actor.timers import SWEEP_AT, Timers


def test_due_timers_fire_once_and_cancelled_ones_never() -> None:
    timers = Timers()
    rng = random.Random(7)
    fired: list[int] = []
    lock = threading.Lock()

    def record(i: int) -> None:
        with lock:
            fired.append(i)

    passed = threading.Event()
    # The thread waits for its lock: every cancel comes before any of these is due. (On
    # a loaded machine, unheld, the test thread could pause between the two loops and
    # more than the tolerated 30 fired before their cancel came.)
    with timers._cond:
        handles = [
            timers.call_later(rng.uniform(0, 0.05), lambda i=i: record(i)) for i in range(300)
        ]
        cancelled = {i for i in range(300) if rng.random() < 0.5}
        for i in cancelled:
            handles[i].cancel()
        timers.call_later(0.06, passed.set)  # due after all of them: fired in order
    # Waited for, not slept: a sleep of 0.3 s was not always enough for the thread.
    assert passed.wait(30)
    timers.stop()
    assert len(fired) == len(set(fired))
    assert set(fired) == set(range(300)) - cancelled


def test_a_cancelled_deadline_does_not_wake_the_thread() -> None:
    """An invoke cancels its deadline when the reply comes: many invokes must not
    mean as many wake-ups of the timer thread."""
    timers = Timers()
    live = threading.Event()
    timers.call_later(10, live.set)
    passed = threading.Event()
    # 200 deadlines spread over 100 ms, all cancelled straight away, before the thread
    # looks at them (it waits for its lock). Unheld, the thread woke at each pause of
    # the test thread between two of them on a loaded machine (each new deadline the
    # earliest again): a count of its scheduling, not of the deadlines.
    with timers._cond:
        before = timers.wakeups
        for i in range(200):
            timers.call_later(0.05 + i * 0.0005, lambda: None).cancel()
        timers.call_later(0.2, passed.set)  # due after them all: once it fired, all passed
    assert passed.wait(30)
    # At most: the wake-up for the 10 s timer if still to come, the one for the new
    # deadlines, the one at 0.2 s. Before, one at each cancelled deadline too (~200).
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
    assert due.wait(30), "a live timer must survive the sweeps"
    timers.stop()
