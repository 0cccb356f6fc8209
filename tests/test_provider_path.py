"""The provider's work per placement, kept to what it promises (issue 30): a bid checks
each slot's params once, amounts built without validation are the validated ones, an
allocate that starts its allocation leaves no lapse watch behind (one that does not
start still lapses), and the node's log formats each line once and still rotates."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from dms.actor import RemoteError
from dms.cli.node import PrivateRotatingLog
from dms.jobs.executors import EXECUTORS
from dms.orchestrator.messages import ALLOCATE, REQUEST, BidRequest
from dms.provider.bidder import BidderView, make_bid
from dms.resources import Preferences, ResourceLedger, Resources
from dms.sim.cluster import LocalCluster
from dms.store import open_database
from tests.adversarial.test_adversarial_leases import ask, bid_request
from tests.conftest import wait_for
from tests.test_orchestrator import (
    TERMINAL,
    deploy,
    live_leases,
    network,
    spec,
    wait_state,
)

AMOUNT = st.integers(min_value=0, max_value=2**40)


@given(AMOUNT, AMOUNT, AMOUNT, AMOUNT, AMOUNT, AMOUNT, AMOUNT, AMOUNT)
def test_amounts_built_for_accounting_are_the_validated_ones(
    a: int, b: int, c: int, d: int, e: int, f: int, g: int, h: int
) -> None:
    made = Resources.of((a, b, c, d))
    validated = Resources(cpu_milli=a, ram_mib=b, disk_mib=c, gpu=d)
    assert made == validated and hash(made) == hash(validated)
    assert made.model_dump() == validated.model_dump()
    assert made.model_fields_set == validated.model_fields_set
    assert made.model_dump_json() == validated.model_dump_json()
    total = made + Resources.of([e, f, g, h])
    assert total == Resources(cpu_milli=a + e, ram_mib=b + f, disk_mib=c + g, gpu=d + h)
    with pytest.raises(ValidationError):
        made.cpu_milli = 1  # type: ignore[misc]  # still frozen


@pytest.mark.parametrize(
    "values", [(-1, 0, 0, 0), (0, 0, 0, -5), (2.0, 0, 0, 0), (0.5, 0, 0, 0), ("7", 1, 2, 3)]
)
def test_amounts_that_are_not_counts_are_validated_as_before(values: Any) -> None:
    """Anything but four ints of at least 0 is validated: refused, or taken, as the
    model's own validation does."""
    cpu, ram, disk, gpu = values
    try:
        expected: Resources | type[ValidationError] = Resources(
            cpu_milli=cpu, ram_mib=ram, disk_mib=disk, gpu=gpu
        )
    except ValidationError:
        expected = ValidationError
    if expected is ValidationError:
        with pytest.raises(ValidationError):
            Resources.of(values)
    else:
        assert Resources.of(values) == expected
    if any(isinstance(v, int) and v < 0 for v in values):
        assert expected is ValidationError


def test_a_bid_checks_each_slots_params_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The executor's check of a slot's params ran twice a bid (the permanent-decline
    pass and the slot's own checks); once now, and a slot it rejects is still declined
    for good with its reason."""
    ledger = ResourceLedger(open_database(f"sqlite:///{tmp_path}/dms.db"))
    ledger.onboard(Resources(cpu_milli=2000, ram_mib=4096, disk_mib=4096))
    compute = EXECUTORS["compute"]
    checked: list[Any] = []
    real = compute.check

    def counted(params: Any, resources: Any = None) -> None:
        checked.append(params)
        real(params, resources)

    monkeypatch.setattr(compute, "check", counted)
    me = BidderView(peer_id="me", did="did:key:me", ledger=ledger, preferences=Preferences())
    slot = {"executor": "compute", "resources": {"cpu": "100m", "ram": "16MiB"}}
    request = BidRequest.model_validate(
        {
            "deployment_id": "d",
            "lease_s": 10,
            "slots": [
                {"slot": "ok", "params": {"seconds": 0}, **slot},
                {"slot": "bad", "params": {"seconds": -1}, **slot},
            ],
        }
    )
    bid = make_bid(request, "requester", "did:key:requester", me)
    assert len(checked) == 2  # one a slot (four before)
    assert [o.slot for o in bid.offers] == ["ok"]
    [decline] = bid.declines
    assert decline.slot == "bad" and decline.permanent and "seconds" in decline.reason


@pytest.fixture
def net(cluster: LocalCluster) -> LocalCluster:
    cluster.settings.update(heartbeat_s=0.5, orphan_s=3.0)
    return cluster


def _spy_call_later(node: Any, calls: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    real: Callable[..., Any] = node.call_later

    def spied(delay_s: float, fn: Callable[[], Any]) -> Any:
        calls.append(delay_s)
        return real(delay_s, fn)

    monkeypatch.setattr(node, "call_later", spied)


WATCH_S = 17.25  # allocate_within_s, told apart from every other timer of the node


def _watched_provider(
    net: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Any, Any, list[float]]:
    """A requester and one provider whose bidding's timers are recorded (their delays):
    the requester, the provider, its bidding and the delays."""
    net.settings.update(preferences={"allocate_within_s": WATCH_S})
    requester, (provider,) = network(net, 1)
    assert provider.node is not None
    bidding = provider.node.pykka_ref.proxy().bidding.get(timeout=5)
    calls: list[float] = []
    _spy_call_later(bidding.node, calls, monkeypatch)
    return requester, provider, bidding, calls


def test_an_allocate_that_starts_its_allocation_sets_no_lapse_watch(
    net: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commit and allocate in one exchange: the allocation starts in it, so the commit's
    watch (a timer, then a turn of the node's mailbox ``allocate_within_s`` later, for
    every placement) is not set; the job runs and its lease is released."""
    requester, provider, _, calls = _watched_provider(net, monkeypatch)
    dep = deploy(requester, spec(params={"seconds": 0}))
    done = wait_state(requester, dep, TERMINAL, 60)
    assert done["state"] == "completed", done["events"]
    wait_for(lambda: live_leases([provider]) == 0, 30, "the lease released")
    assert WATCH_S not in calls


def test_an_allocate_whose_answer_fails_after_the_start_sets_no_lapse_watch(
    net: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its allocation spawned and started, the allocate's answer raised: the lease was
    put under the commit's watch all the same, and a short job's end racing it could
    see the lease lapse as never started (its requester put on a lapse cooldown)."""
    from dms.actor import Responder

    requester, provider, bidding, calls = _watched_provider(net, monkeypatch)
    ok = Responder.ok

    def failing_ok(responder: Any, result: Any = None) -> None:
        if isinstance(result, dict) and "allocation" in result:
            raise RuntimeError("the answer could not be sent")
        ok(responder, result)

    monkeypatch.setattr(Responder, "ok", failing_ok)
    watch = bidding._watch_allocated

    def after_the_end(lease_id: str) -> None:  # the race lost: the 0 s job ended first
        wait_for(lambda: lease_id not in bidding._allocations, 30, "the job's end")
        watch(lease_id)

    monkeypatch.setattr(bidding, "_watch_allocated", after_the_end)
    [offer] = ask(requester, provider, REQUEST, bid_request(1))["offers"]
    allocate = {"deployment_id": "answer", "slot": "w.0", "lease_id": offer["lease_id"],
                "executor": "compute", "params": {"seconds": 0}, "commit": True}  # fmt: skip
    with pytest.raises(RemoteError):
        ask(requester, provider, ALLOCATE, allocate)
    wait_for(lambda: live_leases([provider]) == 0, 30, "the job's end released the lease")
    assert WATCH_S not in calls


def test_an_allocate_whose_allocation_does_not_start_still_lapses(
    net: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allocate that commits its lease and then cannot start the allocation (its
    actor not spawned) leaves it committed: released ``allocate_within_s`` later, as a
    commit no allocate followed, and recorded so."""
    net.settings.update(preferences={"allocate_within_s": 1.0, "lapse_cooldown_s": 0.0})
    requester, (provider,) = network(net, 1)
    assert provider.node is not None and provider.db is not None
    bidding = provider.node.pykka_ref.proxy().bidding.get(timeout=5)

    def no_spawn(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("no thread for it")

    monkeypatch.setattr(bidding.node, "spawn", no_spawn)
    [offer] = ask(requester, provider, REQUEST, bid_request(1))["offers"]
    allocate = {"deployment_id": "attack", "slot": "w.0", "lease_id": offer["lease_id"],
                "executor": "compute", "params": {"seconds": 0}, "commit": True}  # fmt: skip
    with pytest.raises(RemoteError):
        ask(requester, provider, ALLOCATE, allocate)
    assert provider.ledger is not None
    assert provider.ledger.lease(offer["lease_id"]).state == "allocated"
    wait_for(lambda: live_leases([provider]) == 0, 30, "the unstarted commit released")
    assert provider.db.events("allocation.never_started")


def test_the_log_formats_each_line_once_and_rotates_before_max_bytes(tmp_path: Path) -> None:
    """Each record formatted once (the base class formatted it twice: once to measure
    it), and the file still rotates before a line that would take it to max_bytes."""
    formatted: list[str] = []

    class Counting(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            formatted.append(record.getMessage())
            return super().format(record)

    path = tmp_path / "logs" / "dms.log"
    handler = PrivateRotatingLog(path, max_bytes=200, backups=2)
    handler.setFormatter(Counting("%(message)s"))
    logger = logging.getLogger("tests.provider_path.rotation")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        lines = [f"line {n:02d} {'x' * 40}" for n in range(10)]  # 50 bytes each
        for line in lines:
            logger.info(line)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert formatted == lines
    # 49 bytes a line: four fit under 200, the fifth would reach it and rotates first.
    assert Path(f"{path}.2").read_text().splitlines() == lines[0:4]
    assert Path(f"{path}.1").read_text().splitlines() == lines[4:8]
    assert path.read_text().splitlines() == lines[8:]
    assert path.stat().st_mode & 0o777 == 0o600
