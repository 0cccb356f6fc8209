"""Item 5 of issue 17 (the replay cache): bounded, and the bound cannot be used to replay.

Before, the cache kept every envelope until its expiry (up to an hour): a peer
sending fresh envelopes grew it without limit. A plain size limit would be
worse: a peer fills it, the victim forgets an envelope, and the envelope is
accepted a second time. Now the full cache forgets the envelope issued first
and refuses anything issued at or before it (``replay_window``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dms.actor import ErrorCode, Refusal
from dms.actor.replay import ReplayCache
from dms.node.client import root_handle
from dms.node.daemon import Node
from dms.security import Identity
from dms.sim.cluster import LocalCluster
from tests.adversarial.hostile import envelope, frame_of, refusal_code, send
from tests.conftest import wait_for

CAPACITY = 1000
BATCH = 32  # half the victim's max_inflight_per_peer (64)
# The envelopes outlive the test however slow the machine: the cache drops an expired
# entry as it goes (and an expired first envelope is refused as expired), so with 20 s
# a fill that took longer never brought the cache to its bound.
TTL_S = 600.0
S = 10**9


def waiting_at(victim: Node) -> float:
    """Requests of one peer the victim holds, admitted and not yet handled (the most of
    any peer: the attacker is the only one sending it any)."""
    assert victim.system is not None
    return next(u.used for u in victim.system.admission.usage() if u.name == "inflight_per_peer")


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Node, Node]]:
    for var in ("DMS_HOME", "DMS_DB_URL", "DMS_API_PORT", "DMS_BOOTSTRAP", "DMS_LISTEN"):
        monkeypatch.delenv(var, raising=False)
    with LocalCluster(tmp_path / "cluster", replay_cache_size=CAPACITY) as cluster:
        victim, attacker = cluster.start(2)
        cluster.wait_linked()
        yield attacker, victim


def test_a_flood_of_fresh_envelopes_cannot_make_the_victim_accept_a_replay(
    pair: tuple[Node, Node],
) -> None:
    attacker, victim = pair
    assert attacker.node is not None and victim.system is not None
    first = envelope(attacker, "/public/hello", to=victim, expect_reply=True, ttl_s=TTL_S)
    frame = frame_of(attacker, first)
    assert attacker.system is not None
    assert attacker.system.invoke_frame(frame, first, 20).result(25)["peer_id"] == victim.peer_id

    # Fill the victim's cache with fresh, correctly signed envelopes, in
    # batches under the per-peer in-flight cap: a burst past it is refused
    # (rate_limited) before the cache sees it, so on a slow machine a single
    # burst need not fill the cache at all. A batch goes once the victim has
    # handled all but a batch of those before: the cache sees an envelope as it
    # arrives, and one that arrived is held until handled (a victim taking 10 ms a
    # request had three batches held, a third of each refused).
    replay = victim.system.replay
    deadline = time.monotonic() + 120
    while replay.floor < first.issued_at:
        if time.monotonic() > deadline:
            pytest.fail("timed out after 120 s waiting for the cache to forget the first envelope")
        wait_for(lambda: waiting_at(victim) <= BATCH, 60, "the victim to handle a batch")
        held = len(replay)
        for _ in range(BATCH):
            fresh = envelope(attacker, "/public/hello", to=victim, ttl_s=TTL_S)
            send(attacker, victim, frame_of(attacker, fresh))
        settle = time.monotonic() + 5
        while len(replay) < min(held + BATCH, CAPACITY) and time.monotonic() < settle:
            time.sleep(0.02)
    assert len(victim.system.replay) <= CAPACITY

    # The forgotten envelope is refused, not run twice; a fresh one is still welcome.
    assert refusal_code(attacker, frame, first) == ErrorCode.REPLAY_WINDOW
    hello = attacker.node.ask(root_handle(victim.peer_id), "/public/hello", timeout=10)
    assert hello["peer_id"] == victim.peer_id


def codes(cache: ReplayCache, *entries: tuple[bytes, int, int], now: int) -> list[str]:
    out = []
    for nonce, issued, expiry in entries:
        try:
            cache.check(KEY, nonce, issued, expiry, now)
            out.append("ok")
        except Refusal as refusal:
            out.append(refusal.code)
    return out


KEY = Identity.generate().public_key


def test_the_full_cache_forgets_the_oldest_and_refuses_what_it_forgot() -> None:
    cache = ReplayCache(capacity=3)
    now = 1000 * S
    a, b, c, d = (bytes([i]) * 16 for i in range(4))
    assert codes(cache, (a, now - 4 * S, now + 60 * S), now=now) == ["ok"]
    assert codes(cache, (b, now - 3 * S, now + 60 * S), (c, now - 2 * S, now + 60 * S), now=now)
    assert codes(cache, (d, now - 1 * S, now + 60 * S), now=now) == ["ok"]  # forgets a
    assert len(cache) == 3 and cache.floor == now - 4 * S
    assert codes(cache, (a, now - 4 * S, now + 60 * S), now=now) == [ErrorCode.REPLAY_WINDOW]
    assert codes(cache, (b, now - 3 * S, now + 60 * S), now=now) == [ErrorCode.REPLAYED]
    # Older than everything it holds: refused rather than remembered at a newer one's cost.
    older = bytes([9]) * 16
    assert codes(cache, (older, now - 7 * S // 2, now + 60 * S), now=now) == [
        ErrorCode.REPLAY_WINDOW
    ]


def test_expired_entries_make_room_without_raising_the_floor() -> None:
    cache = ReplayCache(capacity=2)
    now = 1000 * S
    a, b, c = (bytes([i]) * 16 for i in range(3))
    assert codes(cache, (a, now, now + 1 * S), (b, now + 1, now + 2 * S), now=now) == ["ok", "ok"]
    later = now + 3 * S
    assert codes(cache, (c, later, later + S), now=later) == ["ok"]
    assert cache.floor == 0 and len(cache) == 1
