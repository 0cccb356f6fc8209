"""Attacks on a provider's bidding with many keys, or many requests (issue 24).

- ``sybil_flood``: ``--sybil-keys`` (200) fresh keys from this one process, each a
  bare py-libp2p host with a connection of its own, each writing
  ``--sybil-requests`` (10) bid requests of ``--sybil-slots`` (256) slots at once,
  all at the same time. Before the global budgets: +452 MB RSS (peak 875 MB),
  307,200 bid rows, +95 MB of database, 0 of 4 honest placements.
- ``bid_index_growth``: one peer, ``--growth-requests`` (1,600) bid requests of
  ``--growth-slots`` (256) slots, written at ``--growth-rate`` (45) a second, under
  its own rate (``bid_requests_per_s`` 50), so that only the bid index bounds
  what it writes. Before: 409,621 bid rows, +94 MB, honest p50 2.4 s against 1.3.

Each line adds ``hostile_answers`` (the victim's answers by code, or
``no_reply``), ``victim_bid_rows`` (the rows of bids it sent, after the
attack), ``victim_caught_up`` (every hostile key's last invoke answered),
``hostile_streams_reset`` (keys whose stream the victim's network budgets reset:
their writes failed) and
``victim_budgets`` (its ``dms_budget_refusals`` during the attack, by budget).
The honest requester placed its warm-up jobs on the victim before: the victim
has a stake in it, as in a network where it has worked with the victim before.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sqlite3
import threading
from collections import Counter
from typing import Any

from adversary_kit import SLOT_RESOURCES, Context, Plan, Victim, say

from dms.node.client import root_handle
from dms.orchestrator.messages import REQUEST, REVERT, BidRequest
from dms.sim.adversary import BarePeer

ATTACKS = ["sybil_flood", "bid_index_growth"]
CAUGHT_UP_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sybil-keys", type=int, default=200, help="fresh keys of sybil_flood")
    parser.add_argument("--sybil-requests", type=int, default=10, help="bid requests per key")
    parser.add_argument("--sybil-slots", type=int, default=256, help="slots per sybil request")
    parser.add_argument(
        "--growth-requests", type=int, default=1_600, help="bid requests of bid_index_growth"
    )
    parser.add_argument("--growth-slots", type=int, default=256, help="slots per request")
    parser.add_argument(
        "--growth-rate", type=float, default=45.0, help="bid requests a second (one peer)"
    )


def plans(ctx: Context) -> dict[str, Plan]:
    args, victim = ctx.args, ctx.victim
    return {
        "sybil_flood": Plan(
            lambda: sybil_flood(victim, args.sybil_keys, args.sybil_requests, args.sybil_slots),
            placements=True,
        ),
        "bid_index_growth": Plan(
            lambda: bid_index_growth(
                victim, args.growth_requests, args.growth_slots, args.growth_rate
            ),
            placements=True,
        ),
    }


def bid_request(deployment: str, slots: int) -> dict[str, Any]:
    """``slots`` small compute slots, each of which the victim could take."""
    slot = {"executor": "compute", "params": {"seconds": 1}, "resources": SLOT_RESOURCES}
    return BidRequest.model_validate(
        {
            "deployment_id": deployment,
            "lease_s": 600,
            "slots": [{"slot": f"w.{i}", **slot} for i in range(slots)],
        }
    ).model_dump()


def bid_rows(victim: Victim) -> int:
    """Rows of bids the victim sent (its bid index), read beside it."""
    db = sqlite3.connect(f"file:{victim.home / 'dms.db'}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("SELECT count(*) FROM bids WHERE direction = 'sent'").fetchone()
        return int(row[0])
    finally:
        db.close()


def budget_refusals(victim: Victim) -> Counter[str]:
    counts: Counter[str] = Counter()
    for name, value in victim.metrics().items():
        if name.startswith("dms_budget_refusals_total{"):
            counts[dict(re.findall(r'(\w+)="([^"]*)"', name))["budget"]] += int(value)
    return counts


def answers_by_code(peer: BarePeer, nonces: list[bytes]) -> Counter[str]:
    return Counter(peer.refusal_codes(nonces))


def give_back(peers: list[BarePeer], victim: Victim, deployments: list[str]) -> None:
    """Housekeeping after the figures: each key reverts what it was offered (sent, not
    waited for: the victim answers few refusals a second, and what a revert misses
    expires within max_lease_s), then every key goes."""
    to = root_handle(victim.peer_id)
    for peer in peers:
        reverts = [
            peer.seal(peer.envelope(to, REVERT, {"deployment_id": d, "everything": True}))
            for d in deployments
        ]
        with contextlib.suppress(Exception):  # its stream was reset: nothing to send on
            peer.write(reverts)
        peer.close()


def write(peer: BarePeer, frames: list[bytes], pace_s: float, reset: list[BarePeer]) -> None:
    """Write the frames; a stream the victim reset (its network budgets) is noted."""
    try:
        peer.write(frames, pace_s)
    except Exception:
        reset.append(peer)


def finished(peer: BarePeer, to: Any) -> bool:
    """One last invoke answered (the victim read everything before it); False if the
    victim reset the peer's stream."""
    try:
        return peer.finish(to, CAUGHT_UP_S)
    except Exception:
        return False


def sybil_flood(victim: Victim, keys: int, requests: int, slots: int) -> Any:
    say(f"sybil_flood: connecting {keys} keys")
    peers = [BarePeer(victim.addr, actor=True) for _ in range(keys)]
    to = root_handle(victim.peer_id)
    names = [f"sybil-{i}" for i in range(requests)]
    payloads = [bid_request(name, slots) for name in names]
    envelopes = {
        peer: [peer.envelope(to, REQUEST, p, reply=True) for p in payloads] for peer in peers
    }
    frames = {peer: [peer.seal(env) for env in envs] for peer, envs in envelopes.items()}
    budgets_before = budget_refusals(victim)

    def attack() -> dict[str, Any]:
        reset: list[BarePeer] = []
        writers = [
            threading.Thread(target=write, args=(peer, frames[peer], 0.0, reset)) for peer in peers
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        caught_up = all([finished(peer, to) for peer in peers if peer not in reset])
        answers: Counter[str] = Counter()
        for peer, envs in envelopes.items():
            answers += answers_by_code(peer, [env.nonce for env in envs])
        return {
            "victim_caught_up": caught_up,
            "hostile_keys": keys,
            "hostile_requests": keys * requests,
            "hostile_answers": dict(sorted(answers.items())),
            "hostile_streams_reset": len(reset),
            "victim_bid_rows": bid_rows(victim),
            "victim_budgets": dict(sorted((budget_refusals(victim) - budgets_before).items())),
            "_cleanup": lambda: give_back(peers, victim, names),
        }

    return attack


def bid_index_growth(victim: Victim, requests: int, slots: int, rate: float) -> Any:
    peer = BarePeer(victim.addr, actor=True)
    to = root_handle(victim.peer_id)
    names = [f"growth-{i % 16}" for i in range(requests)]
    envelopes = [peer.envelope(to, REQUEST, bid_request(name, slots), reply=True) for name in names]
    frames = [peer.seal(env) for env in envelopes]
    budgets_before = budget_refusals(victim)

    def attack() -> dict[str, Any]:
        reset: list[BarePeer] = []
        write(peer, frames, 1.0 / rate, reset)
        caught_up = not reset and finished(peer, to)
        return {
            "victim_caught_up": caught_up,
            "hostile_requests": requests,
            "hostile_streams_reset": len(reset),
            "hostile_answers": dict(
                sorted(answers_by_code(peer, [env.nonce for env in envelopes]).items())
            ),
            "victim_bid_rows": bid_rows(victim),
            "victim_budgets": dict(sorted((budget_refusals(victim) - budgets_before).items())),
            "_cleanup": lambda: give_back([peer], victim, sorted(set(names))),
        }

    return attack
