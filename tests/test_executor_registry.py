"""Executors register themselves (DESIGN decision 14): a new one is found by its kind,
and no generic layer names a concrete executor or session actor."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from dms.jobs.base import EXECUTORS, ExecutorError, Log, register_executor
from dms.jobs.executors import check_allocation, executor_for
from dms.jobs.spec import AllocationSpec, DeploymentSpec
from dms.orchestrator.deployment import DeploymentActor, actor_for
from dms.orchestrator.mining import MiningSessionActor
from dms.resources import Resources

ROOT = Path(__file__).resolve().parent.parent
GENERIC = [
    "dms/jobs/executors.py",
    "dms/jobs/allocation.py",
    "dms/provider/bidder.py",
    "dms/orchestrator/deployment.py",
    "dms/orchestrator/requester.py",
]


def test_a_new_executor_registers_itself_and_is_checked_by_kind() -> None:
    @register_executor
    class Echo:
        kind = "echo-test"

        def check(self, params: dict[str, Any], resources: Resources | None = None) -> None:
            if "text" not in params:
                raise ExecutorError("echo params: text is required", field="params.text")

        def run(self, params: dict[str, Any], stop: threading.Event, log: Log) -> Any:
            return params["text"]

    try:
        assert isinstance(executor_for("echo-test"), Echo)
        check_allocation("echo-test", {"text": "hi"}, None)
        with pytest.raises(ExecutorError, match="text is required"):
            check_allocation("echo-test", {}, None)
        with pytest.raises(ValueError, match="two executors of kind 'compute'"):

            @register_executor
            class Compute:  # another class under a kind that is taken
                kind = "compute"
    finally:
        EXECUTORS.pop("echo-test", None)


def test_the_shipped_executors_and_the_mining_session_are_found_by_kind() -> None:
    assert {"compute", "mining", "collab"} <= set(EXECUTORS)
    assert actor_for(_spec("mining")) is MiningSessionActor
    assert actor_for(_spec("compute")) is DeploymentActor


def test_no_generic_layer_names_a_concrete_executor() -> None:
    for path in GENERIC:
        text = (ROOT / path).read_text()
        for name in ("MiningExecutor", "CollabExecutor", "ComputeExecutor",
                     "MiningSessionActor", '== "mining"'):  # fmt: skip
            assert name not in text, f"{path} names {name}"


def _spec(executor: str) -> DeploymentSpec:
    """A spec of one allocation of ``executor`` (its params unchecked: only the kind counts)."""
    allocation = AllocationSpec.model_construct(name="a", executor=executor, params={})
    return DeploymentSpec.model_construct(allocations=[allocation])
