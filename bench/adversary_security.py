"""Attacks on capability tokens and revocations (issue 24, items 9 and 13), for
``bench/adversary.py`` (see ``bench/adversary_kit.py``).

- ``revocation_flood``: a group founder (a dms node in this process) grants the
  victim a token (``dms cap anchor --provide`` on the victim: it joins the group)
  and a hostile member (a bare py-libp2p host in a process of its own, this file
  run with ``--member``: an attacker is a process of its own, and in this one its
  publishing took the honest node's interpreter lock, ~0.6 s of 4.5 for 1,000
  revocations, py-spy) a token it may delegate below. The
  member shows its token to the victim once (a non-public behaviour it grants:
  the victim's marketplace is open in this bench, so the group's tokens grant
  ``/dms/cap/list``), then publishes ``--junk-revocations`` (300, ~330 KB as gossiped)
  revocations of tokens it issued below its own to fresh keys, and the founder
  revokes the member's token (published again every 2 s until it holds).
  ``revoked_token_refused``: the victim refused the member's token as ``revoked``
  within ``--revocation-deadline`` (60 s); ``revoked_after_s``: when, from the
  founder's revocation; ``victim_revocations``: the victim's
  ``dms_revocations_total`` by outcome.
- ``deep_chain``: the hostile shows a delegation chain of ``--chain-length``
  (1,000) tokens (~260 KB) to a non-public behaviour in ``--chains`` (100)
  envelopes, one after another, each waiting for its answer. ``answer_ms``: the
  median time to the answer (target <= 100 ms), ``answer_max_ms``, ``answers``
  by code and rule.

Both lines also give ``victim_cpu_s`` and ``bench_process_cpu_s``: CPU seconds
the victim and this process (the honest node, the founder, and for deep_chain the
hostile) spent while the attack ran; revocation_flood adds ``member_cpu_s`` (the
member's process).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil
from adversary_kit import PASSPHRASE, Context, HostileProcess, Plan, Victim, serve

from dms.node.caps import REVOCATION_BEHAVIOUR, REVOCATION_TOPIC
from dms.node.client import root_handle
from dms.node.daemon import Node
from dms.security.identity import public_key_from_peer_id
from dms.security.tokens import Token, grant, revoke, to_text
from dms.sim.adversary import BarePeer, junk_revocations, token_chain

ATTACKS = ["revocation_flood", "deep_chain"]
DAY_S = 86400.0
GROUP_CAP = "/dms/cap/list"  # what the group's tokens grant (non-public on the victim)
REPUBLISH_S = 2.0

Attack = Callable[[], dict[str, Any] | None]


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--junk-revocations", type=int, default=300, help="revocation_flood: junk ones"
    )
    parser.add_argument(
        "--revocation-deadline", type=float, default=60.0,
        help="revocation_flood: seconds for the real revocation to hold",
    )  # fmt: skip
    parser.add_argument("--chains", type=int, default=100, help="deep_chain: envelopes showing it")
    parser.add_argument(
        "--chain-length", type=int, default=1000, help="deep_chain: tokens in each chain"
    )


def plans(ctx: Context) -> dict[str, Plan]:
    args = ctx.args
    return {
        "revocation_flood": Plan(
            lambda: revocation_flood(ctx, args.junk_revocations, args.revocation_deadline)
        ),
        "deep_chain": Plan(lambda: deep_chain(ctx.victim, args.chains, args.chain_length)),
    }


def show(peer: BarePeer, victim_peer: str, caps: list[bytes], timeout: float) -> Any:
    """An invoke of ``GROUP_CAP`` on the victim's root that shows ``caps``: the reply
    payload, or None if none came within ``timeout``."""
    to = root_handle(victim_peer)
    env = peer.envelope(to, GROUP_CAP, reply=True).model_copy(update={"caps": caps})
    peer.write([peer.seal(env)])
    answer = peer.reply(env.nonce, timeout)
    peer.forget([env.nonce])
    return answer


class Member(HostileProcess):
    """The hostile member, a process of its own (this file run with ``--member``)."""

    def __init__(self, victim: Victim, junk: int) -> None:
        super().__init__([sys.executable, __file__, "--member", victim.addr, victim.peer_id,
                          str(junk)])  # fmt: skip
        self.key = bytes.fromhex(self.ask({})["key"])


def member_main(addr: str, victim_peer: str, junk: int) -> None:
    """``--member``: the member's side of :class:`Member` (stdin and stdout)."""
    member = BarePeer(addr, actor=True, gossip=True)
    token = b""
    frames: list[bytes] = []

    def step(ask: dict[str, Any]) -> dict[str, Any]:
        nonlocal token
        if "token" in ask:
            token = bytes.fromhex(ask["token"])
            deadline = time.monotonic() + 30
            while victim_peer not in member.mesh_peers(REVOCATION_TOPIC):
                if time.monotonic() > deadline:
                    raise RuntimeError("the member is not in the victim's revocation mesh")
                time.sleep(0.2)
            for raw in junk_revocations(member.identity, token, junk):
                env = member.envelope(None, REVOCATION_BEHAVIOUR, {"revocation": raw},
                                      ttl_s=600, topic=REVOCATION_TOPIC)  # fmt: skip
                frames.append(member.seal(env))
            return {"kb": round(sum(len(f) for f in frames) / 1024, 1)}
        if "show" in ask:
            return {"answer": show(member, victim_peer, [token], 5)}
        if "publish" in ask:
            member.publish_many(REVOCATION_TOPIC, frames, 0.002)
            return {"published": len(frames)}
        return {"key": member.identity.public_key.hex()}

    try:
        serve(step)
    finally:
        member.close()


def revocation_flood(ctx: Context, junk: int, deadline_s: float) -> Attack:
    victim = ctx.victim
    founder: Node = ctx.cluster.add("founder", bootstrap=[victim.addr])
    assert founder.node is not None
    ticket = grant(founder.identity, public_key_from_peer_id(victim.peer_id), [GROUP_CAP],
                   expires_in_s=DAY_S)  # fmt: skip
    join_group(victim, ticket)
    member = Member(victim, junk)
    token = grant(founder.identity, member.key, [GROUP_CAP], expires_in_s=DAY_S, depth=1)
    founder.node.ask(founder.node.handle, "/dms/cap/anchor", {"issued": token.raw}, timeout=10)
    junk_kb = member.ask({"token": token.raw.hex()})["kb"]
    first = member.ask({"show": True})["answer"]
    if not (first and first.get("ok")):
        member.close()
        raise RuntimeError(f"the victim did not accept the member's token: {first}")
    real = revoke(founder.identity, founder.system.trust.verifier.verify(token.raw))  # type: ignore[union-attr]

    def attack() -> dict[str, Any]:
        cpu = cpu_s(victim.process), cpu_s(psutil.Process()), cpu_s(member.process)
        member.ask({"publish": True})
        node = founder.node
        assert node is not None
        started = time.monotonic()
        refused_after: float | None = None
        last_publish = float("-inf")
        while time.monotonic() - started < deadline_s:
            if time.monotonic() - last_publish >= REPUBLISH_S:  # the founder's own path
                node.ask(node.handle, "/dms/cap/revoke", {"revocation": real.raw}, timeout=10)
                last_publish = time.monotonic()
            answer = member.ask({"show": True})["answer"]
            if answer is not None and answer.get("rule") == "revoked":
                refused_after = time.monotonic() - started
                break
            time.sleep(0.2)
        outcomes = {
            name.split('"')[1]: int(value)
            for name, value in victim.metrics().items()
            if name.startswith("dms_revocations_total{")
        }
        return {
            "revoked_token_refused": refused_after is not None,
            "revoked_after_s": round(refused_after, 2) if refused_after is not None else None,
            "junk_revocations": junk,
            "junk_kb": junk_kb,
            "victim_revocations": outcomes,
            "victim_cpu_s": round(cpu_s(victim.process) - cpu[0], 2),
            "bench_process_cpu_s": round(cpu_s(psutil.Process()) - cpu[1], 2),
            "member_cpu_s": round(cpu_s(member.process) - cpu[2], 2),
            "_cleanup": member.close,
        }

    return attack


def join_group(victim: Victim, ticket: Token) -> None:
    """``dms cap anchor --provide TOKEN`` on the victim, as its user would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
    env.update(DMS_HOME=str(victim.home), DMS_PASSPHRASE=PASSPHRASE)
    cmd = [sys.executable, "-m", "dms", "cap", "anchor", "--provide", to_text(ticket.raw)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"the victim did not join the group: {done.stderr.strip()}")


def deep_chain(victim: Victim, chains: int, length: int) -> Attack:
    hostile = BarePeer(victim.addr, actor=True)
    me = hostile.identity.public_key
    chain = token_chain(length, me)  # one chain, shown in ``chains`` envelopes: the
    # victim keeps no verdict for a chain it refuses by its size

    def attack() -> dict[str, Any]:
        cpu = cpu_s(victim.process), cpu_s(psutil.Process())
        times: list[float] = []
        answers: Counter[str] = Counter()
        for _ in range(chains):
            started = time.perf_counter()
            answer = show(hostile, victim.peer_id, [chain], 30)
            if answer is None:
                answers["no_answer"] += 1
                continue
            times.append(time.perf_counter() - started)
            answers[f"{answer.get('code', 'ok')}:{answer.get('rule')}"] += 1
        answered = times and not answers["no_answer"]  # an unanswered chain misses it
        return {
            "answer_ms": round(statistics.median(times) * 1e3, 2) if answered else None,
            "answer_max_ms": round(max(times) * 1e3, 2) if times else None,
            "chain_tokens": length,
            "chain_kb": round(len(chain) / 1024, 1),
            "answers": dict(answers),
            "victim_cpu_s": round(cpu_s(victim.process) - cpu[0], 2),
            "bench_process_cpu_s": round(cpu_s(psutil.Process()) - cpu[1], 2),
            "_cleanup": hostile.close,
        }

    return attack


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--member":
        logging.getLogger("dms").setLevel(logging.ERROR)
        member_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit("run bench/adversary.py; this file is run alone only as --member ADDR PEER N")
