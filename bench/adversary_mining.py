"""Attacks on mining (issue 24 items 5, 6 and 10), for ``bench/adversary.py``.

- ``context_bomb``: a hostile data owner (a node of this process) places a level-128
  blind k-means job on the victim, a provider, and ships it a public context with
  Galois keys at ``--context-level`` (256: 288 MB) instead of the job's. The victim
  must refuse it before fetching it (``context_refused``) and stay small.
- ``stalled_worker``: the victim is the data owner. It mines Iris (blind, placed on
  the providers of this process); the first worker it gets stalls its first step.
  The job must complete on another worker (``job_completed``), the stalled one
  excluded, past the victim's step deadline (``mining_step_floor_s``, 30 s).
- ``answer_bomb``: as above; the job's first worker answers ``--bomb-mb`` MiB of one
  repeated chunk, its second 3 MB of MessagePack that decode to 3 million dicts. Each
  must be refused before it is fetched or decoded, each worker excluded, and the job
  completed on a third (``job_completed``).

The honest peer keeps invoking the victim meanwhile (the kit's measure).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from adversary_kit import PASSPHRASE, Context, Plan, say

from dms.jobs.executors import EXECUTORS
from dms.jobs.mining_params import split_context
from dms.mining.schemes.ckks import CkksKeys
from dms.node.client import NodeClient
from dms.node.daemon import Node
from dms.orchestrator import mining as owner_session
from dms.orchestrator.states import SESSION
from dms.resources import Resources
from dms.sim.hostile_mining import HostileExecutor

ATTACKS = ["context_bomb", "stalled_worker", "answer_bomb"]
IRIS = Path(__file__).resolve().parent.parent / "examples" / "iris-features.csv"
PROVIDERS = 3  # nodes of this process that bid for the victim's jobs
JOB_WAIT_S = 240.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--context-level",
        type=int,
        choices=[128, 192, 256],
        default=256,
        help="context_bomb: the level of the Galois context sent (256: 288 MB)",
    )
    parser.add_argument(
        "--bomb-mb", type=int, default=1024, help="answer_bomb: MiB of the repeated answer"
    )


def blind_iris() -> dict[str, Any]:
    settings = {"algorithm": "skmeans", "k": 3, "max_iterations": 4}
    # a quarter core: within the victim's max_peer_share when it is the provider
    return {"settings": settings, "data": str(IRIS), "timeout_s": 120, "cpu": 0.25}


class Mining:
    """What the three attacks share: the providers of this process, and the victim's
    local API (its user key) to mine as its owner."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.providers: list[Node] = []
        self.started = 0  # providers made so far (each with a fresh name and key)
        self._client: NodeClient | None = None

    def client(self) -> NodeClient:
        if self._client is None:
            os.environ.setdefault("DMS_PASSPHRASE", PASSPHRASE)
            self._client = NodeClient(self.ctx.victim.home)
        return self._client

    def start_providers(self) -> None:
        while len(self.providers) < PROVIDERS:
            name = f"miner{self.started}"
            self.started += 1
            node = self.ctx.cluster.add(name, bootstrap=[self.ctx.victim.addr])
            assert node.ledger is not None
            node.ledger.onboard(Resources(cpu=2, ram=4, disk=4))
            self.providers.append(node)

    def stop_providers(self) -> None:
        for node in self.providers:
            self.ctx.cluster.crash(node)
        self.providers.clear()

    def mine(self, request: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """The victim mines (as its owner, through its local API) until the session ends:
        its last status and how long it took."""
        client = self.client()
        began = time.monotonic()
        session = client.invoke("/dms/node/mining/new", request, timeout=120)["id"]
        status: dict[str, Any] = {}
        deadline = began + JOB_WAIT_S
        while time.monotonic() < deadline:
            status = client.invoke("/dms/node/mining/status", {"id": session}, timeout=30)
            if status["phase"] in SESSION.terminal:
                break
            time.sleep(0.5)
        return status, time.monotonic() - began

    def warm_up(self) -> None:
        """Providers up, and one honest job of the victim before the figures: what an
        attack costs is then the attack's, not the victim's first mining job's."""
        self.start_providers()
        status, _ = self.mine(blind_iris())
        if status.get("phase") != "completed":
            say(f"warm-up job {status.get('phase')}: {status.get('progress', {}).get('reason')}")

    def hostile_jobs(self, script: list[str], jobs: int, bomb_mb: int = 64) -> dict[str, Any]:
        """``jobs`` jobs of the victim while this process's providers run ``script``."""
        executor = HostileExecutor(script, bomb_mb)
        honest = EXECUTORS["mining"]
        EXECUTORS["mining"] = executor
        try:
            self.start_providers()
            phases, excluded, seconds = [], [], []
            for _ in range(jobs):
                status, took = self.mine(blind_iris())
                progress = status.get("progress") or {}
                phases.append(status.get("phase"))
                excluded += [e["reason"] for e in progress.get("excluded") or []]
                seconds.append(round(took, 1))
                if status.get("phase") != "completed":
                    say(f"job ended {status.get('phase')}: {progress.get('reason')}")
        finally:
            executor.release()
            EXECUTORS["mining"] = honest
        return {
            "job_completed": all(p == "completed" for p in phases),
            "jobs_s": seconds,
            "workers_excluded": len(excluded),
            "excluded_reasons": [r[:160] for r in excluded],
            "sessions_made": executor.made,
            "_cleanup": self.stop_providers,
        }


def context_bomb(mining: Mining, level: int) -> Any:
    say(f"context_bomb: generating a level-{level} context with Galois keys")
    bomb = CkksKeys.generate(level, galois=True).public_context_bytes()
    say(f"context_bomb: {len(bomb) / 1e6:.0f} MB")
    ctx = mining.ctx

    def attack() -> dict[str, Any]:
        owner = ctx.cluster.add("mallory", bootstrap=[ctx.victim.addr])
        assert owner.node is not None
        honest_split = owner_session.split_context

        def with_bomb(start: bytes) -> tuple[bytes, bytes | None]:
            body, _ = split_context(start)
            return body, bomb

        owner_session.split_context = with_bomb  # type: ignore[assignment]
        try:
            time.sleep(3)  # the victim's heartbeat (it is the only provider) reaches mallory
            ref = owner.node
            request = blind_iris() | {"timeout_s": 20}  # the victim is its only provider
            session = ref.ask(ref.handle, "/dms/node/mining/new", request, timeout=120)["id"]
            status: dict[str, Any] = {}
            deadline = time.monotonic() + JOB_WAIT_S
            while time.monotonic() < deadline:
                status = ref.ask(ref.handle, "/dms/node/mining/status", {"id": session})
                if status["phase"] in SESSION.terminal:
                    break
                time.sleep(0.5)
        finally:
            owner_session.split_context = honest_split  # type: ignore[assignment]
        reason = (status.get("progress") or {}).get("reason", "")
        return {
            "context_mb": round(len(bomb) / 1e6, 1),
            "context_refused": "refused before fetching it" in reason,
            "owner_phase": status.get("phase"),
            "reason": reason[-240:],
            "_cleanup": lambda: ctx.cluster.crash(owner),
        }

    return attack


def warmed(mining: Mining, script: list[str], jobs: int, bomb_mb: int) -> Any:
    mining.warm_up()
    return lambda: mining.hostile_jobs(script, jobs, bomb_mb)


def plans(ctx: Context) -> dict[str, Plan]:
    mining = Mining(ctx)
    args = ctx.args
    return {
        "context_bomb": Plan(lambda: context_bomb(mining, args.context_level)),
        "stalled_worker": Plan(lambda: warmed(mining, ["stall"], 1, args.bomb_mb)),
        "answer_bomb": Plan(lambda: warmed(mining, ["size_bomb", "decode_bomb"], 1, args.bomb_mb)),
    }
