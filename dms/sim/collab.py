"""A scenario's collaboration (``collab`` step): its owners' rows, and what it must give.

The runner splits the rows in contiguous parts, one per owner in order, and
writes each where only that owner's node reads it; the first owner proposes
(``/dms/node/collab/propose``), the others join (``/dms/node/collab/join``),
as ``dms mine collab propose|join`` do. At the end the expectation
``collab_equals_plaintext`` compares every surviving owner's result with
:func:`plaintext_reference`: k-means in the clear on the union, with a dropped
owner's rows counted until the round it dropped in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dms.mining.collab import Init, Proposal
from dms.mining.collab.stats import (
    drawn_centroids,
    kmeans_statistics,
    moments_statistics,
    next_centroids,
)
from dms.mining.data import blobs, read_table
from dms.sim.scenario import Collab

CENTROID_TOLERANCE = 1e-6  # the ring's fixed point rounds each total by about 1e-10


@dataclass
class CollabPlan:
    proposal: Proposal
    owners: list[str]  # node names, in the proposal's order
    parts: list[np.ndarray]
    files: list[Path]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> its result
    owner_cpu_s: dict[str, float] = field(default_factory=dict)  # node -> its answers' CPU
    session: dict[str, Any] = field(default_factory=dict)  # the proposer's last progress

    def payloads(self, proposer_peer: str, collab: Collab) -> list[tuple[str, str, dict]]:
        """(node, behaviour, payload) for the proposer, then each other owner."""
        body = self.proposal.model_dump(mode="json")
        propose: dict[str, Any] = {"proposal": body, "data": str(self.files[0])}
        propose.update(timeout_s=collab.timeout_s, cpu=collab.cpu, ram=collab.ram)
        for key in ("owner_timeout_s", "join_timeout_s"):
            if getattr(collab, key) is not None:
                propose[key] = getattr(collab, key)
        out = [(self.owners[0], "/dms/node/collab/propose", propose)]
        for name, path in zip(self.owners[1:], self.files[1:], strict=True):
            join = {"proposal": body, "proposer": proposer_peer, "data": str(path)}
            out.append((name, "/dms/node/collab/join", join))
        return out


def collab_rows(collab: Collab) -> np.ndarray:
    if collab.blobs is not None:
        b = collab.blobs
        rows, _ = blobs(b.rows, b.attributes, b.centers, seed=b.seed, std=b.std)
        return rows
    assert collab.data is not None
    return read_table(collab.data).features


def plan_collab(
    collab: Collab, owners: list[str], peers: list[str], folder: Path, collab_id: str
) -> CollabPlan:
    """Split the rows, write each owner's part into ``folder``, and make the proposal."""
    rows = collab_rows(collab)
    m = len(owners)
    if rows.shape[0] < m:
        raise ValueError(f"{rows.shape[0]} rows for {m} owners: each needs one at least")
    parts = np.array_split(rows, m)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, part in zip(owners, parts, strict=True):
        path = folder / f"{name}.csv"
        np.savetxt(path, part, delimiter=",", fmt="%.17g")
        files.append(path)
    supplied = collab.init == "supplied"
    if supplied and parts[0].shape[0] < collab.k:
        raise ValueError(f"the proposer's part has fewer than k = {collab.k} rows to start from")
    proposal = Proposal(
        collab_id=collab_id,
        owners=peers,
        a=rows.shape[1],
        k=collab.k,
        rounds=collab.rounds,
        threshold=collab.threshold or m // 2 + 1,
        init=Init(collab.init),
        centroids=parts[0][: collab.k].tolist() if supplied else None,
        seed=collab.seed,
    )
    return CollabPlan(proposal, owners, parts, files)


def plaintext_reference(
    parts: list[np.ndarray], proposal: Proposal, dropped: dict[int, int]
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """The centroids after the announced rounds and each owner's labels (None for one
    that dropped), in the clear: owner ``i``'s rows count in round ``r`` while
    ``r < dropped[i]`` (-1: dropped at setup, never counted)."""
    p = proposal

    def counts(i: int, round_: int) -> bool:
        return i not in dropped or round_ < dropped[i]

    if p.init is Init.MOMENTS:
        values = sum(moments_statistics(rows) for i, rows in enumerate(parts) if counts(i, 0))
        centroids = drawn_centroids(np.asarray(values), p.k, p.a, p.seed)
    else:
        centroids = np.asarray(p.centroids, dtype=np.float64)
    labels: list[np.ndarray | None] = [None] * len(parts)
    for round_ in range(1, p.rounds + 1):
        total = np.zeros(p.length(round_))
        for i, rows in enumerate(parts):
            if counts(i, round_):
                labels[i], vector = kmeans_statistics(rows, centroids)
                total += vector
        centroids = next_centroids(total, centroids)
    return centroids, [lab if counts(i, p.rounds) else None for i, lab in enumerate(labels)]


def check_collab(plan: CollabPlan) -> tuple[bool, str]:
    """Whether every owner still running got the plaintext reference; why not, if not."""
    peers = plan.proposal.owners
    if not plan.results:
        return False, "no owner's result"
    first = next(iter(plan.results.values()))
    dropped = {peers.index(d["owner"]): d["round"] for d in first.get("dropped", [])}
    centroids, labels = plaintext_reference(plan.parts, plan.proposal, dropped)
    for i, name in enumerate(plan.owners):
        result = plan.results.get(name)
        if result is None:
            if i not in dropped:
                return False, f"{name} has no result and is not named dropped"
            continue
        if labels[i] is None:
            return False, f"{name} has a result, but dropped in round {dropped[i]}"
        if not np.allclose(result["centroids"], centroids, atol=CENTROID_TOLERANCE):
            return False, f"{name}'s centroids differ from plaintext k-means"
        if result["labels"] != labels[i].tolist():  # type: ignore[union-attr]
            return False, f"{name}'s labels differ from plaintext k-means"
    return True, f"{len(plan.results)} owner(s), {len(dropped)} dropped"
