"""The bidding service's record of ended allocations: bounded by count and by age."""

from __future__ import annotations

import time

from dms.jobs.allocation import EndedAllocation
from dms.provider.ended import EndedAllocations

KEY = b"k" * 32


def ended(inbox: str, ago_s: float = 0.0) -> EndedAllocation:
    return EndedAllocation(
        inbox=inbox, key=KEY, lease_id=inbox, requester_host="peer", driver=None,
        interactive=False, status={"state": "completed"}, logs=("state: completed",),
        ended=time.monotonic() - ago_s,
    )  # fmt: skip


def test_the_oldest_records_go_first_past_the_count() -> None:
    store = EndedAllocations(kept=2, keep_s=120)
    for inbox in ("alloc-a", "alloc-b", "alloc-c"):
        store.add(ended(inbox))
    assert not store.holds("alloc-a", KEY)
    assert store.holds("alloc-b", KEY) and store.holds("alloc-c", KEY)
    assert len(store) == 2


def test_a_record_past_its_age_is_not_answered_and_is_dropped() -> None:
    store = EndedAllocations(kept=10, keep_s=60)
    store.add(ended("alloc-old", ago_s=61))
    store.add(ended("alloc-new", ago_s=1))
    assert store.get("alloc-old", KEY) is None
    assert store.get("alloc-new", KEY) is not None
    assert len(store) == 1


def test_a_record_answers_only_for_the_key_its_handle_named() -> None:
    store = EndedAllocations(kept=10, keep_s=60)
    store.add(ended("alloc-a"))
    assert store.get("alloc-a", b"x" * 32) is None
    assert store.get("alloc-a", KEY) is not None


def test_keeping_none_keeps_nothing_and_the_refusal_says_which_settings() -> None:
    store = EndedAllocations(kept=0, keep_s=60)
    store.add(ended("alloc-a"))
    assert not store.holds("alloc-a", KEY)
    assert "ended_allocations_kept = 0" in store.gone
    assert "ended_allocation_keep_s = 60 s" in store.gone
