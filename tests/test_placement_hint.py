"""The hint a job that was not placed in time ends with (dms/cli/waiting.py): it names
what the user can do about the reason the node gave."""

from __future__ import annotations

from dms.cli import waiting
from dms.cli.waiting import placement_hint
from dms.orchestrator.base import GONE_PREFIX

CAPACITY = (
    "not placed within the deadline: shard0: 12D3KooWabc: declined: this node could "
    "never run this slot beside the ones before it in this request"
)
GONE = (
    "not placed within the deadline: shard0: 12D3KooWabc: the provider is gone (missed "
    "its heartbeat deadline); before: declined: this node could never run this slot"
)


def test_a_job_short_of_capacity_is_told_to_onboard_more_or_ask_for_less() -> None:
    mining = placement_hint(CAPACITY, shards=2)
    assert mining is not None and "onboard more providers" in mining and "--shards 1" in mining
    deployment = placement_hint(CAPACITY)
    assert deployment is not None and "onboard more providers" in deployment


def test_a_job_whose_providers_left_is_told_to_look_who_is_up_not_to_onboard_more() -> None:
    for hint in (placement_hint(GONE, shards=2), placement_hint(GONE)):
        assert hint is not None and "dms peers" in hint and "onboard more" not in hint
    assert "--local" in (placement_hint(GONE, shards=2) or "")


def test_other_failures_get_no_placement_hint() -> None:
    assert placement_hint("the worker's answer was refused: too large") is None


def test_the_cli_reads_the_words_the_orchestrator_writes() -> None:
    # The CLI keeps its own copy so that it does not import the orchestrator to start.
    assert waiting.GONE == GONE_PREFIX and GONE_PREFIX in GONE
