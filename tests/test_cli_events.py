"""What ``dms deploy --follow`` and a placed ``dms mine`` print of a job's events."""

from __future__ import annotations

from typing import Any

from dms.cli.events import EventFeed
from dms.orchestrator.base import EVENT_MEMORY


def event(at: float, what: str) -> dict[str, Any]:
    return {"at": at, "what": what}


def said(lines: list[str]) -> list[str]:
    return [line.split("  ", 1)[1] for line in lines]


def test_a_queued_job_retrying_the_same_round_is_printed_once() -> None:
    feed = EventFeed()
    events = [
        event(1.0, "round 1: asking 0 peer(s) for 1 slot(s)"),
        event(1.5, "round 1: no acceptable bid for main; queued"),
    ]
    assert said(feed.lines(events)) == [e["what"] for e in events]
    for n in range(2, 30):
        events += [
            event(n, f"round {n}: asking 0 peer(s) for 1 slot(s)"),
            event(n + 0.5, f"round {n}: no acceptable bid for main; queued"),
        ]
        assert feed.lines(events) == []
    # What changed is said: a peer fits now, and the slot is placed.
    events += [
        event(40.0, "round 30: asking 1 peer(s) for 1 slot(s)"),
        event(40.1, "main: chose 9Abcdefg (won: score 0.5, best of 1)"),
    ]
    assert said(feed.lines(events)) == [
        "round 30: asking 1 peer(s) for 1 slot(s)",
        "main: chose 9Abcdefg (won: score 0.5, best of 1)",
    ]


def test_a_queued_job_going_through_its_states_again_is_printed_once() -> None:
    """Each retry of a queued job also moved it to bidding and back to queued: the two
    state lines were printed at every retry (dms deploy of a job no peer fits)."""
    feed = EventFeed()
    events = [
        event(1.0, "state: bidding"),
        event(1.1, "round 1: asking 0 peer(s) for 1 slot(s)"),
        event(1.2, "round 1: no acceptable bid for w; queued"),
        event(1.3, "state: queued"),
    ]
    assert said(feed.lines(events)) == [e["what"] for e in events]
    for n in range(2, 30):
        events += [
            event(n, "state: bidding"),
            event(n + 0.1, f"round {n}: asking 0 peer(s) for 1 slot(s)"),
            event(n + 0.2, f"round {n}: no acceptable bid for w; queued"),
            event(n + 0.3, "state: queued"),
        ]
        printed = said(feed.lines(events))
        assert printed == (["state: bidding"] if n == 2 else []), (n, printed)
    # Once something else happens, the states it leads to are said again.
    events += [
        event(40.0, "state: bidding"),
        event(40.1, "round 30: asking 1 peer(s) for 1 slot(s)"),
        event(40.2, "w: chose 9Abcdefg (won: score 0.5, best of 1)"),
        event(40.3, "state: committing"),
        event(40.4, "state: failed"),
    ]
    assert said(feed.lines(events)) == [
        "round 30: asking 1 peer(s) for 1 slot(s)",
        "w: chose 9Abcdefg (won: score 0.5, best of 1)",
        "state: committing",
        "state: failed",
    ]


def test_events_past_the_nodes_window_are_still_printed() -> None:
    """The node keeps the newest EVENT_MEMORY events; a follower that counted how many
    it had printed saw nothing new once the window was full."""
    feed = EventFeed()
    window = [event(float(i), f"slot {i}: running") for i in range(EVENT_MEMORY)]
    assert len(feed.lines(window)) == EVENT_MEMORY
    window = [*window[1:], event(float(EVENT_MEMORY), "slot last: completed")]
    assert said(feed.lines(window)) == ["slot last: completed"]
    assert feed.lines(window) == []


def test_an_event_said_elsewhere_is_skipped() -> None:
    feed = EventFeed(skip=lambda what: what.startswith("the worker learns"))
    lines = feed.lines([event(1.0, "the worker learns nothing"), event(2.0, "placed")])
    assert said(lines) == ["placed"]
