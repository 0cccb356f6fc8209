"""The resource ledger: onboarded = free + locked + allocated, under any interleaving,
on SQLite and on PostgreSQL (``tests/pgserver.py`` says where that comes from)."""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dms.resources import (
    ALLOCATED,
    EXPIRED,
    LOCKED,
    RELEASED,
    LeaseView,
    Pools,
    ResourceError,
    ResourceLedger,
    Resources,
)
from dms.store import open_database
from tests import pgserver


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make_ledger(url: str, clock: Clock | None = None) -> ResourceLedger:
    return ResourceLedger(open_database(url), clock or Clock())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=pgserver.BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store of this test's own, on each backend."""
    with pgserver.store_url(request.param, tmp_path) as store:
        yield store


@pytest.fixture
def ledger(url: str, clock: Clock) -> Iterator[ResourceLedger]:
    ledger = make_ledger(url, clock)
    ledger.onboard(Resources(cpu=4, ram=8, disk=100))
    yield ledger
    ledger.db.close()


def res(cpu: float = 0, ram: float = 0, disk: float = 0) -> Resources:
    return Resources(cpu=cpu, ram=ram, disk=disk)


def test_lease_counts_read_the_time_inside_their_snapshot(
    ledger: ResourceLedger, clock: Clock
) -> None:
    """The leases by state (``dms_leases`` in GET /metrics) at one moment: a lease that
    expired, and whose cores a new lock took, while the count waited its turn is
    counted expired, never locked beside the new one (read before its snapshot, the
    time said it was still live: two locks on 4 cores of 4)."""
    first = ledger.lock(res(cpu=4), lease_s=5)
    taken: list[LeaseView] = []

    def another_writer() -> None:
        clock.now += 10  # the first lease expires, and its cores are taken again
        taken.append(ledger.lock(res(cpu=4), lease_s=5))

    writer = threading.Thread(target=another_writer, daemon=True)

    def counting_clock() -> float:
        """The count's read of the time; the other writer commits right after it, unless
        the count holds the writers' lock by then (it waits a second for it)."""
        now = clock()
        if not writer.is_alive() and not taken:
            writer.start()
            writer.join(1.0)
        return now

    ledger.clock = counting_clock
    counts = ledger.lease_counts()
    ledger.clock = clock
    writer.join(30)
    assert counts.get(LOCKED, 0) <= 1, counts
    assert ledger.lease_counts() == {EXPIRED: 1, LOCKED: 1}
    assert [v.id for v in ledger.live()] == [taken[0].id] != [first.id]


def test_lock_commit_release_move_amounts_between_pools(ledger: ResourceLedger) -> None:
    lease = ledger.lock(res(cpu=1, ram=2), lease_s=30, holder="did:key:x", ref="job-1")
    pools = ledger.pools()
    assert pools.locked == res(cpu=1, ram=2) and pools.free == res(cpu=3, ram=6, disk=100)
    ledger.commit(lease.id)
    pools = ledger.pools()
    assert pools.locked.is_zero() and pools.allocated == res(cpu=1, ram=2)
    assert pools.allocations == 1
    assert ledger.release(lease.id).state == RELEASED
    assert ledger.pools().free == res(cpu=4, ram=8, disk=100)


def test_a_lock_that_does_not_fit_names_what_is_short(ledger: ResourceLedger) -> None:
    ledger.lock(res(cpu=3), lease_s=30)
    with pytest.raises(ResourceError) as err:
        ledger.lock(res(cpu=2, ram=9), lease_s=30)
    assert err.value.code == "insufficient"
    assert "cpu 2 cores > 1 cores free" in err.value.message
    assert "ram 9 GiB > 8 GiB free" in err.value.message
    assert ledger.pools().locked == res(cpu=3)


def test_nothing_can_be_locked_before_onboarding(url: str) -> None:
    ledger = make_ledger(url)
    with pytest.raises(ResourceError, match="not onboarded"):
        ledger.lock(res(cpu=1), lease_s=30)
    ledger.db.close()


def test_an_expired_lease_frees_its_resources_at_once_and_cannot_be_committed(
    ledger: ResourceLedger, clock: Clock
) -> None:
    lease = ledger.lock(res(cpu=4), lease_s=5)
    assert ledger.pools().free.cpu_milli == 0
    clock.now += 5.001
    assert ledger.pools().free.cpu_milli == 4000  # before any sweep
    with pytest.raises(ResourceError) as err:
        ledger.commit(lease.id)
    assert err.value.code == "expired"
    assert ledger.lease(lease.id).state == EXPIRED


def test_a_commit_queued_past_its_lease_expiry_is_refused(ledger: ResourceLedger) -> None:
    """A commit that waits for other writers until its lease has expired finds it
    expired: the time a transition acts at is read once it holds the writers' lock.
    (Read before, a lock queued ahead of it could take the expired lease's cores and
    the commit then allocate them again.)"""
    clock = ledger.clock
    assert isinstance(clock, Clock)
    lease = ledger.lock(res(cpu=4), lease_s=5)
    committer_read_clock = threading.Event()
    base_clock = clock.__call__

    def watched() -> float:
        if threading.current_thread().name == "committer":
            committer_read_clock.set()
        return base_clock()

    ledger.clock = watched
    outcome: list[object] = []

    def commit() -> None:
        try:
            outcome.append(ledger.commit(lease.id))
        except ResourceError as exc:
            outcome.append(exc)

    committer = threading.Thread(target=commit, name="committer")
    with ledger.db.transaction(exclusive=("leases",)):  # another writer holds the lock
        committer.start()
        # Without the fix the committer reads the clock before it queues: give it time.
        committer_read_clock.wait(1.0)
        clock.now += 10  # the lease expires while the commit waits its turn
    committer.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], ResourceError)
    assert outcome[0].code == "expired"
    taken = ledger.lock(res(cpu=4), lease_s=5)  # its cores are free, and only once
    assert ledger.lease(taken.id).state == LOCKED
    assert ledger.pools().violations() == [] and ledger.pools().allocated.is_zero()


def test_a_screen_sees_the_pools_and_its_refusals_lock_nothing(ledger: ResourceLedger) -> None:
    ledger.lock(res(cpu=1), lease_s=5)
    seen = []

    def screen(pools: Pools) -> list[str | None]:
        seen.append(pools.locked.cpu_milli)
        return ["too cheap", None]

    results, after = ledger.lock_many(
        [(res(cpu=1), "a"), (res(cpu=1), "b")], lease_s=5, screen=screen
    )
    assert seen == [1000]  # what the transaction read, with the earlier lease
    refused, lease = results
    assert isinstance(refused, ResourceError) and refused.code == "declined"
    assert str(refused) == "too cheap"
    assert isinstance(lease, LeaseView) and lease.ref == "b"
    assert after.locked.cpu_milli == ledger.pools().locked.cpu_milli == 2000


def test_expire_marks_only_leases_past_their_time(ledger: ResourceLedger, clock: Clock) -> None:
    short = ledger.lock(res(cpu=1), lease_s=1)
    long = ledger.lock(res(cpu=1), lease_s=100)
    done = ledger.lock(res(cpu=1), lease_s=1)
    ledger.commit(done.id)
    clock.now += 2
    assert ledger.expire() == [short.id]
    assert ledger.lease(long.id).state == LOCKED
    assert ledger.lease(done.id).state == ALLOCATED


def test_commit_twice_and_release_twice_are_harmless(ledger: ResourceLedger) -> None:
    lease = ledger.lock(res(cpu=1), lease_s=30)
    ledger.commit(lease.id)
    ledger.commit(lease.id)
    ledger.release(lease.id)
    ledger.release(lease.id)
    assert ledger.pools().free == res(cpu=4, ram=8, disk=100)
    with pytest.raises(ResourceError, match="is released"):
        ledger.commit(lease.id)
    with pytest.raises(ResourceError, match="no lease"):
        ledger.release("nope")


def test_releasing_everything_a_holder_holds_for_a_deployment_is_one_transaction(
    ledger: ResourceLedger, clock: Clock
) -> None:
    """A requester's revert of everything it holds for a deployment (its end): its live
    leases and allocations whose ref starts with the deployment's prefix, found and
    released in the one transaction of the release; not another holder's, not another
    deployment's (a prefix of its id included), not one already ended."""
    a, b = "12D3KooWholderA", "12D3KooWholderB"
    mine = ledger.lock(res(cpu=0.5), lease_s=30, holder=a, ref="dep:abc/w0")
    committed = ledger.lock(res(cpu=0.5), lease_s=30, holder=a, ref="dep:abc/w1")
    ledger.commit(committed.id, holder=a)
    ended = ledger.lock(res(cpu=0.5), lease_s=30, holder=a, ref="dep:abc/w2")
    ledger.release(ended.id)
    expired = ledger.lock(res(cpu=0.5), lease_s=5, holder=a, ref="dep:abc/w3")
    longer = ledger.lock(res(cpu=0.5), lease_s=30, holder=a, ref="dep:abcd/w0")
    upper = ledger.lock(res(cpu=0.5), lease_s=30, holder=a, ref="dep:ABC/w0")
    theirs = ledger.lock(res(cpu=0.5), lease_s=30, holder=b, ref="dep:abc/w0")
    clock.now += 10  # ``expired`` is past its time
    assert set(ledger.live_ids("dep:abc/", a)) == {mine.id, committed.id}
    transactions = []
    begin = ledger.db.transaction

    def counted(*args, **kw):  # type: ignore[no-untyped-def]
        transactions.append(1)
        return begin(*args, **kw)

    ledger.db.transaction = counted  # type: ignore[method-assign]
    released = ledger.release_many([mine.id], holder=a, ref_prefix="dep:abc/")
    assert [lease.id for lease in released] == [mine.id, committed.id]  # each once
    assert all(lease.state == RELEASED for lease in released)
    assert len(transactions) == 1
    ledger.db.transaction = begin  # type: ignore[method-assign]
    live = {lease.id for lease in ledger.live()}
    assert live == {longer.id, upper.id, theirs.id}
    assert expired.id not in live


def test_onboarding_can_change_while_what_is_held_still_fits(ledger: ResourceLedger) -> None:
    lease = ledger.lock(res(cpu=2, ram=4), lease_s=30)
    ledger.commit(lease.id)
    ledger.onboard(res(cpu=2, ram=5, disk=10))
    assert ledger.pools().free == res(ram=1, disk=10)
    with pytest.raises(ResourceError) as err:
        ledger.onboard(res(cpu=1, ram=5, disk=10))
    assert err.value.code == "conflict" and "cpu 1 cores < 2 cores in use" in err.value.message
    assert ledger.pools().onboarded == res(cpu=2, ram=5, disk=10)


def test_offboard_refuses_while_allocations_live_unless_forced(ledger: ResourceLedger) -> None:
    lease = ledger.lock(res(cpu=1), lease_s=30)
    ledger.commit(lease.id)
    with pytest.raises(ResourceError, match="1 allocation"):
        ledger.offboard()
    assert ledger.pools().is_onboarded
    released = ledger.offboard(force=True)
    assert [r.id for r in released] == [lease.id]
    assert not ledger.pools().is_onboarded and ledger.lease(lease.id).state == RELEASED


def test_state_survives_reopening_the_store(url: str, clock: Clock) -> None:
    ledger = make_ledger(url, clock)
    ledger.onboard(res(cpu=2, ram=2, disk=2))
    alloc = ledger.lock(res(cpu=1), lease_s=30)
    ledger.commit(alloc.id)
    held = ledger.lock(res(ram=1), lease_s=30)
    ledger.db.close()
    again = make_ledger(url, clock)
    pools = again.pools()
    assert pools.allocated == res(cpu=1) and pools.locked == res(ram=1)
    assert {v.id for v in again.live()} == {alloc.id, held.id}
    again.db.close()


# ---- model-based: the ledger against a model of it ----------------------------------

amounts = st.builds(
    Resources,
    cpu_milli=st.integers(0, 3000),
    ram_mib=st.integers(0, 4096),
    disk_mib=st.integers(0, 2048),
    gpu=st.integers(0, 1),
)


class LedgerMachine(RuleBasedStateMachine):
    """Every step: the ledger's pools equal the model's, and never oversubscribe."""

    backend = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.stores = ExitStack()  # a store of its own for every example
        self.clock = Clock()
        url = self.stores.enter_context(pgserver.store_url(self.backend))
        self.ledger = make_ledger(url, self.clock)
        self.onboarded = Resources(cpu_milli=4000, ram_mib=8192, disk_mib=4096, gpu=1)
        self.ledger.onboard(self.onboarded)
        self.held: dict[str, tuple[str, Resources, float | None]] = {}

    def teardown(self) -> None:
        self.ledger.db.close()
        self.stores.close()

    def _live(self) -> dict[str, tuple[str, Resources]]:
        now = self.clock.now
        return {
            i: (state, amount)
            for i, (state, amount, expires) in self.held.items()
            if state == ALLOCATED or (state == LOCKED and expires is not None and expires > now)
        }

    def _in_use(self) -> Resources:
        total = Resources()
        for _, amount in self._live().values():
            total = total + amount
        return total

    @rule(amount=amounts, lease_s=st.floats(0.5, 20))
    def lock(self, amount: Resources, lease_s: float) -> None:
        fits = (self._in_use() + amount).fits_in(self.onboarded)
        try:
            lease = self.ledger.lock(amount, lease_s)
        except ResourceError as err:
            assert amount.is_zero() or not fits, err
            return
        assert fits and not amount.is_zero()
        self.held[lease.id] = (LOCKED, amount, self.clock.now + lease_s)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(list(self.held)))
        state, amount, _ = self.held[lease_id]
        live = lease_id in self._live()
        try:
            self.ledger.commit(lease_id)
        except ResourceError:
            assert not live or state != LOCKED
            if state == LOCKED:
                self.held[lease_id] = (EXPIRED, amount, None)
            return
        assert live
        self.held[lease_id] = (ALLOCATED, amount, None)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(list(self.held)))
        self.ledger.release(lease_id)
        state, amount, _ = self.held[lease_id]
        if state in (LOCKED, ALLOCATED):
            self.held[lease_id] = (RELEASED, amount, None)

    @rule(seconds=st.floats(0, 10))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def expire(self) -> None:
        self.ledger.expire()

    @rule(amount=amounts)
    def onboard_change(self, amount: Resources) -> None:
        try:
            self.ledger.onboard(amount)
        except ResourceError:
            assert amount.is_zero() or not self._in_use().fits_in(amount)
            return
        assert self._in_use().fits_in(amount)
        self.onboarded = amount

    @invariant()
    def pools_match_the_model(self) -> None:
        pools = self.ledger.pools()
        assert pools.violations() == []
        live = self._live()
        locked, allocated = Resources(), Resources()
        for state, amount in live.values():
            if state == LOCKED:
                locked = locked + amount
            else:
                allocated = allocated + amount
        assert pools.onboarded == self.onboarded
        assert pools.locked == locked and pools.allocated == allocated
        assert pools.free + pools.locked + pools.allocated == pools.onboarded


class PostgresLedgerMachine(LedgerMachine):
    backend = "postgresql"


@pytest.fixture
def postgres() -> None:
    """Skips (no server) or fails (unreachable) before Hypothesis starts, not inside it."""
    pgserver.server_url()


MODEL_SETTINGS = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
TestLedgerModel = LedgerMachine.TestCase
TestLedgerModel.settings = MODEL_SETTINGS


@pytest.mark.usefixtures("postgres")
class TestLedgerModelOnPostgres(PostgresLedgerMachine.TestCase):  # type: ignore[name-defined]
    settings = MODEL_SETTINGS


# ---- threads: any interleaving keeps the invariant -----------------------------------

op = st.one_of(
    st.tuples(st.just("lock"), amounts, st.floats(0.01, 0.3)),
    st.tuples(st.just("commit"), st.integers(0, 50)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("onboard"), amounts),
)


@pytest.mark.parametrize("backend", pgserver.BACKENDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=st.lists(st.lists(op, min_size=5, max_size=30), min_size=4, max_size=4))
def test_concurrent_threads_never_oversubscribe(backend: str, plans: list[list[tuple]]) -> None:
    with pgserver.store_url(backend) as url:
        ledger = ResourceLedger(open_database(url))
        ledger.onboard(Resources(cpu_milli=4000, ram_mib=8192, disk_mib=4096, gpu=1))
        seen: list[str] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def run(plan: list[tuple]) -> None:
            try:
                for step in plan:
                    try:
                        if step[0] == "lock":
                            seen.append(ledger.lock(step[1], step[2]).id)
                        elif step[0] in ("commit", "release") and seen:
                            lease_id = seen[step[1] % len(seen)]
                            getattr(ledger, step[0])(lease_id)
                        elif step[0] == "expire":
                            ledger.expire()
                        elif step[0] == "onboard":
                            ledger.onboard(step[1])
                    except ResourceError:
                        pass
            except BaseException as exc:  # surfaced in the main thread
                errors.append(exc)

        def audit() -> None:
            while not stop.is_set():
                violations = ledger.pools().violations()
                if violations:
                    errors.append(AssertionError(violations))

        threads = [threading.Thread(target=run, args=(plan,)) for plan in plans]
        auditor = threading.Thread(target=audit)
        auditor.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        auditor.join()
        assert errors == []
        # Both views at one instant: a lease of 10 ms may otherwise expire between them.
        instant = ledger.clock()
        ledger.clock = lambda: instant
        pools = ledger.pools()
        assert pools.violations() == []
        live = Resources()
        for lease in ledger.live():
            live = live + lease.resources
        assert live == pools.locked + pools.allocated
        ledger.db.close()


# ---- two processes, one store ------------------------------------------------------------


def _grab(url: str, seed: int, attempts: int, start: Barrier, out: multiprocessing.Queue) -> None:
    ledger = ResourceLedger(open_database(url))
    rng = random.Random(seed)
    mine: list[str] = []
    refused = 0
    seen: list[str] = []  # oversubscriptions this process saw, however briefly
    start.wait()  # both started and connected: their transitions overlap from here
    for _ in range(attempts):
        try:
            lease = ledger.lock(Resources(cpu_milli=500, ram_mib=256), lease_s=300)
        except ResourceError:
            refused += 1
            if mine and rng.random() < 0.3:
                ledger.release(mine.pop(rng.randrange(len(mine))))
            continue
        seen += ledger.pools().violations()
        if rng.random() < 0.5:
            ledger.commit(lease.id)
        mine.append(lease.id)
    ledger.db.close()
    out.put((mine, refused, seen))


def test_two_processes_on_one_store_never_oversubscribe(url: str) -> None:
    ledger = ResourceLedger(open_database(url))
    ledger.onboard(Resources(cpu=4, ram=8, disk=1))  # room for 8 leases of 0.5 cores
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    start = spawn.Barrier(2)
    procs = [spawn.Process(target=_grab, args=(url, seed, 60, start, out)) for seed in (1, 2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert [seen for _, _, seen in results] == [[], []]
    held = [lease_id for mine, _, _ in results for lease_id in mine]
    pools = ledger.pools()
    assert pools.violations() == []
    assert 0 < len(held) <= 8  # 8 leases of 0.5 cores fill the pool; none taken twice
    assert len(set(held)) == len(held)
    assert {lease.id for lease in ledger.live()} == set(held)
    assert all(refused > 0 for _, refused, _ in results)
    ledger.db.close()
