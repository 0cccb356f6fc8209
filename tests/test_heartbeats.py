"""The peers table: heartbeats on loopback, deadlines, restarts, and the table's rules."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from dms.actor import ROOT_INBOX, Address, ErrorCode, Handle, Limits, Refusal, make_envelope, seal
from dms.network.peertable import (
    ALIVE,
    GONE,
    HEARTBEAT_BEHAVIOUR,
    HEARTBEAT_TOPIC,
    HEARTBEATS_BEHAVIOUR,
    STALE,
    Heartbeat,
    PeerTable,
)
from dms.node.client import root_handle
from dms.node.heartbeat_sync import HeartbeatSync, check_relayed_heartbeat
from dms.resources import Resources
from dms.security import Identity
from dms.sim.cluster import LocalCluster
from tests.conftest import wait_for

INTERVAL = 1.0
# How long a test waits for what heartbeats bring: a few intervals on an idle machine,
# but waits of 2 to 5 s (multiples of the interval) were no longer than a loaded
# machine's pauses. A wait, not a measure: deadline_s is asserted as a value.
WAIT_S = 30.0


def beat(nonce: str = "aaaaaaaa", deadline_s: float = 3.0, seq: int = 0, **kw: object) -> Heartbeat:
    return Heartbeat(nonce=nonce, seq=seq, interval_s=1.0, deadline_s=deadline_s, **kw)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_table_marks_deadlines_restarts_and_leaving() -> None:
    clock = FakeClock()
    table = PeerTable(clock=clock)
    assert table.observe("p1", "did:key:1", beat()) == "joined"
    assert table.observe("p1", "did:key:1", beat()) == "alive"
    clock.now += 2.9
    assert table.sweep() == []
    clock.now += 0.2
    assert table.sweep() == ["p1"] and table.get("p1").status == GONE
    assert table.observe("p1", "did:key:1", beat()) == "returned"
    assert table.observe("p1", "did:key:1", beat(nonce="bbbbbbbb")) == "restarted"
    assert table.get("p1").restarts == 1 and table.get("p1").status == ALIVE
    assert table.observe("p1", "did:key:1", beat(nonce="bbbbbbbb", leaving=True)) == "left"
    assert table.get("p1").status == GONE


def test_an_earlier_beat_of_the_same_process_that_comes_late_changes_nothing() -> None:
    """Gossip keeps no order: a beat published before the mesh formed can come after a
    later one. It put back the figures it carried (onboarding read as none), and it
    revived a peer that had said it was leaving."""
    clock = FakeClock()
    table = PeerTable(clock=clock)
    assert table.observe("p1", "did:key:1", beat(seq=4, onboarded={"cpu": 2.0})) == "joined"
    deadline = table.get("p1").deadline
    clock.now += 1.0
    assert table.observe("p1", "did:key:1", beat(seq=3)) == STALE
    record = table.get("p1")
    assert record.heartbeat.onboarded == {"cpu": 2.0} and record.heartbeat.seq == 4
    assert record.deadline == deadline  # no later deadline out of an earlier beat
    assert table.observe("p1", "did:key:1", beat(seq=5, leaving=True)) == "left"
    assert table.observe("p1", "did:key:1", beat(seq=4)) == STALE
    assert table.get("p1").status == GONE
    # A new process counts from 0 again: its first beat is news, whatever its seq.
    assert table.observe("p1", "did:key:1", beat(nonce="bbbbbbbb", seq=0)) == "restarted"
    assert table.get("p1").status == ALIVE


def test_the_table_says_when_it_next_changes_and_each_deadline_a_heartbeat_sets() -> None:
    clock = FakeClock()
    table = PeerTable(clock=clock)
    told: list[float] = []
    table.on_deadline = told.append
    assert table.next_due(forget_after_s=60) is None
    table.observe("p1", "did:key:p1", beat(deadline_s=3.0))
    table.observe("p2", "did:key:p2", beat(deadline_s=5.0))
    assert told == [103.0, 105.0] and table.next_due(forget_after_s=60) == 103.0
    clock.now = 103.5
    assert table.sweep() == ["p1"]
    # p1 gone: it changes again when it is forgotten, after p2's deadline
    assert table.next_due(forget_after_s=60) == 105.0
    clock.now = 105.5
    assert table.sweep() == ["p2"]
    assert table.next_due(forget_after_s=60) == 163.0


class _Timed:
    """A timer a fake node holds: cancelled or not."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _FakeNode:
    """``call_later`` on a fake clock: due timers run when the clock is moved on."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.queue: list[tuple[float, int, _Timed, Callable[[], None]]] = []
        self.count = 0

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> _Timed:
        timed = _Timed()
        self.count += 1
        self.queue.append((self.clock.now + delay_s, self.count, timed, fn))
        self.queue.sort(key=lambda entry: entry[:2])
        return timed

    def run_until(self, t: float) -> None:
        while self.queue and self.queue[0][0] <= t:
            when, _, timed, fn = self.queue.pop(0)
            self.clock.now = when
            if not timed.cancelled:
                fn()
        self.clock.now = t


def test_heartbeats_with_early_deadlines_cannot_keep_the_table_from_being_swept() -> None:
    """A key whose heartbeats carry a deadline of a millisecond, heard more often than
    every heartbeat_s / 2, moved the timed sweep later with each one (each re-timed it
    from *now*): the table was never swept, and a crashed peer stayed alive for ever
    (its leases never given back). A sweep comes now no later than it was timed, and
    no sooner than heartbeat_s / 2 after the last one."""
    from dms.node.peering import Peering

    clock = FakeClock()
    table = PeerTable(clock=clock, wall=clock)
    node = _FakeNode(clock)
    peering = Peering.__new__(Peering)  # its sweep alone, on the fake clock
    peering.node, peering.peer_table = node, table  # type: ignore[assignment]
    peering.heartbeat_s, peering.peer_forget_s = 2.0, 3600.0
    peering._sweep_lock = threading.Lock()
    peering._sweep_timer, peering._sweep_at, peering._last_sweep = None, None, None
    peering.sweeps, peering._stopped, peering.network, peering.peerbook = 0, False, None, None

    class Kept:
        def keep_heartbeat(self, *args: object) -> None:
            pass

    peering.heartbeats = Kept()  # type: ignore[assignment]
    table.on_deadline = peering._deadline_set
    table.observe("honest", "did:key:honest", beat(nonce="honest00", deadline_s=6.0))
    peering._sweep_when_due()
    crashed_at = clock.now  # the honest peer beats no more: gone at +6 s
    for i in range(60):  # a hostile key beats every 0.9 s, each deadline 1 ms away
        node.run_until(crashed_at + 0.9 * (i + 1))
        table.observe("hostile", "did:key:hostile", beat(nonce="hostile0", deadline_s=0.001))
    node.run_until(clock.now + 0.01)
    record = table.get("honest")
    assert record is not None and record.status == GONE
    # Swept, but never more often than every heartbeat_s / 2 (54 s: at most 55 sweeps).
    assert 0 < peering.sweeps <= 55


def test_the_table_forgets_long_gone_peers_and_they_stretch_no_interval() -> None:
    """Item 5 of issue 17: a gone peer stayed in the table for ever, and counted in the
    heartbeat interval as if it still sent (N / budget)."""
    from types import SimpleNamespace

    from dms.node.peering import Peering

    clock = FakeClock()
    table = PeerTable(clock=clock)
    for i in range(100):
        table.observe(f"gone{i}", "did:key:g", beat())
    table.observe("stays", "did:key:s", beat(deadline_s=10_000.0))
    clock.now += 10.0
    assert len(table.sweep()) == 100
    peering = SimpleNamespace(peer_table=table, heartbeat_s=2.0, heartbeat_budget_per_s=10.0)
    # 100 gone peers and one alive: 2 s, not 101 / 10 = 10.1 s.
    assert Peering.heartbeat_interval(peering) == 2.0  # type: ignore[arg-type]
    assert table.forget_gone(after_s=60.0) == []  # gone for 7 s: kept, shown as gone
    clock.now += 60.0
    assert len(table.forget_gone(after_s=60.0)) == 100
    assert [r.peer_id for r in table.records()] == ["stays"]
    assert table.observe("gone1", "did:key:g", beat()) == "joined"  # a new row


def _tables_complete(nodes: list) -> bool:
    return all(
        {r.peer_id for r in n.peer_table.alive()} == {m.peer_id for m in nodes if m is not n}
        for n in nodes
    )


def test_five_nodes_see_each_other_and_notice_stops_and_restarts(
    cluster: LocalCluster,
) -> None:
    cluster.settings["heartbeat_s"] = INTERVAL
    nodes = cluster.start(5)
    cluster.wait_linked()
    wait_for(lambda: _tables_complete(nodes), WAIT_S, "every node to see the other four")
    record = nodes[0].peer_table.get(nodes[1].peer_id)
    assert record is not None and record.heartbeat is not None
    assert record.heartbeat.deadline_s == 3 * INTERVAL and record.did == nodes[1].identity.did
    # It says where it listens, so a peer that only heard it can dial it.
    assert record.heartbeat.addrs == nodes[1].addrs()

    # A crashed node (no goodbye) is marked gone by its deadline.
    crashed = nodes[4]
    cluster.crash(crashed)
    others = nodes[:4]
    wait_for(
        lambda: all(n.peer_table.get(crashed.peer_id).status == GONE for n in others),
        WAIT_S,
        "the crashed node to be marked gone",
    )

    # A restarted node (same key, new process nonce) is recognized as restarted.
    victim = nodes[3]
    before = nodes[0].peer_table.get(victim.peer_id).nonce
    fresh = cluster.restart(victim)
    fresh.transport.connect(nodes[0].addrs()[0])
    wait_for(
        lambda: (
            (r := nodes[0].peer_table.get(victim.peer_id)) is not None
            and r.nonce != before
            and r.status == ALIVE
        ),
        WAIT_S,
        "the restarted node to be seen with a new nonce",
    )
    assert nodes[0].peer_table.get(victim.peer_id).restarts == 1
    assert "restarted" in nodes[0].peer_table.get(victim.peer_id).history


def test_an_idle_node_sweeps_its_table_at_its_peers_deadlines_not_on_a_period(
    cluster: LocalCluster,
) -> None:
    """The table was swept every heartbeat_s / 2 (twice a heartbeat) to find peers past
    their deadline: an idle node woke for nothing. A sweep is now timed for the next
    deadline, and each heartbeat moves that deadline on. Counted, not timed: while the
    peer beats, the node sweeps fewer times than it hears it; a crashed peer is still
    marked gone."""
    cluster.settings["heartbeat_s"] = INTERVAL
    a, b = cluster.start(2)
    cluster.wait_linked()

    def seq() -> int:
        record = a.peer_table.get(b.peer_id)
        return -1 if record is None or record.heartbeat is None else record.heartbeat.seq

    wait_for(lambda: seq() >= 0, WAIT_S, "the peer's first heartbeat")
    assert a.node is not None
    peering = a.node.pykka_ref.proxy().peering.get(timeout=5)
    heard, swept = seq(), peering.sweeps
    wait_for(lambda: seq() >= heard + 6, WAIT_S, "six more heartbeats of the peer")
    assert peering.sweeps - swept < seq() - heard
    cluster.crash(b)
    wait_for(lambda: a.peer_table.get(b.peer_id).status == GONE, WAIT_S, "the crashed peer gone")


def test_peers_list_shows_status_and_resources_from_heartbeats(cluster: LocalCluster) -> None:
    # A beat every 2 s, so alive for 6 s after the last: the row read below is alive and
    # seen within its deadline through a loaded machine's pause of a few seconds (every
    # second, 3 s, was no longer than some pauses).
    cluster.settings["heartbeat_s"] = 2 * INTERVAL
    a, b = cluster.start(2)
    cluster.wait_linked()
    b.ledger.onboard(Resources(cpu=1, ram=1, disk=1))
    wait_for(
        lambda: (
            (r := a.peer_table.get(b.peer_id)) is not None
            and r.heartbeat is not None
            and r.heartbeat.onboarded.get("cpu") == 1.0
        ),
        WAIT_S,
        "b's onboarding to show in a's table",
    )
    rows = a.node.ask(a.node.handle, "/dms/node/peers/list")
    row = next(r for r in rows if r["peer_id"] == b.peer_id)
    assert row["status"] == ALIVE and row["connected"] is True
    assert row["free"]["cpu"] == 1.0 and row["onboarded"]["ram_gib"] == 1.0
    assert row["last_seen_s"] < 3 * 2 * INTERVAL  # seconds ago, within its deadline


def test_an_earlier_heartbeat_that_gossip_brings_late_keeps_the_later_figures(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider's beat from before its onboarding, come by gossip after the beat that
    carries the onboarding (as one published before the mesh formed can, through a
    peer's gossip window), had its peers read it as onboarding nothing until its next
    beat: a full suite's placement test waited 30 s for it and failed."""
    caplog.set_level(logging.DEBUG, logger="dms.node")
    a = cluster.add("a", heartbeat_s=INTERVAL)
    # Its beats far apart: none but those the test has it send in the test's time.
    b = cluster.add("b", heartbeat_s=10 * WAIT_S)
    cluster.wait_linked()
    peering = b.node.pykka_ref.proxy().peering.get(timeout=5)
    early = peering.heartbeat()  # what it would have said before its onboarding
    assert not early["onboarded"].get("cpu")
    b.ledger.onboard(Resources(cpu=1, ram=1, disk=1))
    said = [0.0]

    def onboarding_heard() -> bool:
        record = a.peer_table.get(b.peer_id)
        if record is not None and record.heartbeat and record.heartbeat.onboarded.get("cpu"):
            return True
        if time.monotonic() - said[0] >= 1.0:  # one said before the mesh formed is lost
            peering.announce()
            said[0] = time.monotonic()
        return False

    wait_for(onboarding_heard, WAIT_S, "b's onboarding to reach a")
    peering.node.publish(HEARTBEAT_TOPIC, HEARTBEAT_BEHAVIOUR, early, ttl_s=WAIT_S)

    def early_one_taken_or_left() -> bool:
        record = a.peer_table.get(b.peer_id)
        taken = record is not None and record.heartbeat is not None
        taken = taken and not record.heartbeat.onboarded.get("cpu")
        left = any(
            "earlier heartbeat" in r.getMessage() and b.peer_id in r.getMessage()
            for r in caplog.records
        )
        return taken or left

    wait_for(early_one_taken_or_left, WAIT_S, "a to hear b's earlier beat")
    record = a.peer_table.get(b.peer_id)
    assert record is not None and record.heartbeat is not None
    assert record.heartbeat.onboarded.get("cpu") == 1.0, record.heartbeat


def test_a_newcomer_learns_the_network_from_one_peer_at_once(cluster: LocalCluster) -> None:
    """With a long heartbeat interval (a large network's), a node that joins must not
    wait for each peer's next heartbeat to see it: one peer relays what it heard."""
    cluster.settings["heartbeat_s"] = (
        300.0  # the most allowed: no peer beats again within this test
    )
    first = cluster.start(3)
    cluster.wait_linked()
    wait_for(lambda: _tables_complete(first), 30, "the first three to know each other")
    # Past gossipsub's message cache (5 of its 1 s heartbeats): gossip can no longer
    # hand the newcomer those heartbeats (IHAVE/IWANT), only a peer's relay can.
    time.sleep(6)

    newcomer = cluster.add(bootstrap=[first[0].addrs()[0]])
    wait_for(
        lambda: {r.peer_id for r in newcomer.peer_table.alive()} == {n.peer_id for n in first},
        30,  # well before the peers beat again (300 s after they started)
        "the newcomer to know every peer from the one it asked",
    )
    record = newcomer.peer_table.get(first[2].peer_id)
    assert record is not None and record.heartbeat is not None
    assert record.did == first[2].identity.did and record.heartbeat.addrs == first[2].addrs()
    # Asking introduced the newcomer to the peer it asked.
    wait_for(lambda: first[0].peer_table.get(newcomer.peer_id) is not None, 30, "the introduction")

    # The answer holds what the asker lacks: everything for an empty hand, nothing
    # for a hand that holds it all.
    assert newcomer.node is not None
    ask = newcomer.node.ask
    answer = ask(root_handle(first[0].peer_id), HEARTBEATS_BEHAVIOUR, {}, timeout=10)
    relayed = [check_relayed_heartbeat(f, Limits()) for f in answer["heartbeats"]]
    assert {r.peer_id for r in relayed} == {n.peer_id for n in first}
    have = {r.peer_id: r.signed.issued_at for r in relayed}
    answer = ask(root_handle(first[0].peer_id), HEARTBEATS_BEHAVIOUR, {"have": have}, timeout=10)
    assert answer == {"heartbeats": []}


def _heartbeat_frame(
    signer: Identity | None = None,
    inbox: str = ROOT_INBOX,
    behaviour: str = HEARTBEAT_BEHAVIOUR,
    payload: dict[str, object] | None = None,
    ttl_s: float = 30.0,
    host: Identity | None = None,
) -> tuple[bytes, Identity]:
    node = host or Identity.generate()
    key = signer or node
    sender = Handle(id=key.public_key, address=Address(host=node.peer_id, inbox=inbox))
    payload = payload or beat(nonce="a" * 16).model_dump()
    env = make_envelope(
        sender, key.public_key, behaviour, payload, topic=HEARTBEAT_TOPIC, ttl_s=ttl_s
    )
    return seal(env, key), node


def test_a_relayed_heartbeat_is_taken_only_as_its_sender_signed_it() -> None:
    frame, node = _heartbeat_frame()
    relayed = check_relayed_heartbeat(frame, Limits())
    assert (relayed.peer_id, relayed.did, relayed.beat.nonce) == (node.peer_id, node.did, "a" * 16)


def test_a_later_beat_passed_on_is_taken_though_an_earlier_one_came_late_by_gossip() -> None:
    """Passed on, a heartbeat was news only if issued after the table's last_seen; a beat
    that gossip brought late (its last_seen the time it came) hid the next one of the same
    process, issued before that but passed on after: dropped as an echo at every sync, its
    figures (the onboarding) unread until the peer's next beat. The same process's own
    count says which is later (f22578e's rule): it is taken."""
    node = Identity.generate()
    later, _ = _heartbeat_frame(payload=beat(seq=4, onboarded={"cpu": 2.0}).model_dump(),
                                host=node)  # fmt: skip
    # The earlier beat comes, by gossip, a second after the later one was issued.
    table = PeerTable(wall=lambda: time.time() + 1.0)
    system = SimpleNamespace(limits=Limits(), peer_id="me", refusals=Counter())
    sync = HeartbeatSync(SimpleNamespace(system=system), table, None)  # type: ignore[arg-type]
    sync.take_heartbeat(node.peer_id, node.did, beat(seq=3), None)
    assert sync._adopt([later], "relay") == 1
    record = table.get(node.peer_id)
    assert record is not None and record.heartbeat is not None
    assert (record.heartbeat.seq, record.heartbeat.onboarded) == (4, {"cpu": 2.0})
    assert sync._adopt([later], "relay") == 0  # an echo of the one held: not news


def _tampered() -> bytes:
    frame = _heartbeat_frame()[0]
    return frame.replace(b"a" * 16, b"b" * 16)  # another nonce, under the same signature


@pytest.mark.parametrize(
    "make, code",
    [
        (_tampered, ErrorCode.BAD_SIGNATURE),
        (lambda: _heartbeat_frame(behaviour="/dms/node/peers/list")[0], ErrorCode.MALFORMED),
        (lambda: _heartbeat_frame(ttl_s=-1)[0], ErrorCode.EXPIRED),
        # An actor of that node, not its root, cannot speak for the node.
        (
            lambda: _heartbeat_frame(signer=Identity.generate(), inbox="worker")[0],
            ErrorCode.WRONG_SIGNER,
        ),
        (lambda: _heartbeat_frame(payload={"nonce": "x"})[0], ErrorCode.BAD_PAYLOAD),
        (lambda: b"not an envelope", ErrorCode.MALFORMED),
    ],
    ids=["tampered", "not-a-heartbeat", "expired", "not-the-root", "bad-payload", "garbage"],
)
def test_a_relayed_heartbeat_that_gossip_would_refuse_is_refused(
    make: Callable[[], bytes], code: str
) -> None:
    with pytest.raises(Refusal) as refused:
        check_relayed_heartbeat(make(), Limits())
    assert refused.value.code == code


def test_announce_never_waits_on_a_heartbeat_held_up_by_the_network(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A heartbeat's publish waits on the network thread, which can itself wait on a
    slow or hostile peer's write (5 s each), and the beat holds the node's heartbeat
    lock meanwhile: onboarding's announce, on the node's own thread, waited on that
    lock for as long as the network did, and every handler of the node with it. The
    publish now waits at most the heartbeat's interval, and announce never waits on a
    beat being sent. Here the network thread is held up until announce returns."""
    node = cluster.add("held", heartbeat_s=INTERVAL)
    assert node.transport is not None and node.node is not None
    peering = node.node.pykka_ref.proxy().peering.get(timeout=5)
    wait_for(lambda: peering._beats > 0, WAIT_S, "a first heartbeat sent")
    release = threading.Event()
    held = node.transport._token  # type: ignore[attr-defined]
    held.run_sync_soon(lambda: release.wait(120))  # the network thread, held up
    announced = threading.Event()
    try:
        wait_for(peering._beat_lock.locked, WAIT_S, "a heartbeat waiting for the network")

        def announce() -> None:
            peering.announce()
            announced.set()

        threading.Thread(target=announce, daemon=True).start()
        wait_for(announced.is_set, WAIT_S, "announce returned while the network is held")
        wait_for(
            lambda: "heartbeat not sent within" in caplog.text,
            WAIT_S,
            "the held-up beat's publish given up on, with the reason",
        )
    finally:
        release.set()
    beats = peering._beats
    wait_for(lambda: peering._beats > beats + 1, WAIT_S, "heartbeats again, the network free")


def test_announce_never_waits_on_the_network_when_no_beat_is_in_progress(
    cluster: LocalCluster,
) -> None:
    """With no beat in progress, announce published the heartbeat itself and waited
    for the network thread up to the heartbeat's interval (about 100 s at 1,000
    peers), on the node's own thread. It now only has the beat go at once, on a
    thread of its own. The interval here is longer than the wait, so no periodic beat
    comes meanwhile and a publish by announce itself would not return in time."""
    node = cluster.add("quiet", heartbeat_s=2 * WAIT_S)
    assert node.transport is not None and node.node is not None
    peering = node.node.pykka_ref.proxy().peering.get(timeout=5)
    wait_for(
        lambda: peering._beats > 0 and peering._sent.is_set() and not peering._beat_lock.locked(),
        WAIT_S,
        "a first heartbeat sent, and no beat in progress",
    )
    beats = peering._beats
    release = threading.Event()
    held = node.transport._token  # type: ignore[attr-defined]
    held.run_sync_soon(lambda: release.wait(120))  # the network thread, held up
    announced = threading.Event()
    try:

        def announce() -> None:
            peering.announce()
            announced.set()

        threading.Thread(target=announce, daemon=True).start()
        wait_for(announced.is_set, WAIT_S, "announce returned while the network is held")
        wait_for(lambda: peering._beats > beats, WAIT_S, "the announced heartbeat built")
    finally:
        release.set()
    wait_for(peering._sent.is_set, WAIT_S, "the announced heartbeat sent, the network free")


def test_the_first_beat_after_the_start_or_an_announce_is_at_a_random_point_of_the_interval(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every node's interval is the same: nodes started or onboarded together (each
    onboarding announces) beat together for as long as they run, and every node then
    heard them all within a second or two (the placement bench's slowest placements,
    specs/orchestration.md, "Seventh pass: the tail"). The beat after the start and
    after an announce comes at a random share of the interval (here its least), the
    ones after it a whole interval apart."""
    from types import SimpleNamespace

    from dms.node import peering as peering_module

    monkeypatch.setattr(peering_module, "random", SimpleNamespace(uniform=lambda lo, hi: lo))
    waits: list[float] = []
    beat_soon = peering_module.Peering._beat_soon

    def timed(self: peering_module.Peering, delay_s: float) -> None:
        waits.append(delay_s)
        beat_soon(self, delay_s)

    monkeypatch.setattr(peering_module.Peering, "_beat_soon", timed)
    node = cluster.add("dephased", heartbeat_s=2.0)
    assert node.node is not None
    peering = node.node.pykka_ref.proxy().peering.get(timeout=5)
    periodic = lambda: [w for w in waits if w > 0]  # noqa: E731
    wait_for(lambda: len(periodic()) >= 2, WAIT_S, "two periodic beats timed")
    interval = peering.heartbeat_interval()
    least = peering_module.DEPHASE_MIN_SHARE * interval
    assert periodic()[:2] == [pytest.approx(least), pytest.approx(interval)]
    timed_before = len(periodic())
    peering.announce()
    wait_for(lambda: len(periodic()) > timed_before, WAIT_S, "the beat after the announce timed")
    assert periodic()[timed_before] == pytest.approx(least)


def _beats_as_the_table_grows(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, name: str, refused: int = 0
) -> tuple[list[float], list[tuple[int, float]], list[int]]:
    """A node (heartbeat_s 0.5, budget 2 a second) into whose table 40 peers come while
    its first beat is sent (the interval grows from 0.5 to 20.5 s); the random share of
    the interval is its most. Beat number ``refused`` (1-based; 0: none) is refused by
    the network once. Returns the intervals the beats built announced, each wait timed
    as (beats built before it, wait), and the beats the network refused."""
    from dms.actor.actor import Actor
    from dms.node import peering as peering_module

    monkeypatch.setattr(peering_module, "random", SimpleNamespace(uniform=lambda lo, hi: hi))
    announced: list[float] = []
    waits: list[tuple[int, float]] = []
    refusals: list[int] = []
    heartbeat = peering_module.Peering.heartbeat
    beat_soon = peering_module.Peering._beat_soon
    publish_heartbeat = peering_module.Peering._publish_heartbeat
    publish = Actor.publish

    def built(self: peering_module.Peering, leaving: bool = False) -> dict:
        beat = heartbeat(self, leaving)
        if not leaving:
            announced.append(beat["interval_s"])
        return beat

    def timed(self: peering_module.Peering, delay_s: float) -> None:
        waits.append((len(announced), delay_s))
        beat_soon(self, delay_s)

    def published(self: peering_module.Peering, leaving: bool = False) -> None:
        publish_heartbeat(self, leaving)
        if len(announced) == 1:  # the peers one heartbeat sync brings, meanwhile
            for i in range(40):
                self.peer_table.observe(f"p{i}", f"did:key:{i}", beat(deadline_s=3600.0))

    def refusing(
        self: Actor, topic: str, behaviour: str, payload: object = None, **kw: object
    ) -> bytes:
        if topic == HEARTBEAT_TOPIC and len(announced) == refused and not refusals:
            refusals.append(refused)
            raise RuntimeError("the network refuses")
        return publish(self, topic, behaviour, payload, **kw)

    monkeypatch.setattr(peering_module.Peering, "heartbeat", built)
    monkeypatch.setattr(peering_module.Peering, "_beat_soon", timed)
    monkeypatch.setattr(peering_module.Peering, "_publish_heartbeat", published)
    monkeypatch.setattr(Actor, "publish", refusing)
    node = cluster.add(name, heartbeat_s=0.5, heartbeat_budget_per_s=2.0)
    assert node.node is not None
    peering = node.node.pykka_ref.proxy().peering.get(timeout=5)
    wait_for(lambda: any(n >= 2 for n, _ in waits), WAIT_S, "two beats sent, a third timed")
    assert announced[0] == pytest.approx(0.5) and peering.heartbeat_interval() > 20.0
    return announced, waits, refusals


def test_the_next_beat_comes_within_the_interval_the_last_one_announced(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peers hold a node gone past its last beat's deadline (DEADLINE_FACTOR times the
    interval that beat announced), and the interval grows with the peers table. A
    newcomer's beat announced a small network's interval, one heartbeat sync then
    filled its table, and the next beat was timed a whole new interval later: past
    the deadline its peers held it gone until that beat (a 40-node cluster in one
    process: 10 peers gone and returned just after the last start). Here 40 peers
    come into the table while a beat is sent, the random share of the interval is its
    most: each wait is at most the interval the beat before it announced."""
    announced, waits, _ = _beats_as_the_table_grows(cluster, monkeypatch, "growing")
    after_a_beat = [(n, wait) for n, wait in waits if n > 0]
    assert after_a_beat and all(wait <= announced[n - 1] for n, wait in after_a_beat), (
        announced,
        waits,
    )


def test_a_beat_not_published_announced_nothing(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interval a beat announces counts once the beat was published: its peers
    never received one the network refused, and still hold this node to the deadline
    of the beat before. The interval grew (0.5 to 20.5 s) at the second beat, whose
    publish was refused ("heartbeat not sent"): the third was timed 20.5 s on, an
    interval no peer received, past the 1.5 s deadline they hold. It comes within the
    0.5 s the first beat announced."""
    announced, waits, refusals = _beats_as_the_table_grows(
        cluster, monkeypatch, "refused", refused=2
    )
    assert refusals == [2] and announced[1] > 20.0
    after_the_refused = [wait for n, wait in waits if n == 2]
    assert after_the_refused and all(w <= announced[0] for w in after_the_refused), (
        announced,
        waits,
    )


class _NoThreads:
    """The park, but a thread for a task of these names cannot be had the first time
    each is asked (``RuntimeError: can't start new thread``: a transient limit)."""

    def __init__(self, park: object, names: set[str]) -> None:
        self.park, self.failing, self.failed = park, set(names), set()

    def run(self, fn: Callable[[], object], name: str) -> None:
        if name in self.failing:
            self.failing.discard(name)
            self.failed.add(name)
            raise RuntimeError("can't start new thread")
        self.park.run(fn, name)  # type: ignore[attr-defined]


def test_a_heartbeat_that_cannot_have_a_thread_once_is_sent_again_later(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic beat is handed to a thread by the timer thread, and its publish to
    another: a thread that could not be had once (a transient limit on threads) ended
    the node's heartbeats for good. The timer's hand-over raised, and nothing timed
    the next beat; the publish's raised with its 'sent' mark unset, and every later
    beat was skipped as one whose last publish still waited for the network. Its
    peers had it gone for as long as it ran."""
    import dms.node.peering as peering_module

    node = cluster.add("flaky", heartbeat_s=INTERVAL)
    assert node.node is not None
    peering = node.node.pykka_ref.proxy().peering.get(timeout=5)
    wait_for(lambda: peering._beats > 0, WAIT_S, "a first heartbeat sent")
    flaky = _NoThreads(peering_module.PARK, {"dms-heartbeat", "dms-heartbeat-publish"})
    monkeypatch.setattr(peering_module, "PARK", flaky)
    wait_for(lambda: len(flaky.failed) == 2, WAIT_S, "both hand-overs refused a thread")
    beats = peering._beats
    wait_for(lambda: peering._beats > beats + 2, WAIT_S, "heartbeats again")
    wait_for(peering._sent.is_set, WAIT_S, "the last one sent")
