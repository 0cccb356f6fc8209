"""Why a placed job waits: what ``dms mine`` and ``dms deploy --follow`` say when nothing
else happened for a few seconds, and the hint a job that timed out ends with.

Read from what the node already exposes through its local API: the deployment's
manifest (each slot's state and, per peer, the last word on it: not asked and why,
declined and why, no answer yet) and the peers table (who is alive, last seen when).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dms.cli.output import ago, short_peer
from dms.node.client import NodeClient

EVERY_S = 5.0  # a line at least this often while nothing else is said
PEERS_NAMED = 5  # per waiting slot, the peers whose reason is shown
PLACING = ("open", "committing", "allocating")
# How a deployment that could not place a slot in time says so (dms/orchestrator).
NOT_PLACED = "not placed within the deadline"
# How it names a provider the peer table says is gone (dms/orchestrator/base.py).
GONE = "the provider is gone"


def placement_hint(reason: str, shards: int | None = None) -> str | None:
    """What to do about a job that timed out waiting for providers, or None; ``shards``
    for a mining job (None: a deployment)."""
    if NOT_PLACED not in reason:
        return None
    if GONE in reason:
        # More providers would not help when the ones that could take it left.
        return (
            "hint: a provider that could take it left or stopped answering: see who is "
            "up (dms peers), then try again"
            + (" or mine on this machine (--local)" if shards is not None else "")
        )
    if shards is not None:
        fewer = "ask for fewer workers (--shards 1), " if shards > 1 else ""
        return (
            "hint: no provider could take every worker in time: onboard more providers "
            f"(dms onboard on other nodes), {fewer}give them longer (--timeout), "
            "or mine on this machine (--local)"
        )
    return (
        "hint: no provider could take every allocation in time: onboard more providers "
        "(dms onboard on other nodes), or ask for less (the job's count and resources)"
    )


class Waiting:
    """Call :meth:`news` whenever an event was printed and :meth:`tick` at each poll:
    every ``every_s`` seconds while a slot waits for a provider (or its provider went
    quiet) it says why, and after ``quiet_s`` seconds without any event what runs."""

    def __init__(
        self,
        client: NodeClient,
        deployment_id: str,
        say: Callable[[str], None],
        every_s: float = EVERY_S,
        quiet_s: float = 2 * EVERY_S,
    ) -> None:
        self.client = client
        self.id = deployment_id
        self.say = say
        self.every_s, self.quiet_s = every_s, quiet_s
        self.started = self.looked = self.heard = time.monotonic()
        self.since: dict[str, float] = {}  # slot -> when it was first seen waiting

    def news(self) -> None:
        self.heard = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.looked < self.every_s:
            return
        self.looked = now
        try:
            waiting, working = self.lines()
        except Exception as exc:  # the next look says it again, if it persists
            waiting, working = [f"waiting (the node did not say why: {exc})"], []
        if not waiting and now - self.heard >= self.quiet_s:
            waiting, self.heard = working, now
        for line in waiting:
            self.say(line)

    def lines(self) -> tuple[list[str], list[str]]:
        manifest = self.client.invoke("/dms/node/deployment/manifest", {"id": self.id}, timeout=10)
        peers = self.client.invoke("/dms/node/peers/list", None, timeout=10)
        if not self.since:  # the first look: a slot waiting now has waited since the start
            self.since = {s["slot"]: self.started for s in manifest["slots"]}
        return describe(manifest["slots"], peers, self.since, time.monotonic())


def describe(
    slots: list[dict[str, Any]],
    peers: list[dict[str, Any]],
    since: dict[str, float],
    now: float,
) -> tuple[list[str], list[str]]:
    """One look at the job: the lines on what waits (each slot waiting for a provider:
    how many peers are alive, how many fit, each one's reason; each running slot whose
    provider went quiet), and the line on what runs."""
    by_id = {p["peer_id"]: p for p in peers}
    alive = [p for p in peers if p.get("status") == "alive"]
    out: list[str] = []
    # Slots in the same situation (the same peers, the same reasons) are said once.
    groups: dict[tuple[Any, ...], list[str]] = {}
    for slot in slots:
        name = slot["slot"]
        if slot["status"] not in PLACING:
            since[name] = now  # if it waits again (its provider lost), from then on
            continue
        waited = round(now - since.setdefault(name, now))
        reasons: dict[str, str] = slot.get("reasons") or {}
        key = (waited, slot["status"], tuple(sorted(reasons.items())))
        groups.setdefault(key, []).append(name)
    for (waited, status, reason_items), names in groups.items():
        reasons = dict(reason_items)
        fit = [p for p in alive if not reasons.get(p["peer_id"], "").startswith("not asked")]
        alone = "" if peers else " (no peer known yet: dms peers connect ADDRESS)"
        out.append(
            f"waiting {waited} s for a provider for {', '.join(names)} ({status}): "
            f"{len(alive)} peer(s) alive, {len(fit)} fit{alone}"
        )
        named = sorted({*reasons, *(p["peer_id"] for p in alive)})
        for peer in named[:PEERS_NAMED]:
            state = by_id.get(peer, {}).get("status", "not in the peers table")
            why = reasons.get(peer) or "asked, no answer yet"
            out.append(f"  {short_peer(peer)} ({state}): {why}")
        if len(named) > PEERS_NAMED:
            out.append(f"  and {len(named) - PEERS_NAMED} more (dms deployment manifest)")
    for slot in slots:
        peer = by_id.get(slot.get("peer_id") or "")
        if slot["status"] == "running" and peer is not None and peer.get("status") != "alive":
            seen = peer.get("last_seen_s")
            when = "" if seen is None else f", last seen {ago(time.time() - seen)}"
            out.append(
                f"{slot['slot']}: its provider {short_peer(peer['peer_id'])} is "
                f"{peer.get('status')}{when}; it is placed again on another peer"
            )
    running = [s for s in slots if s["status"] == "running"]
    where = ", ".join(f"{s['slot']} on {short_peer(s['peer_id'])}" for s in running)
    return out, [f"working: {where}" if where else "waiting for the node"]
