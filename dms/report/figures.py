"""The report's figures: matplotlib drawings as inline SVG (no prolog, ids per figure)."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]  # fmt: skip


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "svg.fonttype": "path",
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def _svg(fig: Any, name: str) -> str:
    """The figure as an inline ``<svg>`` element: no XML prolog, DOCTYPE or metadata, and
    ids salted per figure so several figures share one page without clashes."""
    plt = _pyplot()
    buf = io.StringIO()
    with plt.rc_context({"svg.hashsalt": f"dms-{name}"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return text.replace("<svg ", f'<svg role="img" aria-label="{name}" id="fig-{name}" ', 1)


def _colours(names: Sequence[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(set(names), key=_natural))}


def _natural(name: str) -> tuple[int, float | str]:
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def scatter_figure(data: dict[str, Any], algorithm: str) -> str:
    plt = _pyplot()
    c = data["clusters"]
    points = np.array(c["points"]).reshape(-1, 2)
    job_name = "prediction" if algorithm in ("knn", "sknn") else "cluster"
    panels = [(f"{algorithm} ({job_name})", c["labels"], "encrypted")]
    if "baseline" in c and algorithm not in ("kmeans", "knn"):
        plain = "kmeans" if algorithm in ("skmeans", "dbskmeans") else "knn"
        panels.append((f"plaintext {plain}", c["baseline"], "plain"))
    if "truth" in c:
        panels.append(("true labels", c["truth"], "truth"))
    colours = _colours([x for _, labels, _ in panels for x in labels])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, labels, gid) in zip(axes[0], panels, strict=True):
        for name in sorted(set(labels), key=_natural):
            mask = np.array([x == name for x in labels])
            ax.scatter(
                points[mask, 0],
                points[mask, 1],
                s=10,
                color=colours[name],
                label=name,
                alpha=0.8,
                linewidths=0,
                gid=f"{gid}-{name}",
            )
        ax.set_title(title)
        ax.set_xlabel(f"PC1 ({c['variance'][0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({c['variance'][1]:.0%})")
        ax.legend(title=job_name, fontsize=7, title_fontsize=7, loc="best", markerscale=1.5)
    fig.tight_layout()
    return _svg(fig, "clusters")


def convergence_figure(data: dict[str, Any]) -> str | None:
    conv = data["convergence"]
    changes, times = conv["changes"], conv["round_s"]
    if not changes and not times:
        return None
    plt = _pyplot()
    panels = int(bool(changes)) + int(bool(times))
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.0), squeeze=False)
    at = 0
    if changes:
        ax = axes[0][at]
        rounds = list(range(1, len(changes) + 1))
        ax.plot(rounds, changes, marker="o", color=PALETTE[0], gid="changes")
        ax.set_title("relative centroid change per round")
        ax.set_xlabel("round")
        ax.set_ylabel("change")
        ax.set_xticks(rounds)
        if min(changes) > 0:
            ax.set_yscale("log")
        at += 1
    if times:
        ax = axes[0][at]
        steps = list(range(1, len(times) + 1))
        ax.bar(steps, times, color=PALETTE[2], gid="round-times")
        ax.set_xticks(steps)
        ax.set_title("time per round (s)" if changes else "time per step (s)")
        ax.set_xlabel("round" if changes else "step")
        ax.set_ylabel("seconds")
    fig.tight_layout()
    return _svg(fig, "convergence")


def timings_figure(data: dict[str, Any]) -> str | None:
    rows = data["timings"]
    if not rows:
        return None
    plt = _pyplot()
    who = {"owner": PALETTE[0], "worker": PALETTE[1], "workers": PALETTE[1], "job": PALETTE[7]}
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 0.9))
    names = [f"{r['who']}: {r['phase']}" for r in rows]
    values = [r["s"] for r in rows]
    ax.barh(names, values, color=[who.get(r["who"], PALETTE[4]) for r in rows], gid="phases")
    ax.invert_yaxis()
    for y, v in enumerate(values):
        ax.annotate(f" {v:.3f} s", (v, y), va="center", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(values) * 1.25 or 1)
    fig.tight_layout()
    return _svg(fig, "timings")


def placement_figure(data: dict[str, Any]) -> str | None:
    rows = data["placement"]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows) + 2), 3.0))
    x = np.arange(len(rows))
    sent = [r["mb_sent"] or 0 for r in rows]
    back = [r["mb_received"] or 0 for r in rows]
    ax.bar(x - 0.2, sent, 0.4, label="to the worker", color=PALETTE[0], gid="mb-sent")
    ax.bar(x + 0.2, back, 0.4, label="to the owner", color=PALETTE[1], gid="mb-received")
    ax.set_xticks(x, [f"{r['shard']}\n…{str(r['peer_id'])[-8:]}" for r in rows])
    ax.set_ylabel("MB")
    ax.set_title("what moved, per shard")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _svg(fig, "placement")


def confusion_figure(data: dict[str, Any]) -> str | None:
    conf = data.get("confusion")
    if not conf:
        return None
    plt = _pyplot()
    names, matrix = conf["labels"], np.array(conf["matrix"])
    size = 1.0 + 0.6 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    ax.imshow(matrix, cmap="Blues", gid="confusion")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = matrix.max() or 1
    for i in range(len(names)):
        for j in range(len(names)):
            colour = "white" if matrix[i, j] > top / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=colour)
    fig.tight_layout()
    return _svg(fig, "confusion")
