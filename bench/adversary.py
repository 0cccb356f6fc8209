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
  attack runs. The honest placements count in the victim's RSS too (the node
  keeps an ended allocation's final answers a while, for late polls).
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
  at once), and ``max_unknown_frames_per_s`` from all peers it has no stake in
  together (``unknown_frame_burst`` at once), and refuses the rest undecoded
  (``rate_limited``); ``--frames-per-s`` sets both (a huge value: no limit,
  every envelope verified).
- ``bid_request_flood``: ``--flood`` (20,000) bid requests on the stream as fast
  as the hostile can write them, each asking for a reply, and ``--flood-gossip``
  (5,000) on the deployment topic at the same time, by a second hostile key in a
  process of its own (bids to its own root; ``publisher_process_cpu``: its share
  of one core while it published); each asks for ``--flood-slots`` (4) slots
  the victim can take, so every one the victim admits leases what it can.
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
and the hostile peers but the gossip publisher of ``bid_request_flood``) and
``honest_failures``: why each honest placement that did not run failed (its
state, then its deployment's events, each at its second since the placement was
asked for: the rounds, what the victim answered, the end's reason). Between
attacks the hostile gives back what it holds.

The attacks of later issues live in modules beside this file,
``bench/adversary_<area>.py``, found at start (``bench/adversary_kit.py`` says
what such a module defines, and holds the victim, the honest peer and the
measurement they all share); they run after the five above, module by module.

Prints one JSON line per attack with --json (``--only NAME`` runs some); exits 1
if a target is missed (victim alive, RSS growth <= 50 MB, database growth <= 20
MB, honest success >= 0.95, p50 <= 2 x baseline, and each attack's own targets:
``adversary_kit.TARGETS``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
from adversary_kit import (
    MIB,
    SLOT_RESOURCES,
    VICTIM_PREFERENCES,
    Context,
    Honest,
    HostileProcess,
    Plan,
    Victim,
    missed_targets,
    run_attack,
    say,
    serve,
)

from dms.actor import Handle
from dms.config import Settings
from dms.node.client import root_handle
from dms.node.node import BROADCAST_TOPIC
from dms.orchestrator.messages import BID, COMMIT, DEPLOYMENT_TOPIC, REQUEST, REVERT, BidRequest
from dms.sim.adversary import BarePeer
from dms.sim.cluster import LocalCluster

ATTACKS = [
    "decode_bomb",
    "replay_cache_fill",
    "bid_request_flood",
    "commit_never_allocate",
    "topic_reflection",
]
GRAB_EVERY_S = 0.2  # commit-never-allocate: how often the hostile asks again
GOSSIP_PACE_S = 0.001  # unpaced, py-libp2p's own queue drops most of a burst


def attack_modules() -> list[ModuleType]:
    """Every ``bench/adversary_<area>.py`` beside this file but the kit, by name."""
    here = Path(__file__).resolve().parent
    names = sorted(p.stem for p in here.glob("adversary_*.py") if p.stem != "adversary_kit")
    return [importlib.import_module(name) for name in names]


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


def wait_subscribed(peer: BarePeer, victim_peer: str, topics: list[str]) -> None:
    deadline = time.monotonic() + 30
    while any(victim_peer not in peer.mesh_peers(t) for t in topics):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the victim's subscriptions to {topics} never reached the peer")
        time.sleep(0.1)


FLOOD_DEPLOYMENTS = [f"flood-{i}" for i in range(4)]


def reverts() -> list[dict[str, Any]]:
    return [{"deployment_id": d, "everything": True} for d in FLOOD_DEPLOYMENTS]


class Publisher(HostileProcess):
    """The gossip half of ``bid_request_flood``: a hostile key of its own, in a
    process of its own (this file run with ``--publisher``), so that its publishing
    does not take the honest node's interpreter lock."""

    def __init__(self, victim: Victim, gossip: int, slots: int) -> None:
        super().__init__([sys.executable, __file__, "--publisher", victim.addr, victim.peer_id,
                          str(gossip), str(slots)])  # fmt: skip
        self.ask({})  # in the victim's mesh, every frame built


def publisher_main(addr: str, victim_peer: str, gossip: int, slots: int) -> None:
    """``--publisher``: the publisher's side of :class:`Publisher` (stdin and stdout)."""
    hostile = BarePeer(addr, actor=True, gossip=True)
    wait_subscribed(hostile, victim_peer, [DEPLOYMENT_TOPIC])
    published = [
        hostile.seal(
            hostile.envelope(
                None,
                REQUEST,
                bid_request(FLOOD_DEPLOYMENTS[i % 4], slots, reply_to=hostile.me()),
                topic=DEPLOYMENT_TOPIC,
            )
        )
        for i in range(gossip)
    ]

    def step(ask: dict[str, Any]) -> dict[str, Any]:
        if "publish" in ask:
            hostile.publish_many(DEPLOYMENT_TOPIC, published, GOSSIP_PACE_S)
            return {"published": len(published)}
        if "bids" in ask:
            return {"bids": hostile.received[BID]}
        if "give_back" in ask:
            give_back(hostile, root_handle(victim_peer), reverts())
            return {"given_back": True}
        return {"frames": len(published)}

    try:
        serve(step)
    finally:
        hostile.close()


def bid_request_flood(victim: Victim, unicast: int, gossip: int, slots: int) -> Any:
    """Bid requests as fast as the hostile can send them: ``unicast`` on its stream
    (each asks for a reply), ``gossip`` on the deployment topic (bids to its own root)
    by a second hostile key in a process of its own (:class:`Publisher`)."""
    hostile = BarePeer(victim.addr, actor=True)
    publisher = Publisher(victim, gossip, slots)
    to = root_handle(victim.peer_id)
    direct = [
        hostile.envelope(to, REQUEST, bid_request(FLOOD_DEPLOYMENTS[i % 4], slots), reply=True)
        for i in range(unicast)
    ]
    direct_frames = [hostile.seal(env) for env in direct]
    nonces = [env.nonce for env in direct]

    def attack() -> dict[str, Any]:
        cpu_before = publisher.cpu_s()
        started = time.perf_counter()
        published = threading.Thread(target=publisher.ask, args=({"publish": True},), daemon=True)
        published.start()
        hostile.write(direct_frames)
        published.join()
        publisher_cpu = (publisher.cpu_s() - cpu_before) / (time.perf_counter() - started)
        finished = hostile.finish(to)
        leases = [lease for answer in hostile.answers(nonces) for lease in offered(answer)]

        def cleanup() -> None:
            give_back(hostile, to, reverts())
            hostile.close()
            publisher.ask({"give_back": True})
            publisher.close()

        return {
            "victim_caught_up": finished,
            "unicast_requests": unicast,
            "gossip_requests": gossip,
            "unicast_answers": hostile.refusal_codes(nonces),
            "hostile_leases": len(leases),
            "hostile_bids_by_gossip": publisher.ask({"bids": True})["bids"],
            "publisher_process_cpu": round(publisher_cpu, 2),
            "_cleanup": cleanup,
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
    wait_subscribed(hostile, victim.peer_id, [BROADCAST_TOPIC, DEPLOYMENT_TOPIC])
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
    modules = attack_modules()
    names = ATTACKS + [name for module in modules for name in module.ATTACKS]
    parser.add_argument(
        "--only", action="append", choices=names, help="run only this attack (repeatable)"
    )
    parser.add_argument(
        "--victim-share",
        type=float,
        default=VICTIM_PREFERENCES["max_peer_share"],
        help="the victim's max_peer_share (1: the default, no limit)",
    )
    parser.add_argument("--json", action="store_true")
    for module in modules:
        module.add_arguments(parser)
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
        shared = fields["max_unknown_frames_per_s"].default
        shared_burst = fields["unknown_frame_burst"].default
        if args.frames_per_s is not None:
            burst = shared_burst = max(1, int(min(args.frames_per_s * 2, 10**9)))
            shared = args.frames_per_s
            for name in ("MAX_FRAMES_PER_S", "MAX_UNKNOWN_FRAMES_PER_S"):
                settings[f"DMS_{name}"] = f"{args.frames_per_s:g}"
            for name in ("FRAME_BURST", "UNKNOWN_FRAME_BURST"):
                settings[f"DMS_{name}"] = str(burst)
        # the hostile's budgets refill (its own, and the one it shares with every key),
        # and a peer found flooding is past its cooldown (specs/security.md, "Flooders")
        refill_s = min(max(burst / rate, shared_burst / shared), 10.0)
        refill_s += fields["flooder_cooldown_s"].default
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
                # name -> what builds the attack (with its frames) just before it
                plans: dict[str, Plan] = {
                    "decode_bomb": Plan(
                        lambda: decode_bomb(hostile, victim, args.bombs, args.pace)
                    ),
                    "replay_cache_fill": Plan(
                        lambda: replay_cache_fill(hostile, victim, args.fill, refill_s)
                    ),
                    "bid_request_flood": Plan(
                        lambda: bid_request_flood(
                            victim, args.flood, args.flood_gossip, args.flood_slots
                        ),
                        placements=True,
                    ),
                    "commit_never_allocate": Plan(
                        lambda: commit_never_allocate(victim, args.grab_s, args.grab_slots),
                        placements=True,
                    ),
                    "topic_reflection": Plan(
                        lambda: topic_reflection(victim, args.reflections), placements=True
                    ),
                }
                ctx = Context(root, victim, honest, cluster, args)
                for module in modules:
                    plans.update(module.plans(ctx))
                try:
                    for name, plan in plans.items():
                        if args.only and name not in args.only:
                            continue
                        if not victim.wait_released(120):
                            say(f"{name}: leases from before still hold the victim's resources")
                        result = run_attack(
                            name,
                            victim,
                            honest,
                            plan.build(),
                            baseline_n=(
                                args.baseline_placements if plan.placements else args.baseline
                            ),
                            settle_s=args.settle,
                            placements=plan.placements,
                            invoke_every_s=plan.invoke_every_s,
                        )
                        result["victim_max_frames_per_s"] = rate
                        result["victim_max_unknown_frames_per_s"] = shared
                        if plan.placements:
                            result["victim_preferences"] = VICTIM_PREFERENCES
                        results.append(result)
                        if args.json:
                            print(json.dumps(result), flush=True)
                        else:
                            for key, value in result.items():
                                print(f"{key:>26}: {value}")
                            print()
                        if not victim.alive():
                            # The attacks after it would measure nothing: say why it ended.
                            say(f"{name}: the victim is gone; the run stops here")
                            print(victim.last_words(), file=sys.stderr, flush=True)
                            break
                finally:
                    hostile.close()
        finally:
            victim.stop()
    missed = {r["attack"]: m for r in results if (m := missed_targets(r))}
    for attack, keys in missed.items():
        say(f"{attack}: missed {', '.join(keys)}")
    return 1 if missed else 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--publisher":
        logging.getLogger("dms").setLevel(logging.ERROR)
        publisher_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    sys.exit(main())
