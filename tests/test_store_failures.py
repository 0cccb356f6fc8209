"""A store that refuses writes (a full disk, a locked or read-only database) when an
allocation ends or a deployment is saved: nothing stays held for ever, and nothing
finished is resumed later (issue 17, item 8; ``specs/threats.md``).

The refusal is SQLite's own: ``PRAGMA query_only`` on every transaction makes each
write fail with "attempt to write a readonly database", as a read-only file would.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from dms.actor import RemoteError
from dms.node.daemon import Node
from dms.orchestrator.base import node_handle
from dms.orchestrator.messages import COMMIT, DEPLOYMENT_TOPIC, REQUEST, REVERT
from dms.orchestrator.store import DeploymentStore
from dms.sim.cluster import LocalCluster
from dms.store import Database
from dms.store.db import open_database
from tests.adversarial.hostile import envelope, frame_of, me, publish, until_refused
from tests.adversarial.test_adversarial_leases import ask, bid_request
from tests.clitools import BENCHMARK_STEP_S, Daemon, dms_many, init_home_quick
from tests.conftest import wait_for
from tests.test_orchestrator import (
    TERMINAL,
    deploy,
    live_leases,
    network,
    owner,
    spec,
    status,
    wait_state,
)


@contextmanager
def refusing_writes(db: Database) -> Iterator[None]:
    """Every transaction of ``db`` begun meanwhile refuses to write."""

    def read_only(conn: Any) -> None:
        conn.exec_driver_sql("PRAGMA query_only = ON")

    event.listen(db.engine, "begin", read_only)
    try:
        with pytest.raises(OperationalError, match="readonly"), db.transaction() as conn:
            conn.execute(text("DELETE FROM node_settings WHERE key = 'none'"))
        yield
    finally:
        event.remove(db.engine, "begin", read_only)
        # The connection the store keeps for its transactions keeps the pragma if its last
        # transaction only read: the next one would be refused. Turned off here, or dropped
        # by the store when even its BEGIN IMMEDIATE is refused.
        with suppress(OperationalError), db.transaction() as conn:
            conn.exec_driver_sql("PRAGMA query_only = OFF")
        db.engine.dispose()  # pooled connections keep the pragma: new ones have none


def allocated_on_disk(node: Node) -> int:
    """Allocated leases as the file holds them (the node's own reads refuse too)."""
    path = node.settings.home / "dms.db"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT count(*) FROM leases WHERE state = 'allocated'").fetchone()[0]


def store(node: Node) -> Database:
    assert node.db is not None
    return node.db


def test_an_allocation_ending_while_its_store_refuses_is_released_once_it_accepts(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    requester, (provider,) = network(net, 1)
    # Stopped by its owner inside the refusal: a job that ends by itself could end, and
    # its release be saved, before the refusal began (see ended_while_refusing).
    dep = deploy(requester, spec(params={"seconds": 600}))
    wait_state(requester, dep, ("running",), 30)
    with caplog.at_level(logging.WARNING, logger="dms"), refusing_writes(store(provider)):
        assert owner(requester, "/dms/node/deployment/shutdown", {"id": dep})["state"] == "shutdown"
        wait_for(
            lambda: any("is not released yet" in r.getMessage() for r in caplog.records),
            30,
            "the allocation's end refused its release",
        )
        assert allocated_on_disk(provider) == 1  # the store has not taken the release yet
        # The node keeps working meanwhile: it answers its owner.
        assert status(requester, dep)["state"] == "shutdown"
    wait_for(lambda: live_leases([provider]) == 0, 30, "the lease to be released")
    assert provider.ledger is not None and provider.ledger.pools().violations() == []


@contextmanager
def ended_while_refusing(net: LocalCluster) -> Iterator[tuple[Node, list[Node], str, Path]]:
    """A running deployment that ends (its owner shuts it down) while its requester's
    store refuses writes: yields the requester, the providers, the deployment and the
    file its kept end is in, once that file exists; the store accepts again on leaving.

    Ended by its owner, not by its job: a job that ends by itself (it ran a second)
    could end, and its end be saved, before the store refuses, whenever the test's
    thread waited that long between seeing it running and the refusal."""
    requester, peers = network(net, 1)
    dep = deploy(requester, spec(params={"seconds": 600}))
    wait_state(requester, dep, ("running",), 30)
    unsaved = requester.settings.home / "unsaved" / f"deployment-{dep}.json"
    with refusing_writes(store(requester)):
        assert owner(requester, "/dms/node/deployment/shutdown", {"id": dep})["state"] == "shutdown"
        wait_for(unsaved.exists, 30, "the end to be kept beside the refusing store")
        yield requester, peers, dep, unsaved


def test_a_deployment_that_ends_while_its_store_refuses_is_saved_once_it_accepts(
    net: LocalCluster,
) -> None:
    with ended_while_refusing(net) as (requester, peers, dep, unsaved):
        assert status(requester, dep)["state"] == "shutdown"  # read through the kept end
    wait_for(lambda: not unsaved.exists(), 40, "the end to reach the store")
    with store(requester).transaction() as conn:
        state = conn.execute(text("SELECT state FROM deployments WHERE id = :id"), {"id": dep})
        assert state.scalar_one() == "shutdown"
    wait_for(lambda: live_leases(peers) == 0, 30, "no lease left")


def test_a_deployment_ended_unsaved_before_a_restart_is_not_resumed(net: LocalCluster) -> None:
    with ended_while_refusing(net) as (requester, peers, dep, unsaved):
        requester.stop()  # the store still refuses: the row in it says "running"
    requester = net.restart(requester)
    done = status(requester, dep)
    assert done["state"] == "shutdown", done["events"]
    assert not any("resumed" in e["what"] for e in done["events"])
    assert not unsaved.exists()
    wait_for(lambda: live_leases(peers) == 0, 30, "no lease left")


def test_a_kept_end_that_is_not_a_whole_row_is_set_aside_and_the_node_starts(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A kept end the database cannot take (a column missing: edited by hand, or kept
    by another version) was written first thing at start, and its KeyError failed every
    start of the node. It is renamed ``.unreadable`` (nothing deleted) and said."""
    (node,) = net.start(1)
    home = node.settings.home
    node.stop()
    kept = home / "unsaved" / "deployment-d1.json"
    kept.parent.mkdir(exist_ok=True)
    kept.write_text('{"id": "d1", "state": "failed"}')
    with caplog.at_level(logging.WARNING, logger="dms"):
        node = net.restart(node)
    assert node.system is not None and node.node is not None
    assert not kept.exists() and kept.with_name(kept.name + ".unreadable").exists()
    said = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert said and "no " in said[0] and "name" in said[0], said


def test_bids_received_while_the_store_refuses_are_indexed_once_it_accepts(
    net: LocalCluster,
) -> None:
    """A round's bid index rows go with the deployment's next save (one transaction):
    when that save failed, they were dropped with it, and the deployment's manifest
    (why each bid won or lost) never showed the bid it was placed on, though its later
    saves were taken. They wait for the next save now."""
    requester, peers = network(net, 1)
    with refusing_writes(store(requester)):
        dep = deploy(requester, spec(params={"seconds": 1.0}))
        # Placed (its round ended) while every save failed; its status reads refuse too.
        wait_for(lambda: live_leases(peers) == 1, 30, "the slot placed on the provider")
    wait_for(lambda: live_leases(peers) == 0, 30, "the job to end on the provider")

    def ended() -> bool:  # none of its saves was taken yet: 'no deployment' meanwhile
        try:
            return status(requester, dep)["state"] in TERMINAL
        except RemoteError:
            return False

    wait_for(ended, 30, "the deployment's end saved")
    assert status(requester, dep)["state"] == "completed"
    manifest = owner(requester, "/dms/node/deployment/manifest", {"id": dep})
    assert [b["outcome"] for b in manifest["bids"]] == ["won"]


def test_an_allocation_that_ran_is_not_a_lapse_when_its_release_waits_for_the_store(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A committed lease whose allocation never started is released ``allocate_within_s``
    after the commit and its requester gets no bids for ``lapse_cooldown_s``. The watch
    asked only whether an allocation was running then: one that had run and ended while
    the store refused its release (retried 0.5, 1, 2, 4, 8, 16 s later) was taken for a
    lapse once the store accepted again before the next retry, the honest requester
    cooled down (its next job got no bid) and ``allocation.never_started`` recorded."""
    # The job runs 3 s: the store must refuse before it ends, and a test thread that
    # waited longer than a 0.5 s job between seeing it running and the refusal found its
    # release saved (no retry at all). The watch, 14.5 s after the commit, comes between
    # the store accepting again (~10.5 s: the job, then refusals 0.5, 1, 2 and 4 s apart)
    # and the release's next try (~18.5 s), as it did with 0.5 s and 12 s.
    net.settings.update(preferences={"allocate_within_s": 14.5, "lapse_cooldown_s": 120.0})
    requester, (provider,) = network(net, 1)
    dep = deploy(requester, spec(params={"seconds": 3.0}))
    wait_state(requester, dep, ("running",), 30)
    with caplog.at_level(logging.WARNING, logger="dms"), refusing_writes(store(provider)):
        done = wait_state(requester, dep, TERMINAL, 30)
        assert done["state"] == "completed", done["events"]
        # Its release refused four times: the next try is 8 s away, past the watch.
        wait_for(
            lambda: any("trying again in 8 s" in r.getMessage() for r in caplog.records),
            60,
            "the release retried with a wait of 8 s",
        )
    wait_for(lambda: live_leases([provider]) == 0, 60, "the lease released")
    assert provider.db is not None and provider.db.events("allocation.never_started") == []
    again = deploy(requester, spec(params={"seconds": 0.2}))
    done = wait_state(requester, again, TERMINAL, 60)
    assert done["state"] == "completed", done["events"]


def _beats_on_and_keeps_its_running_job(
    net: LocalCluster, blocked: Callable[[Node], AbstractContextManager[Any]]
) -> None:
    """A provider runs a 600 s job; while ``blocked(provider)`` holds its store, the
    requester hears eight more of its heartbeats, has it alive and the job running,
    never placed again."""
    requester, (provider,) = network(net, 1)
    dep = deploy(requester, spec(params={"seconds": 600}, deadline_s=120))
    wait_state(requester, dep, ("running",), 30)

    def heard() -> Any:
        record = requester.peer_table.get(provider.peer_id)
        assert record is not None and record.heartbeat is not None
        return record

    with blocked(provider):
        first = heard().heartbeat.seq
        # Eight beats' time (a deadline is three): heard eight more, or gone meanwhile.
        wait_for(
            lambda: heard().heartbeat.seq >= first + 8 or heard().status == "gone",
            60,
            "eight more heartbeats from the provider, or the provider gone",
        )
        assert heard().status == "alive"
        running = status(requester, dep)
        assert running["state"] == "running", running["events"]
        lost = [e["what"] for e in running["events"] if "placing it again" in e["what"]]
        assert lost == [], running["events"]
    owner(requester, "/dms/node/deployment/shutdown", {"id": dep})
    wait_state(requester, dep, TERMINAL, 60)


def test_a_provider_whose_store_refuses_still_heartbeats_and_keeps_its_running_job(
    net: LocalCluster,
) -> None:
    """A heartbeat carries the provider's figures, read from its store; a store that
    refused (a read-only file: every transaction, reads too, begins with BEGIN
    IMMEDIATE) skipped the heartbeat whole ("heartbeat not sent"). Past three of them
    every peer had the provider gone, and its requesters placed its running jobs again
    elsewhere, though the node and its jobs ran on. It beats on now, with the figures
    it last read."""
    _beats_on_and_keeps_its_running_job(net, lambda provider: refusing_writes(store(provider)))


def test_a_store_that_refuses_is_warned_of_once_not_at_every_heartbeat(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """While its store refuses, a provider's heartbeats carry the figures it last read,
    with a warning: one a beat (every 2 s by default, for as long as the store refuses,
    hours for a full disk) buried every other line of its log. Warned of once now, and
    told when the figures are read again."""
    requester, (provider,) = network(net, 1)
    fallback = "heartbeat figures not read"

    def seq() -> int:
        record = requester.peer_table.get(provider.peer_id)
        assert record is not None and record.heartbeat is not None
        return record.heartbeat.seq

    with caplog.at_level(logging.INFO, logger="dms"), refusing_writes(store(provider)):
        wait_for(lambda: any(fallback in r.getMessage() for r in caplog.records), 60, "the warning")
        first = seq()
        # Three beats past the warning (each one warned, before): six took 3 s more.
        wait_for(lambda: seq() >= first + 3, 60, "three more heartbeats from the provider")
        warned = [r for r in caplog.records if fallback in r.getMessage()]
        assert len(warned) == 1, [r.getMessage() for r in warned]
    with caplog.at_level(logging.INFO, logger="dms"):
        wait_for(
            lambda: any("heartbeat figures read again" in r.getMessage() for r in caplog.records),
            60,
            "the figures read again",
        )


def test_a_bid_request_heard_while_the_store_refuses_is_a_counted_refusal_not_a_traceback(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A bid request heard on the deployment topic while the provider's store refuses
    (a full disk, a locked or read-only file) made its handler raise the store's error:
    a traceback in the log ('handler of ... raised') for every request heard. It is a
    refusal now, as one asked directly is: counted, one warning line with the reason,
    and the direct asker gets that reason."""
    requester, (provider,) = network(net, 1)
    assert provider.system is not None

    def attempt() -> None:
        request = bid_request(1) | {"reply_to": me(requester).model_dump()}
        env = envelope(requester, REQUEST, request, topic=DEPLOYMENT_TOPIC)
        publish(requester, DEPLOYMENT_TOPIC, frame_of(requester, env))

    with caplog.at_level(logging.WARNING, logger="dms"), refusing_writes(store(provider)):
        until_refused(provider, "store_refused", attempt, "the gossip request refused")
        with pytest.raises(RemoteError) as direct:
            ask(requester, provider, REQUEST, bid_request(1))
    assert direct.value.code == "store_refused"
    assert "store refused" in direct.value.reason
    raised = [r.getMessage() for r in caplog.records if r.exc_info or "raised" in r.getMessage()]
    assert raised == []
    refused = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"refused {REQUEST}") and "store_refused" in r.getMessage()
    ]
    assert refused and all("store refused" in line for line in refused), refused
    assert provider.ledger is not None and provider.ledger.live() == []


@contextmanager
def locked_by_another_process(path: Path, hold_s: float) -> Iterator[subprocess.Popen[str]]:
    """``path`` held in a write transaction by another process (as ``sqlite3 dms.db``
    with ``BEGIN IMMEDIATE`` typed in would), for ``hold_s``, until the block ends, or
    until the test closes the holder's stdin (``let_go``)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE_LOCK, str(path), str(hold_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdin is not None:
            holder.stdin.close()


HOLD_WRITE_LOCK = """
import select, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
select.select([sys.stdin], [], [], float(sys.argv[2]))  # its stdin closed: let go now
"""


def let_go(holder: subprocess.Popen[str]) -> None:
    """The other process ends its transaction and exits."""
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(60)


def test_a_provider_whose_store_another_process_locks_still_heartbeats(
    net: LocalCluster,
) -> None:
    """A provider's store held locked by another process (someone's ``sqlite3 dms.db``
    with a write transaction open) made every read of the node wait out SQLite's busy
    timeout (30 s) on the node's thread, its heartbeats' among them: past three missed
    beats every peer had it gone, and its requesters placed its running jobs again
    elsewhere. Its heartbeats go on now, with the figures it last read."""
    _beats_on_and_keeps_its_running_job(
        net, lambda provider: locked_by_another_process(provider.settings.home / "dms.db", 60)
    )


def test_a_heartbeat_waiting_for_a_locked_store_holds_up_none_of_the_nodes_timers(
    net: LocalCluster,
) -> None:
    """The periodic heartbeat waits for its figures up to a quarter of its interval when
    another process holds the store locked. It ran on the actor system's one timer
    thread, which every deadline of the node waits on (invoke timeouts, each actor's
    ``call_later``: lease expiry, sweeps, retries): each beat held them all for as long
    as it waited. The node's timers go on while its heartbeat waits now."""
    # The heartbeat waits up to 0.5 s for the store (a quarter of 2 s): 25 ticks of the
    # timer below while it waits, none when the wait held the timer thread (4 s, 1 s
    # waits, took 12 s of the test for its three beats).
    net.settings.update(heartbeat_s=2.0)
    requester, (provider,) = network(net, 1)
    # A lease that expires at once: past its expiry every heartbeat reads the store.
    ask(requester, provider, REQUEST, bid_request(1, lease_s=0.5))
    ledger = provider.ledger
    assert ledger is not None
    read = ledger.pools
    ticks = [0]
    # Of each heartbeat that read the store: the node's timers that fired while it read.
    fired_during: list[int] = []

    def pools(wait_s: float | None = None) -> Any:
        before = ticks[0]
        try:
            return read(wait_s)
        finally:
            if wait_s:  # the heartbeat's read (no other caller bounds its wait)
                fired_during.append(ticks[0] - before)

    ledger.pools = pools  # type: ignore[method-assign]
    assert provider.system is not None
    timers = provider.system.timers
    done = threading.Event()

    def tick() -> None:  # a timer of the node every 20 ms, as deadlines come due
        ticks[0] += 1
        if not done.is_set():
            timers.call_later(0.02, tick)

    timers.call_later(0.02, tick)
    try:
        with locked_by_another_process(provider.settings.home / "dms.db", 60):
            wait_for(lambda: len(fired_during) >= 3, 60, "three heartbeats to read the store")
    finally:
        done.set()
    assert max(fired_during) > 0, f"no timer fired while a heartbeat waited: {fired_during}"


def test_a_commit_or_revert_while_the_store_refuses_is_refused_with_the_reason(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """As a bid request: the store's error raised through the commit's or the revert's
    handler was a traceback in the provider's log and 'handler_error' to its caller.
    Each is refused ``store_refused`` now, with the store's reason, and the lease waits
    in the store for the requester to ask again once it accepts."""
    requester, (provider,) = network(net, 1)
    bid = ask(requester, provider, REQUEST, bid_request(1, lease_s=60))
    [offer] = bid["offers"]
    commit = {"deployment_id": "attack", "slot": "w.0", "lease_id": offer["lease_id"]}
    revert = {"deployment_id": "attack", "lease_ids": [offer["lease_id"]]}
    with caplog.at_level(logging.WARNING, logger="dms"), refusing_writes(store(provider)):
        for behaviour, payload in ((COMMIT, commit), (REVERT, revert)):
            with pytest.raises(RemoteError) as refused:
                ask(requester, provider, behaviour, payload)
            assert refused.value.code == "store_refused", refused.value
            assert "store refused" in refused.value.reason
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert ask(requester, provider, COMMIT, commit)["state"] == "allocated"
    assert ask(requester, provider, REVERT, revert)["released"] == [offer["lease_id"]]


def _quietly_ask(requester: Node, provider: Node, behaviour: str, payload: Any) -> None:
    with suppress(RemoteError):
        ask(requester, provider, behaviour, payload)


def _public(requester: Node, provider: Node, behaviour: str, timeout: float) -> Any:
    """``behaviour`` of the provider's node actor, asked by the requester's, waited for
    up to ``timeout``."""
    assert requester.node is not None
    return requester.node.ask(node_handle(provider.peer_id), behaviour, None, timeout=timeout)


def _busy_refusal(refused: RemoteError) -> None:
    assert refused.code == "store_refused", refused
    assert "busy" in refused.reason and "locked by another process" in refused.reason, refused


def test_a_node_whose_store_another_process_locks_answers_at_once_and_refuses_what_needs_it(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone's ``sqlite3 dms.db`` with a write transaction open made every handler of the
    provider that touched its store (a bid request, a commit, an allocate, a revert, its
    lease expiry) wait out SQLite's busy timeout, 30 s, on the node's one thread: a hello
    or a status, behind them, waited as long, and peers' requests passed their deadlines
    (the direct bid request below: 'timeout' after 10 s). Each waits ``store_wait_s``
    (0.5 s) at most now, and is refused ``store_refused``: the store is busy, locked by
    another process. The lock is held until the test lets it go."""
    requester, (provider,) = network(net, 1)
    bid = ask(requester, provider, REQUEST, bid_request(1, lease_s=60))
    [offer] = bid["offers"]
    commit = {"deployment_id": "attack", "slot": "w.0", "lease_id": offer["lease_id"]}
    path = provider.settings.home / "dms.db"
    with (
        caplog.at_level(logging.WARNING, logger="dms"),
        locked_by_another_process(path, 600) as holder,
    ):
        # Requests that need the store, ahead of the hello in the provider's mailbox.
        ahead = [
            threading.Thread(
                target=_quietly_ask, args=(requester, provider, REQUEST, bid_request(1))
            )
            for _ in range(2)
        ]
        for thread in ahead:
            thread.start()
        hello = _public(requester, provider, "/public/hello", timeout=45)
        assert hello["peer_id"] == provider.peer_id
        assert _public(requester, provider, "/public/status", timeout=45)["status"] == "running"
        for behaviour, payload in ((REQUEST, bid_request(1)), (COMMIT, commit)):
            with pytest.raises(RemoteError) as refused:
                ask(requester, provider, behaviour, payload)
            _busy_refusal(refused.value)
        for thread in ahead:
            thread.join(45)
        assert holder.poll() is None  # all of it while the other process held the lock
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    # Let go: the same requests are served. A transaction of the provider that waited
    # for the file may still be waking from SQLite's busy sleep (up to ~0.1 s), and a
    # request in that moment is refused busy, "ask again later": asked again, served.
    committed = _served_once_let_go(lambda: ask(requester, provider, COMMIT, commit))
    assert committed["state"] == "allocated"
    asked = _served_once_let_go(lambda: ask(requester, provider, REQUEST, bid_request(1)))
    assert asked["offers"]


def _served_once_let_go(call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``call()``'s answer once the store, let go, is no longer refused busy (30 s)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return call()
        except RemoteError as exc:
            if exc.code != "store_refused" or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_store_another_process_locks_leaks_no_lease_and_places_again(
    net: LocalCluster,
) -> None:
    """A lease that expires, and a committed one that no allocate follows, while another
    process holds the provider's store locked. The committed lease's watch
    (``allocate_within_s``) and the lease expiry came due during the lock and each waited
    SQLite's 30 s busy timeout on the node's thread: a hello asked then got no answer
    within 20 s, and a watch whose wait ended while the lock was held gave up, the lease
    allocated until the next restart. Now the node answers throughout; the watch and the
    expiry, refused at once, try again with growing waits and catch up once the lock is
    let go (with the watch's retry taken out, the lease stays allocated); then the
    requester places a job on the provider.

    The other process lets go only once the hello is answered (a node's thread waiting on
    the lock would never answer it: the hello times out) and the expiry (every second
    here, ``expire_every_s``) and the watch have both come due under the lock: 3 s at
    least, not a fixed 40 s (past the busy timeout) whose catching up took the watch's
    doubling waits to a minute. With the expiry every 5 s (the default) the lock was
    held 10 s, and the watch's doubling waits under it (0.5, 1, 2, 4, 8 s) put its
    catching up 7 s after the lock was let go."""
    net.settings.update(
        preferences={"allocate_within_s": 2.0, "lapse_cooldown_s": 0.0}, expire_every_s=1.0
    )
    requester, (provider,) = network(net, 1)
    [expiring] = ask(requester, provider, REQUEST, bid_request(1, lease_s=2))["offers"]
    [committed] = ask(requester, provider, REQUEST, bid_request(1, lease_s=60))["offers"]
    commit = {"deployment_id": "attack", "slot": "w.0", "lease_id": committed["lease_id"]}
    assert ask(requester, provider, COMMIT, commit)["state"] == "allocated"
    due = time.monotonic() + 2.0  # the commit's watch (allocate_within_s)
    path = provider.settings.home / "dms.db"
    with locked_by_another_process(path, 600) as holder:
        held_from = time.monotonic()
        # Once the watch came due, the node answers (before: behind the watch's and the
        # expiry's 30 s waits, in its mailbox).
        wait_for(lambda: time.monotonic() > due + 1.0, 10, "the watch to come due")
        assert _public(requester, provider, "/public/hello", timeout=20)["peer_id"]
        assert holder.poll() is None
        # The expiry runs every second (expire_every_s): it came due under the lock too.
        wait_for(lambda: time.monotonic() > held_from + 3.0, 20, "an expiry under the lock")
        assert holder.poll() is None
        let_go(holder)

    def state(lease_id: str) -> str:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT state FROM leases WHERE id = ?", (lease_id,)).fetchone()
            return str(row[0])

    wait_for(
        lambda: (
            state(expiring["lease_id"]) == "expired" and state(committed["lease_id"]) == "released"
        ),
        40,
        "the expiry and the unallocated commit's release to catch up",
    )
    assert live_leases([provider]) == 0
    assert provider.db is not None and provider.db.events("allocation.never_started")
    dep = deploy(requester, spec(params={"seconds": 0.2}))
    done = wait_state(requester, dep, TERMINAL, 60)
    assert done["state"] == "completed", done["events"]
    assert done["slots"][0]["peer_id"] == provider.peer_id


def test_a_deployment_asked_while_another_process_locks_the_store_is_refused_saying_so(
    net: LocalCluster,
) -> None:
    """The owner's ``deployment new`` saves the deployment on the node's thread before it
    answers: with the store locked by another process that save waited SQLite's 30 s
    busy timeout (the command itself gave up after 10 s), then the deployment placed
    unsaved. Refused now, ``store_refused`` saying the store is busy, nothing started;
    once the lock is let go the same command places it."""
    requester, _ = network(net, 1)
    with locked_by_another_process(requester.settings.home / "dms.db", 600) as holder:
        with pytest.raises(RemoteError) as refused:
            deploy(requester, spec(params={"seconds": 0.2}))
        _busy_refusal(refused.value)
        assert "not started" in refused.value.reason
        assert holder.poll() is None
    dep = deploy(requester, spec(params={"seconds": 0.2}))
    assert wait_state(requester, dep, TERMINAL, 60)["state"] == "completed"
    listed = owner(requester, "/dms/node/deployment/list")
    assert [d["id"] for d in listed] == [dep]


def test_a_revert_refused_while_the_providers_store_is_busy_is_sent_again(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A revert is the requester's word that a provider may give a lease back and stop its
    allocation (a slot lost after its polls failed: no stop goes with it). One refused
    ``store_refused`` because another process held the provider's store ("busy, ask again
    later") was taken for an acknowledgement and never sent again: the allocation ran on
    and its lease stayed allocated for as long as the job did (600 s here). It is sent
    again, as an unanswered one is, and once the lock is let go the lease is released."""
    requester, (provider,) = network(net, 1)
    dep = deploy(requester, spec(params={"seconds": 600}, deadline_s=120))
    wait_state(requester, dep, ("running",), 30)
    assert requester.node is not None and provider.ledger is not None
    [lease] = provider.ledger.live()
    lease_id = lease.id
    reverts = requester.node.pykka_ref.proxy().requester.get(timeout=5).reverts
    payload = {"deployment_id": dep, "lease_ids": [lease_id]}
    path = provider.settings.home / "dms.db"
    with (
        caplog.at_level(logging.INFO, logger="dms"),
        locked_by_another_process(path, 600) as holder,
    ):
        requester.node.tell_call(reverts.send, provider.peer_id, payload)

        def refused_once() -> bool:  # acknowledged (before), or to be sent again
            return reverts.acknowledged > 0 or any(
                "revert to" in r.getMessage() and "store is busy" in r.getMessage()
                for r in caplog.records
            )

        wait_for(refused_once, 30, "the revert refused while the store is held")
        assert holder.poll() is None
    wait_for(
        lambda: provider.ledger is not None and provider.ledger.lease(lease_id).state == "released",
        60,
        "the reverted lease released once the store is let go",
    )
    owner(requester, "/dms/node/deployment/shutdown", {"id": dep})
    wait_state(requester, dep, TERMINAL, 60)


def test_a_mining_session_asked_while_the_store_refuses_is_refused_not_left_unanswered(
    net: LocalCluster,
) -> None:
    """``/dms/node/mining/new`` plans the job off the node's thread, then saves the
    session's row on it before answering. A store that refused that save (a read-only
    file, a full disk) raised the driver's error there, which nothing turned into an
    answer: the owner's command waited out its whole timeout (``dms mine``: its
    ``--timeout``) and learned nothing. It is refused now, with the store's reason."""
    requester = net.add()
    owner(requester, "/dms/node/deployment/list")  # started: its mailbox is served
    data = str(Path("examples/iris-features.csv").resolve())
    request = {"settings": {"algorithm": "kmeans", "scheme": "plain", "k": 3}, "data": data}
    with refusing_writes(store(requester)), pytest.raises(RemoteError) as refused:
        owner(requester, "/dms/node/mining/new", request)
    assert refused.value.code == "store_refused", refused.value
    assert "readonly" in refused.value.reason, refused.value


def test_a_mining_session_whose_deployment_the_busy_store_refuses_leaves_no_placing_row(
    net: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/dms/node/mining/new`` saves the session's row (``placing``), then starts the
    session, whose deployment's first save raises when the store is busy: the command is
    refused ``store_refused``, nothing starts, and the row was left ``placing`` for ever.
    It is failed with the reason now, after the answer; a store still refusing that
    write is asked again until it takes it. Scripted: the deployment's saves are refused
    busy, and so is the first write of the failure."""
    from dms.store import StoreBusy

    requester = net.add()
    owner(requester, "/dms/node/deployment/list")  # started: its mailbox is served
    assert requester.node is not None
    orchestration = requester.node.pykka_ref.proxy().requester.get(timeout=5).orchestration()
    deployments = orchestration.store
    save_mining, writes = deployments.save_mining, []

    def busy(*_: Any) -> None:
        raise StoreBusy("the store is busy (scripted)")

    def second_refused(row: Any) -> None:
        writes.append(row.phase)
        if len(writes) == 2:
            busy()
        save_mining(row)

    monkeypatch.setattr(deployments, "save", busy)
    monkeypatch.setattr(deployments, "save_mining", second_refused)
    data = str(Path("examples/iris-features.csv").resolve())
    request = {"settings": {"algorithm": "kmeans", "scheme": "plain", "k": 3}, "data": data}
    with pytest.raises(RemoteError) as refused:
        owner(requester, "/dms/node/mining/new", request)
    assert refused.value.code == "store_refused", refused.value
    assert "busy" in refused.value.reason, refused.value

    def rows() -> list[Any]:
        with store(requester).transaction() as conn:
            return list(conn.execute(text("SELECT id, phase, progress FROM mining_sessions")))

    wait_for(lambda: len(writes) >= 3, 30, "the failure written once the store takes it")
    [row] = rows()
    assert row.phase == "failed", row
    assert writes == ["placing", "failed", "failed"]
    assert "did not start" in row.progress and "busy (scripted)" in row.progress, row


def test_an_allocation_ending_while_another_process_locks_its_store_ends_at_once(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A job ends while another process holds its provider's store locked. The
    allocation's actor released its lease at its end on its own thread, waiting SQLite's
    30 s busy timeout: frozen meanwhile, its end reached the requester only after it
    (not within 20 s), and its polls waited as long. It waits the node's store_wait_s now,
    tells its end at once, and the node releases the lease once the store is let go:
    none leaked, none released twice (the ledger's invariants hold)."""
    requester, (provider,) = network(net, 1)
    dep = deploy(requester, spec(params={"seconds": 6}))
    wait_state(requester, dep, ("running",), 30)
    with (
        caplog.at_level(logging.WARNING, logger="dms"),
        locked_by_another_process(provider.settings.home / "dms.db", 600) as holder,
    ):
        done = wait_state(requester, dep, TERMINAL, 20)
        assert done["state"] == "completed", done["events"]
        wait_for(
            lambda: any(
                "its lease is not released yet (the store is busy" in r.getMessage()
                for r in caplog.records
            ),
            20,
            "the allocation's end to have its release refused, the store busy",
        )
        assert allocated_on_disk(provider) == 1  # held, not lost: released once let go
        assert holder.poll() is None
    wait_for(lambda: live_leases([provider]) == 0, 60, "the lease to be released")
    assert provider.ledger is not None and provider.ledger.pools().violations() == []
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_a_deployment_whose_store_another_process_locks_answers_and_saves_its_end_later(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The owner shuts a running deployment down while another process holds the
    requester's store locked. The deployment's actor saved its end on its own thread,
    waiting SQLite's 30 s busy timeout: the shutdown had no answer within 10 s. It
    waits the node's store_wait_s now: the shutdown is answered, its events say the end
    is not saved yet and why, the provider's lease goes back, and the end is saved once
    the store is let go (a restart would not resume it)."""
    requester, (provider,) = network(net, 1)
    dep = deploy(requester, spec(params={"seconds": 600}))
    wait_state(requester, dep, ("running",), 30)
    with (
        caplog.at_level(logging.WARNING, logger="dms"),
        locked_by_another_process(requester.settings.home / "dms.db", 600) as holder,
    ):
        ended = owner(requester, "/dms/node/deployment/shutdown", {"id": dep})
        assert ended["state"] == "shutdown"
        said = [e["what"] for e in ended["events"] if e["what"].startswith("not saved")]
        assert said and "the store is busy" in said[0], ended["events"]
        wait_for(lambda: live_leases([provider]) == 0, 30, "the provider's lease to go back")
        assert holder.poll() is None
    wait_for(lambda: status(requester, dep)["state"] == "shutdown", 60, "the end to be saved")
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_work_on_the_worker_pool_whose_store_another_process_locks_is_refused_in_its_bound(
    net: LocalCluster,
) -> None:
    """The node's worker pool (slow work off the mailbox: a benchmark, an owner's plan)
    waited SQLite's 30 s busy timeout on a file another process holds locked, then failed
    ``handler_error`` ("database is locked"): the owner's capability benchmark, saved at
    its end, had no answer within 25 s. It waits the node's ``store_wait_s`` at most now,
    as the node's own messages do, and is refused ``store_refused``, the store busy."""
    # The quick benchmark (tests.clitools.BENCHMARK_STEP_S, as in every test but
    # test_onboarding's): at the default 0.4 s a measurement, each of the two below took
    # about 3 s before it reached the store.
    net.settings["benchmark_step_s"] = float(BENCHMARK_STEP_S)
    [node] = net.start(1)
    assert node.node is not None
    with locked_by_another_process(node.settings.home / "dms.db", 600) as holder:
        with pytest.raises(RemoteError) as refused:
            # No capability given: measured on the worker pool, then saved.
            node.node.ask(node.node.handle, "/dms/node/onboarding/capability", {}, timeout=25)
        _busy_refusal(refused.value)
        assert holder.poll() is None
    # Let go: measured and saved.
    served = _served_once_let_go(
        lambda: node.node.ask(node.node.handle, "/dms/node/onboarding/capability", {}, timeout=60)
    )
    assert served["seconds"]


# How each deployment's stored row is spoiled (SQL on its row, as sqlite3 would run it),
# and what its status says about it afterwards.
SPOILED = {
    "slots_not_json": 'UPDATE deployments SET slots = \'[{"slot": "w", \' WHERE id = :id',
    "spec_invalid": "UPDATE deployments SET spec = json_set(spec, '$.strategy', 'no-such') "
    "WHERE id = :id",
    "state_unknown": "UPDATE deployments SET state = 'paused' WHERE id = :id",
    "lease_missing": "UPDATE deployments SET slots = json_set(slots, '$[0].lease_id', "
    "json('null')) WHERE id = :id",
}


def test_a_deployment_whose_stored_row_cannot_be_read_fails_and_the_node_starts(
    net: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A deployment row that cannot be read (a column that is not JSON, a spec that no
    longer validates, an unknown state, a running slot with no lease) raised out of the
    requester's start: the node could not start until someone edited its database. Now
    each such deployment fails saying why (logged once), its leases are reverted, the
    readable one resumes and completes, and listing and status (the CLI too) show the
    unreadable rows."""
    net.serve_api = True
    requester, peers = network(net, 2)
    good = deploy(requester, spec(params={"seconds": 4.0}))
    bad = {how: deploy(requester, spec(params={"seconds": 600.0})) for how in SPOILED}
    for dep in (good, *bad.values()):
        wait_state(requester, dep, ("running",), 30)
    requester.stop()
    path = requester.settings.home / "dms.db"
    with closing(sqlite3.connect(path)) as db, db:
        for how, dep in bad.items():
            assert db.execute(SPOILED[how], {"id": dep}).rowcount == 1
    with caplog.at_level(logging.WARNING, logger="dms"):
        requester = net.restart(requester)
        for p in peers:
            requester.transport.connect(p.addrs()[0])
        done = wait_state(requester, good, TERMINAL, 60)
    assert done["state"] == "completed", done["events"]
    assert any("resumed" in e["what"] for e in done["events"])
    for how, dep in bad.items():
        failed = status(requester, dep)
        assert failed["state"] == "failed", (how, failed)
        said = failed["events"][-1]["what"]
        assert said.startswith("its stored record could not be read: "), (how, said)
        warned = [
            r
            for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith(f"deployment {dep} ")
        ]
        assert len(warned) == 1, (how, [r.getMessage() for r in warned])
    assert "its slots is not JSON" in status(requester, bad["slots_not_json"])["unreadable"]
    assert "strategy" in status(requester, bad["spec_invalid"])["events"][-1]["what"]
    assert "'paused' is unknown" in status(requester, bad["state_unknown"])["events"][-1]["what"]
    lease = status(requester, bad["lease_missing"])
    assert "slot w is running but its lease_id is None" in lease["unreadable"], lease
    # What the bad rows held is given back (their 600 s allocations stop).
    wait_for(lambda: live_leases(peers) == 0, 60, "no lease left on any provider")
    listed = {r["id"]: r for r in owner(requester, "/dms/node/deployment/list")}
    assert listed[good]["unreadable"] is None and listed[good]["state"] == "completed"
    assert "not JSON" in listed[bad["slots_not_json"]]["unreadable"]
    assert {listed[d]["state"] for d in bad.values()} == {"failed"}


def test_a_daemon_starts_over_an_unreadable_deployment_and_the_cli_shows_why(
    tmp_path: Path,
) -> None:
    """``dms run`` over a store holding a running deployment whose slots are not JSON:
    it could not start at all. It starts, and ``dms deployment list`` and ``status``
    show the deployment failed, unreadable, and why."""
    home = tmp_path / "home"
    init_home_quick(home)
    with closing(open_database(f"sqlite:///{home / 'dms.db'}")) as db:
        DeploymentStore(db).save(
            {
                "id": "d-spoiled", "name": "spoiled", "state": "running",
                "spec": spec(params={"seconds": 600.0}), "slots": [], "events": [],
                "created_at": time.time(), "running_at": None, "ended_at": None,
            }
        )  # fmt: skip
    with closing(sqlite3.connect(home / "dms.db")) as conn, conn:
        conn.execute("UPDATE deployments SET slots = '[{' WHERE id = 'd-spoiled'")
    daemon = Daemon(home)
    try:
        (code, listed, err), (code2, shown, err2) = dms_many(
            home, [["deployment", "list"], ["deployment", "status", "d-spoiled"]]
        )
    finally:
        assert daemon.stop() == 0, daemon.stderr()
    assert code == 0 and "d-spoiled" in listed and "failed (unreadable)" in listed, (listed, err)
    assert code2 == 0 and "could not be read" in shown and "not JSON" in shown, (shown, err2)
    assert "deployment d-spoiled cannot resume" in daemon.stderr()
