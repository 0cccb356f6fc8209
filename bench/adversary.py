"""A hostile peer attacks one node while an honest peer keeps using it (issue 17).

- victim: a real ``dms run`` in a process of its own (its own home), onboarded
  as a provider (1 core, 1 GiB, 1 GiB), so its memory is its own:
  ``victim_rss_growth_mb`` is its RSS after the attack (once it has worked
  through everything sent) minus its RSS just before;
  ``victim_rss_peak_growth_mb`` is the highest RSS seen during the attack minus
  the same baseline. ``victim_alive``: the process still runs and answers.
  Its preferences are ``VICTIM_PREFERENCES`` (each placement line says them).
- honest: a dms node in this process (its own trio thread). For the first two
  attacks it invokes ``/public/hello`` on the victim's root actor, one signed
  invoke after another (``honest_invokes``); for the placement attacks it places
  one deployment after another on the victim (a ``compute`` allocation of 100m
  and 16 MiB that returns at once, ``include_peers`` the victim, 10 s deadline),
  each from ``/dms/node/deployment/new`` to running (``honest_placements``).
  ``baseline_p50_ms``: with no attack, just before it, same run;
  ``honest_p50_ms`` and ``honest_success_rate`` (placed, or answered): while the
  attack runs. The honest placements count in the victim's RSS too (an ended
  allocation lingers to answer late polls).
- hostile: ``dms.sim.adversary.BarePeer``, the bare py-libp2p host of the
  adversarial tests (TCP + Noise + Yamux, its own trio thread and Ed25519 key):
  it writes u32-prefixed frames on ``/dms/actor/1.0.0``, as
  ``dms/network/host.py`` frames them, and reads the victim's replies; for the
  gossip attacks it also runs gossipsub under StrictSign. Its envelopes are
  built with our envelope code (or by hand where they must be malformed) and
  signed by its own key, so they pass the peer binding: the victim cannot tell
  them from a real node's. Every frame is built before the attack starts, so
  building them costs the honest peer nothing. Each placement attack has a
  hostile peer of its own (a fresh key, so fresh budgets).

Attacks:

- ``decode_bomb``: frames built to blow up when decoded (nested empty maps: one
  byte becomes ~70): signed 16 MiB ones for a control behaviour (refused by their
  size class, undecoded), signed ones just under the 1 MiB control limit
  (decoded within the item budget, refused as malformed) and unsigned ones
  (refused by their signature, undecoded), interleaved, ``--bombs`` of each.
- ``replay_cache_fill``: ``--fill`` (100,000) unique, correctly signed envelopes
  as fast as the victim takes them, then the first thousand again (replays).
  The victim takes ``max_frames_per_s`` a second from one peer (``frame_burst``
  at once) and refuses the rest undecoded (``rate_limited``);
  ``--frames-per-s`` sets it (a huge value: no limit, every envelope verified).
- ``bid_request_flood``: ``--flood`` (20,000) bid requests on the stream as fast
  as the hostile can write them, each asking for a reply, and ``--flood-gossip``
  (5,000) on the deployment topic (bids to the hostile's own root) at the same
  time; each asks for ``--flood-slots`` (4) slots the victim can take, so every
  one the victim admits leases what it can.
- ``commit_never_allocate``: for ``--grab-s`` (40 s, more than the victim's
  ``allocate_within_s``) the hostile asks for ``--grab-slots`` (16) slots, commits
  every offer and never allocates, five times a second, to take back whatever
  the commit deadline releases.
- ``topic_reflection``: ``--reflections`` (1,000) of each, interleaved, on the
  topics every node subscribes to: ``/broadcast/hello`` asking for a reply, a
  unicast behaviour (``/public/status``) as a broadcast, and bid requests on the
  deployment topic whose ``reply_to`` is a third party's actor (a bare host
  connected to the victim). ``reflected_to_third_party``: the bids the victim
  sent it.

Besides the figures above, each line says whether the victim worked through
everything (``victim_caught_up``: the reply to one last invoke on the same
stream came back, or a broadcast sent after the attack was heard) and how it
answered: ``refusals`` (decode bomb), ``first_sends`` / ``replays`` (replay-cache
fill; the first thousand envelopes ask for a reply, so their replays are
answered with the refusal's code), ``unicast_answers`` (flood: over the rate a
request is answered a few times a second), ``hostile_*`` (what the hostile got),
``released_by_deadline`` (committed leases the victim released unallocated).
Placement lines add ``victim_refusals`` (the victim's ``GET /metrics`` refusals
during the attack, ``layer:code``) and ``victim_cpu`` / ``bench_process_cpu``
(shares of one core while the attack ran; this process holds the honest node
and the hostile peers). Between attacks the hostile gives back what it holds.

Prints one JSON line per attack with --json (``--only NAME`` runs some); exits 1
if a target is missed (victim alive, RSS growth <= 50 MB, honest success >=
0.95, p50 <= 2 x baseline).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import psutil

from dms.actor import Handle
from dms.config import Settings
from dms.jobs.spec import DeploymentSpec
from dms.node.api import TOKEN_HEADER, api_file, token_file
from dms.node.client import root_handle
from dms.node.node import BROADCAST_TOPIC
from dms.orchestrator.messages import BID, COMMIT, DEPLOYMENT_TOPIC, REQUEST, REVERT, BidRequest
from dms.orchestrator.store import DeploymentStore
from dms.sim.adversary import BarePeer
from dms.sim.cluster import LocalCluster

MIB = 1024 * 1024
PASSPHRASE = "adversary bench"
ATTACKS = [
    "decode_bomb",
    "replay_cache_fill",
    "bid_request_flood",
    "commit_never_allocate",
    "topic_reflection",
]
# The victim is a provider: what it contributes, and every slot asked of it (the
# honest requester's and the hostile's alike).
VICTIM_ONBOARD = {"cpu": "1", "ram": "1", "disk": "1"}
SLOT_RESOURCES = {"cpu": "100m", "ram": "16MiB"}
VICTIM_PREFERENCES: dict[str, Any] = {"max_peer_share": 0.5}  # --victim-share changes it
TERMINAL = ("completed", "failed", "shutdown")
DEPLOYMENT_NEW = "/dms/node/deployment/new"
HONEST_DEADLINE_S = 10.0
PLACE_POLL_S = 0.01
GRAB_EVERY_S = 0.2  # commit-never-allocate: how often the hostile asks again
GOSSIP_PACE_S = 0.001  # unpaced, py-libp2p's own queue drops most of a burst


# ---- the victim: a real daemon in its own process ----------------------------------


class Victim:
    def __init__(self, root: Path, settings: dict[str, str] | None = None) -> None:
        self.home = root / "victim"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
        env.update(DMS_HOME=str(self.home), DMS_PASSPHRASE=PASSPHRASE, DMS_LOG_LEVEL="ERROR")
        env.update(settings or {})
        dms = [sys.executable, "-m", "dms"]
        subprocess.run([*dms, "init"], env=env, check=True, capture_output=True)
        # A provider, so that placement can be attacked (and measured) too.
        onboard = [f"--{kind}={amount}" for kind, amount in VICTIM_ONBOARD.items()]
        subprocess.run([*dms, "onboard", *onboard], env=env, check=True, capture_output=True)
        self.log = open(root / "victim.log", "w")  # noqa: SIM115 (open for the run)
        self.proc = subprocess.Popen(
            [*dms, "run", "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the victim did not start: see {root / 'victim.log'}")
        self.info = json.loads(line)
        self.peer_id: str = self.info["peer_id"]
        self.addr: str = self.info["addrs"][0]
        self.process = psutil.Process(self.proc.pid)

    def rss_mb(self) -> float:
        return self.process.memory_info().rss / MIB

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        """The victim's ``GET /metrics`` (its local API), as ``{series: value}``."""
        api = json.loads(api_file(self.home).read_text())
        conn = http.client.HTTPConnection("127.0.0.1", api["port"], timeout=10)
        try:
            token = token_file(self.home).read_text().strip()
            conn.request("GET", "/metrics", headers={TOKEN_HEADER: token})
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        series: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                series[name] = float(value)
        return series

    def refusals(self) -> Counter[str]:
        """Refusals so far, by ``layer:code`` (transport and actor system)."""
        counts: Counter[str] = Counter()
        for name, value in self.metrics().items():
            if name.startswith("dms_refusals_total{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', name))
                counts[f"{labels['layer']}:{labels['code']}"] += int(value)
        return counts

    def held(self) -> int:
        """Leases and allocations that hold the victim's resources now."""
        m = self.metrics()
        return int(
            m.get('dms_leases{state="locked"}', 0) + m.get('dms_leases{state="allocated"}', 0)
        )

    def events(self, kind: str) -> int:
        """How many events of ``kind`` the victim's store holds (read-only, beside it)."""
        db = sqlite3.connect(f"file:{self.home / 'dms.db'}?mode=ro", uri=True, timeout=10)
        try:
            return int(
                db.execute("SELECT count(*) FROM events WHERE kind = ?", (kind,)).fetchone()[0]
            )
        finally:
            db.close()

    def wait_released(self, timeout: float) -> bool:
        """Until nothing holds the victim's resources (leases expire, deadlines pass)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.held() == 0:
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ---- the honest peer and the measurement -----------------------------------------


class Honest:
    """A dms node in this process, with the victim in its peers table."""

    def __init__(self, cluster: LocalCluster, victim: Victim) -> None:
        (self.node,) = [cluster.add("honest", bootstrap=[victim.addr])]
        assert self.node.node is not None and self.node.db is not None
        self.ref = self.node.node
        self.victim = victim.peer_id
        self.target = root_handle(victim.peer_id)
        self.store = DeploymentStore(self.node.db)

    def invoke(self) -> float | None:
        """One signed invoke; its round trip in seconds, or None if it failed."""
        start = time.perf_counter()
        try:
            self.ref.ask(self.target, "/public/hello", timeout=10)
        except Exception:
            return None
        return time.perf_counter() - start

    def samples(self, n: int) -> list[float]:
        return [t for t in (self.invoke() for _ in range(n)) if t is not None]

    def knows_victim(self, timeout: float) -> bool:
        """Until a heartbeat of the victim showed its resources (placement asks only then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.node.peer_table.get(self.victim)
            if record is not None and record.heartbeat and record.heartbeat.onboarded.get("cpu"):
                return True
            time.sleep(0.1)
        return False

    def place(self) -> float | None:
        """One deployment on the victim (``/dms/node/deployment/new``): request to
        running in seconds, or None if it never ran within its deadline. Waits for it
        to end, so each placement finds the victim as the last one left it."""
        started = time.time()
        try:
            dep = self.ref.ask(self.ref.handle, DEPLOYMENT_NEW, {"spec": self.job()}, timeout=10)
        except Exception:
            return None
        deadline = time.monotonic() + HONEST_DEADLINE_S + 10
        row: dict[str, Any] = {}
        while time.monotonic() < deadline:
            row = self.store.get(dep["id"]) or {}
            if row.get("state") in TERMINAL:
                break
            time.sleep(PLACE_POLL_S)
        running_at = row.get("running_at")
        return running_at - started if running_at else None

    def job(self) -> dict[str, Any]:
        return DeploymentSpec.model_validate(
            {
                "name": "honest",
                "deadline_s": HONEST_DEADLINE_S,
                "allocations": [
                    {
                        "name": "w",
                        "executor": "compute",
                        "resources": SLOT_RESOURCES,
                        "params": {"seconds": 0},
                        "constraints": {"include_peers": [self.victim]},
                    }
                ],
            }
        ).model_dump(mode="json")


def p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3) if samples else float("nan")


def run_attack(
    name: str,
    victim: Victim,
    honest: Honest,
    attack: Any,
    *,
    baseline_n: int,
    settle_s: float,
    placements: bool = False,
) -> dict[str, Any]:
    """Baseline, then the attack in a thread while the honest peer keeps invoking (or,
    with ``placements``, placing one deployment after another on the victim)."""
    probe = honest.place if placements else honest.invoke
    baseline = [t for t in (probe() for _ in range(baseline_n)) if t is not None]
    refusals_before = victim.refusals()
    rss_before = victim.rss_mb()
    peak = [rss_before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if victim.alive():
                peak[0] = max(peak[0], victim.rss_mb())
            time.sleep(0.05)

    extra: dict[str, Any] = {}

    def attacker() -> None:
        try:
            extra.update(attack() or {})
        finally:
            done.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cpu_before = victim.process.cpu_times(), psutil.Process().cpu_times()
    started = time.perf_counter()
    threading.Thread(target=attacker, daemon=True).start()
    during: list[float | None] = []
    while not done.is_set():
        during.append(probe())
    attack_s = time.perf_counter() - started
    cpu_after = victim.process.cpu_times(), psutil.Process().cpu_times()
    # Shares of one core while the attack ran: the victim's, and this process's (the
    # honest node, and the hostile peer building nothing but sending).
    cpu = [
        round((a.user + a.system - b.user - b.system) / attack_s, 2)
        for a, b in zip(cpu_after, cpu_before, strict=True)
    ]
    time.sleep(settle_s)
    watcher.join(1)
    alive = victim.alive() and honest.invoke() is not None
    ok = [t for t in during if t is not None]
    cleanup = extra.pop("_cleanup", None)
    result = {
        "attack": name,
        "victim_rss_growth_mb": round(victim.rss_mb() - rss_before, 1) if alive else None,
        "victim_alive": alive,
        "honest_success_rate": round(len(ok) / len(during), 4) if during else None,
        "honest_p50_ms": p50_ms(ok),
        "baseline_p50_ms": p50_ms(baseline),
        "victim_rss_peak_growth_mb": round(peak[0] - rss_before, 1),
        "honest_placements" if placements else "honest_invokes": len(during),
        "attack_s": round(attack_s, 2),
        **extra,
    }
    if placements:  # the lines of the first attacks keep their keys
        after = victim.refusals() if alive else Counter()
        result["victim_refusals"] = dict(sorted((after - refusals_before).items()))
        result["victim_cpu"], result["bench_process_cpu"] = cpu
    if cleanup is not None:  # after the figures: what the hostile holds goes back
        cleanup()
    return result


# ---- the attacks -------------------------------------------------------------------


def bomb_payload(max_bytes: int) -> bytes:
    """Nested empty maps within ``max_bytes``: each byte decodes to ~70 bytes."""
    return msgpack.packb([[{}] * 1000] * (max_bytes // 1003 - 1))


def decode_bomb(hostile: BarePeer, victim: Victim, bombs: int, pace_s: float) -> Any:
    to = root_handle(victim.peer_id)
    big = bomb_payload(16 * MIB - 64 * 1024)  # under the 16 MiB frame limit
    control = bomb_payload(MIB - 8 * 1024)  # under the 1 MiB control limit
    frames, nonces = [], []
    for _ in range(bombs):
        for payload, signed in ((big, True), (control, True), (control, False)):
            env = hostile.envelope(to, "/public/hello", reply=True)
            frames.append(hostile.with_payload_bytes(env, payload, signed=signed))
            nonces.append(env.nonce)

    def attack() -> dict[str, Any]:
        hostile.write(frames, pace_s)
        finished = hostile.finish(to)
        return {"victim_caught_up": finished, "refusals": hostile.refusal_codes(nonces)}

    return attack


def replay_cache_fill(hostile: BarePeer, victim: Victim, count: int, refill_s: float) -> Any:
    to = root_handle(victim.peer_id)
    replayed = min(1000, count)
    # The first ones ask for replies, so their replays are answered with the refusal.
    envelopes = [
        hostile.envelope(to, "/public/hello", {"n": i}, reply=i < replayed) for i in range(count)
    ]
    frames = [hostile.seal(env) for env in envelopes]

    def attack() -> dict[str, Any]:
        hostile.write(frames)
        finished = hostile.finish(to)
        firsts = hostile.refusal_codes([env.nonce for env in envelopes[:replayed]])
        hostile.forget([env.nonce for env in envelopes[:replayed]])  # for the replays' replies
        time.sleep(refill_s)  # the victim's budget for this peer refills: every replay is read
        hostile.write(frames[:replayed])
        finished = hostile.finish(to) and finished
        return {
            "victim_caught_up": finished,
            "first_sends": firsts,
            "replays": hostile.refusal_codes([env.nonce for env in envelopes[:replayed]]),
        }

    return attack


def bid_request(deployment: str, slots: int, reply_to: Handle | None = None) -> dict[str, Any]:
    """A bid request for ``slots`` small compute slots, each of which the victim can take."""
    slot = {"executor": "compute", "params": {"seconds": 1}, "resources": SLOT_RESOURCES}
    return BidRequest.model_validate(
        {
            "deployment_id": deployment,
            "lease_s": 600,  # the victim holds a lease max_lease_s at most
            "slots": [{"slot": f"w.{i}", **slot} for i in range(slots)],
            "reply_to": reply_to,
        }
    ).model_dump()


def offered(answer: Any) -> list[str]:
    """The lease ids of the bid in a reply (none for a refusal or no reply)."""
    if not isinstance(answer, dict) or not answer.get("ok"):
        return []
    return [o["lease_id"] for o in (answer.get("result") or {}).get("offers", [])]


def give_back(hostile: BarePeer, to: Handle, reverts: list[dict[str, Any]]) -> None:
    """Housekeeping between attacks, not part of any: the hostile reverts what it holds."""
    for revert in reverts:
        for _ in range(5):  # a refusal (rate_limited) or a lost reply: again
            answer = hostile.ask(to, REVERT, revert)
            if answer is not None and answer.get("ok"):
                break
            time.sleep(1)


def wait_subscribed(peer: BarePeer, victim: Victim, topics: list[str]) -> None:
    deadline = time.monotonic() + 30
    while any(victim.peer_id not in peer.mesh_peers(t) for t in topics):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the victim's subscriptions to {topics} never reached the peer")
        time.sleep(0.1)


def bid_request_flood(victim: Victim, unicast: int, gossip: int, slots: int) -> Any:
    """Bid requests as fast as the hostile can send them: ``unicast`` on its stream
    (each asks for a reply), ``gossip`` on the deployment topic (bids to its own root)."""
    hostile = BarePeer(victim.addr, actor=True, gossip=True)
    wait_subscribed(hostile, victim, [DEPLOYMENT_TOPIC])
    to = root_handle(victim.peer_id)
    direct = [
        hostile.envelope(to, REQUEST, bid_request(f"flood-{i % 4}", slots), reply=True)
        for i in range(unicast)
    ]
    direct_frames = [hostile.seal(env) for env in direct]
    published = [
        hostile.seal(
            hostile.envelope(
                None,
                REQUEST,
                bid_request(f"flood-{i % 4}", slots, reply_to=hostile.me()),
                topic=DEPLOYMENT_TOPIC,
            )
        )
        for i in range(gossip)
    ]
    nonces = [env.nonce for env in direct]

    def attack() -> dict[str, Any]:
        publisher = threading.Thread(
            target=hostile.publish_many,
            args=(DEPLOYMENT_TOPIC, published, GOSSIP_PACE_S),
            daemon=True,
        )
        publisher.start()
        hostile.write(direct_frames)
        publisher.join()
        finished = hostile.finish(to)
        leases = [lease for answer in hostile.answers(nonces) for lease in offered(answer)]
        return {
            "victim_caught_up": finished,
            "unicast_requests": unicast,
            "gossip_requests": gossip,
            "unicast_answers": hostile.refusal_codes(nonces),
            "hostile_leases": len(leases),
            "hostile_bids_by_gossip": hostile.received[BID],
            "_cleanup": lambda: (
                give_back(
                    hostile,
                    to,
                    [{"deployment_id": f"flood-{i}", "everything": True} for i in range(4)],
                ),
                hostile.close(),
            ),
        }

    return attack


def commit_never_allocate(victim: Victim, duration_s: float, slots: int) -> Any:
    """For ``duration_s``: ask for bids, commit every offer, never allocate; again and
    again, to take back whatever the commit deadline releases."""
    hostile = BarePeer(victim.addr, actor=True)
    to = root_handle(victim.peer_id)

    def attack() -> dict[str, Any]:
        answers: Counter[str] = Counter()
        declines: Counter[str] = Counter()
        committed: list[str] = []
        deadlines_before = victim.events("allocation.never_started")
        end = time.monotonic() + duration_s
        round_ = 0
        while time.monotonic() < end:
            round_ += 1
            answer = hostile.ask(to, REQUEST, bid_request(f"grab-{round_}", slots))
            answers["bid" if answer and answer.get("ok") else code_of(answer)] += 1
            if answer and answer.get("ok"):
                for decline in answer["result"]["declines"]:
                    declines[re.sub(r"\d+(\.\d+)?", "N", decline["reason"])[:120]] += 1
            commits = [
                hostile.envelope(
                    to,
                    COMMIT,
                    {"deployment_id": f"grab-{round_}", "slot": "w.0", "lease_id": lease},
                    reply=True,
                )
                for lease in offered(answer)
            ]
            hostile.write([hostile.seal(env) for env in commits])
            for env in commits:
                reply = hostile.reply(env.nonce, 10)
                answers["commit" if reply and reply.get("ok") else f"commit {code_of(reply)}"] += 1
                if reply and reply.get("ok"):
                    committed.append(reply["result"]["id"])
            time.sleep(GRAB_EVERY_S)
        return {
            "hostile_answers": dict(answers),
            "hostile_declines": dict(declines.most_common(3)),
            "hostile_commits": len(committed),
            "released_by_deadline": victim.events("allocation.never_started") - deadlines_before,
            "_cleanup": lambda: (
                give_back(
                    hostile,
                    to,
                    [
                        {"deployment_id": "grab", "lease_ids": committed[i : i + 256]}
                        for i in range(0, len(committed), 256)
                    ],
                ),
                hostile.close(),
            ),
        }

    return attack


def code_of(answer: Any) -> str:
    if answer is None:
        return "no_reply"
    return "ok" if answer.get("ok") else str(answer.get("code"))


def topic_reflection(victim: Victim, count: int) -> Any:
    """Broadcasts that try to make the victim answer, or send to a third party:
    ``/broadcast/hello`` asking for a reply (``broadcast_reply``), a unicast behaviour
    on a topic (``not_for_topic``), and bid requests on the deployment topic whose
    ``reply_to`` is a third party's actor (the victim would lease and send it bids).
    ``count`` of each, interleaved. The third party is a bare host connected to the
    victim: ``reflected_to_third_party`` counts the bids the victim sent it."""
    hostile = BarePeer(victim.addr, actor=True, gossip=True)
    third = BarePeer(victim.addr, actor=True)
    wait_subscribed(hostile, victim, [BROADCAST_TOPIC, DEPLOYMENT_TOPIC])
    to = root_handle(victim.peer_id)
    frames: list[tuple[str, bytes]] = []
    for i in range(count):
        answer_me = hostile.envelope(
            None, "/broadcast/hello", {"message": "answer"}, reply=True, topic=BROADCAST_TOPIC
        )
        unicast_behaviour = hostile.envelope(None, "/public/status", topic=BROADCAST_TOPIC)
        to_third = hostile.envelope(
            None, REQUEST, bid_request(f"reflect-{i}", 1, third.me()), topic=DEPLOYMENT_TOPIC
        )
        frames += [
            (BROADCAST_TOPIC, hostile.seal(answer_me)),
            (BROADCAST_TOPIC, hostile.seal(unicast_behaviour)),
            (DEPLOYMENT_TOPIC, hostile.seal(to_third)),
        ]

    def attack() -> dict[str, Any]:
        for topic, frame in frames:
            hostile.publish(topic, frame)
        # The victim has handled them all once a hello published after them is heard
        # (sent again each second: the victim drops what is over the hostile's budget).
        marker = f"done {time.time()}"
        deadline = time.monotonic() + 120
        caught_up = False
        sent = 0.0
        while not caught_up and time.monotonic() < deadline:
            if time.monotonic() - sent >= 1.0:
                hello = hostile.envelope(
                    None, "/broadcast/hello", {"message": marker}, topic=BROADCAST_TOPIC
                )
                hostile.publish(BROADCAST_TOPIC, hostile.seal(hello))
                sent = time.monotonic()
            answer = hostile.ask(to, "/public/hellos")
            heard = (answer or {}).get("result") or []
            caught_up = any(h.get("message") == marker for h in heard)
            if not caught_up:
                time.sleep(0.2)
        time.sleep(1.0)  # what the victim sends the third party arrives just after
        return {
            "victim_caught_up": caught_up,
            "published": len(frames),
            "reflected_to_third_party": third.received[BID],
            "_cleanup": lambda: (hostile.close(), third.close()),
        }

    return attack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bombs", type=int, default=10, help="decode bombs of each kind")
    parser.add_argument("--pace", type=float, default=0.3, help="seconds between bombs")
    parser.add_argument("--fill", type=int, default=100_000, help="unique envelopes")
    parser.add_argument("--baseline", type=int, default=300, help="honest invokes, no attack")
    parser.add_argument(
        "--baseline-placements", type=int, default=40, help="honest placements, no attack"
    )
    parser.add_argument("--flood", type=int, default=20_000, help="bid requests on the stream")
    parser.add_argument(
        "--flood-gossip", type=int, default=5_000, help="bid requests on the deployment topic"
    )
    parser.add_argument("--flood-slots", type=int, default=4, help="slots per flooded request")
    parser.add_argument(
        "--grab-s", type=float, default=40.0, help="seconds of commit-never-allocate"
    )
    parser.add_argument("--grab-slots", type=int, default=16, help="slots per grabbing request")
    parser.add_argument(
        "--reflections", type=int, default=1_000, help="reflecting broadcasts of each kind"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before RSS after")
    parser.add_argument(
        "--frames-per-s", type=float, default=None, help="the victim's max_frames_per_s"
    )
    parser.add_argument(
        "--only", action="append", choices=ATTACKS, help="run only this attack (repeatable)"
    )
    parser.add_argument(
        "--victim-share",
        type=float,
        default=VICTIM_PREFERENCES["max_peer_share"],
        help="the victim's max_peer_share (1: the default, no limit)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # The honest node hears the hostile's broadcasts too (the victim forwards what its
    # gossip validator passes) and refuses them: its log would drown the figures.
    logging.getLogger("dms").setLevel(logging.ERROR)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        VICTIM_PREFERENCES["max_peer_share"] = args.victim_share
        settings = {"DMS_PREFERENCES": json.dumps(VICTIM_PREFERENCES)}
        fields = Settings.model_fields
        rate = args.frames_per_s or fields["max_frames_per_s"].default
        burst = fields["frame_burst"].default
        if args.frames_per_s is not None:
            burst = max(1, int(min(args.frames_per_s * 2, 10**9)))
            settings["DMS_MAX_FRAMES_PER_S"] = f"{args.frames_per_s:g}"
            settings["DMS_FRAME_BURST"] = str(burst)
        refill_s = min(burst / rate, 10.0)
        victim = Victim(root, settings)
        try:
            with LocalCluster(root / "cluster", shared_loop=False) as cluster:
                honest = Honest(cluster, victim)
                honest.samples(50)  # warm-up: connection, streams, caches
                if not honest.knows_victim(60):
                    raise RuntimeError("no heartbeat of the victim's resources reached the honest")
                for _ in range(5):
                    honest.place()  # warm-up of placement too
                hostile = BarePeer(victim.addr, actor=True)  # of the first two attacks
                # name -> (builds the attack, with its frames, just before it; placements)
                plans: dict[str, tuple[Callable[[], Any], bool]] = {
                    "decode_bomb": (
                        lambda: decode_bomb(hostile, victim, args.bombs, args.pace),
                        False,
                    ),
                    "replay_cache_fill": (
                        lambda: replay_cache_fill(hostile, victim, args.fill, refill_s),
                        False,
                    ),
                    "bid_request_flood": (
                        lambda: bid_request_flood(
                            victim, args.flood, args.flood_gossip, args.flood_slots
                        ),
                        True,
                    ),
                    "commit_never_allocate": (
                        lambda: commit_never_allocate(victim, args.grab_s, args.grab_slots),
                        True,
                    ),
                    "topic_reflection": (
                        lambda: topic_reflection(victim, args.reflections),
                        True,
                    ),
                }
                try:
                    for name, (build, placements) in plans.items():
                        if args.only and name not in args.only:
                            continue
                        if not victim.wait_released(120):
                            say(f"{name}: leases from before still hold the victim's resources")
                        result = run_attack(
                            name,
                            victim,
                            honest,
                            build(),
                            baseline_n=args.baseline_placements if placements else args.baseline,
                            settle_s=args.settle,
                            placements=placements,
                        )
                        result["victim_max_frames_per_s"] = rate
                        if placements:
                            result["victim_preferences"] = VICTIM_PREFERENCES
                        results.append(result)
                        if args.json:
                            print(json.dumps(result), flush=True)
                        else:
                            for key, value in result.items():
                                print(f"{key:>26}: {value}")
                            print()
                finally:
                    hostile.close()
        finally:
            victim.stop()
    targets_met = all(
        r["victim_alive"]
        and (r["victim_rss_growth_mb"] or 0) <= 50
        and (r["honest_success_rate"] or 0) >= 0.95
        and r["honest_p50_ms"] <= 2 * r["baseline_p50_ms"]
        for r in results
    )
    return 0 if targets_met else 1


def say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
