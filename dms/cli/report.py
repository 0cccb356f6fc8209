"""``dms mine ... --report``: one self-contained HTML page about a mining job.

The page works offline: every figure is matplotlib's SVG, inlined; the style sheet
is inline; nothing is fetched (no script, font or image from anywhere). The data
behind the figures is embedded too, as JSON in ``<script type="application/json"
id="report-data">``, so a reader (or a test) can check what is drawn.

Sections: the clusters in 2-D (PCA) beside the plaintext baseline, convergence
per round, time per phase and per round, placement (peers and MB), the confusion
matrix (k-NN with true labels), and what each party learned (``dms.mining.learned``).
"""

from __future__ import annotations

import html
import io
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dms.mining.learned import LEARNED, PROVIDER_NODE, learned_for
from dms.mining.metrics import adjusted_rand_index, matched_agreement, matched_labels

REPORT_FILE = "report.html"
MAX_POINTS = 3000  # drawn in the scatter plots (a seeded sample beyond that)
PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]  # fmt: skip
SECTIONS = ("summary", "clusters", "convergence", "timings", "placement", "confusion", "learned")


@dataclass
class ReportInput:
    """What the CLI knows after a job: its result, its labels and the owner's data."""

    summary: dict[str, Any]  # result.json
    labels: list[Any]  # the job's labels (clusters) or predictions (k-NN)
    points: np.ndarray  # the rows labelled: records (k-means) or queries (k-NN)
    baseline: list[Any] | None = None  # plaintext k-means / k-NN labels, computed here
    truth: list[Any] | None = None  # true labels of the test rows (k-NN), if given
    columns: list[str] = field(default_factory=list)


# ---- data -----------------------------------------------------------------------------


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The rows projected on their first two principal components (zero-padded when the
    data has one attribute), and the share of variance each explains."""
    x = np.asarray(points, dtype=float)
    if x.ndim != 2 or x.shape[0] == 0:
        return np.zeros((0, 2)), [0.0, 0.0]
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:2].T
    if projected.shape[1] < 2:
        projected = np.hstack([projected, np.zeros((projected.shape[0], 1))])
    variance = s**2
    total = float(variance.sum()) or 1.0
    shares = [float(v / total) for v in variance[:2]] + [0.0] * (2 - min(2, len(variance)))
    return projected, shares


def _sample(n: int, limit: int = MAX_POINTS) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def confusion(truth: Sequence[Any], predicted: Sequence[Any]) -> tuple[list[str], list[list[int]]]:
    """Rows: true labels; columns: predicted labels (one shared, sorted list of names)."""
    names = sorted({str(t) for t in truth} | {str(p) for p in predicted})
    at = {n: i for i, n in enumerate(names)}
    matrix = [[0] * len(names) for _ in names]
    for t, p in zip(truth, predicted, strict=True):
        matrix[at[str(t)]][at[str(p)]] += 1
    return names, matrix


def _changes(summary: dict[str, Any]) -> list[float]:
    changes = summary.get("changes")
    if changes:
        return [float(c) for c in changes]
    steps = summary.get("steps") or []
    return [float(s["change"]) for s in steps if s.get("change") is not None]


def _round_times(summary: dict[str, Any]) -> list[float]:
    if summary.get("round_s"):
        return [float(s) for s in summary["round_s"]]
    return [float(s["s"]) for s in summary.get("steps") or [] if s.get("s") is not None]


def _phases(summary: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(who, phase, seconds): the owner's timings, and the worker's compute or CPU."""
    timings = summary.get("timings") or {}
    placed = bool(summary.get("placement"))
    rows: list[tuple[str, str, float]] = []
    for key in ("keygen", "encrypt", "decrypt"):
        if timings.get(key):
            rows.append(("owner", key, float(timings[key])))
    if placed:
        if summary.get("owner_cpu_s") is not None:
            rows.append(("owner", "session CPU", float(summary["owner_cpu_s"])))
        if summary.get("worker_cpu_s") is not None:
            rows.append(("workers", "CPU (all shards)", float(summary["worker_cpu_s"])))
    elif timings.get("compute"):
        rows.append(("worker", "compute", float(timings["compute"])))
    if timings.get("total"):
        rows.append(("job", "wall clock", float(timings["total"])))
    return rows


def report_data(job: ReportInput) -> dict[str, Any]:
    """Everything the page draws, as JSON holds it."""
    s = job.summary
    data: dict[str, Any] = {
        "job": {
            k: s.get(k)
            for k in ("algorithm", "scheme", "protocol", "distance", "k", "records", "attributes")
        },
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    labels = [str(x) for x in job.labels]
    projected, shares = pca_2d(job.points)
    picked = _sample(len(labels))
    clusters: dict[str, Any] = {
        "points": [[round(float(a), 5), round(float(b), 5)] for a, b in projected[picked]],
        "variance": [round(v, 4) for v in shares],
        "labels": [labels[i] for i in picked],
        "shown": len(picked),
        "total": len(labels),
    }
    if job.baseline is not None:
        base = [str(x) for x in job.baseline]
        if s.get("algorithm") in ("kmeans", "skmeans", "dbskmeans"):
            # cluster numbers are arbitrary: match the baseline's to the job's first
            base = [str(x) for x in matched_labels(labels, base)]
            clusters["adjusted_rand_index"] = round(adjusted_rand_index(labels, base), 4)
            clusters["matched_agreement"] = round(matched_agreement(labels, base), 4)
        else:
            same = sum(a == b for a, b in zip(labels, base, strict=True))
            clusters["agreement_with_plain"] = round(same / max(len(labels), 1), 4)
        clusters["baseline"] = [base[i] for i in picked]
    if job.truth is not None:
        clusters["truth"] = [str(job.truth[i]) for i in picked]
    data["clusters"] = clusters
    data["convergence"] = {
        "changes": _changes(s),
        "round_s": _round_times(s),
        "iterations": s.get("iterations"),
        "converged": s.get("converged"),
    }
    data["timings"] = [{"who": w, "phase": p, "s": round(v, 4)} for w, p, v in _phases(s)]
    data["placement"] = [
        {k: p.get(k) for k in ("shard", "peer_id", "rows", "mb_sent", "mb_received", "placements")}
        for p in s.get("placement") or []
    ]
    data["bytes"] = {"to_worker": s.get("bytes_to_worker"), "to_owner": s.get("bytes_to_owner")}
    if job.truth is not None and s.get("algorithm") in ("knn", "sknn"):
        names, matrix = confusion(job.truth, labels)
        data["confusion"] = {"labels": names, "matrix": matrix}
    row = learned_for(str(s.get("algorithm")), s.get("protocol"), str(s.get("scheme")))
    data["learned"] = {"case": row.case if row else None}
    return data


# ---- figures --------------------------------------------------------------------------


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


def _scatter_figure(data: dict[str, Any], algorithm: str) -> str:
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


def _convergence_figure(data: dict[str, Any]) -> str | None:
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


def _timings_figure(data: dict[str, Any]) -> str | None:
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


def _placement_figure(data: dict[str, Any]) -> str | None:
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


def _confusion_figure(data: dict[str, Any]) -> str | None:
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


# ---- the page -------------------------------------------------------------------------

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;
background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:1.5rem}
h1{font-size:1.5rem;margin:.2rem 0}
h2{font-size:1.15rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
section{background:#fff;border:1px solid #e5e5e5;border-radius:6px;padding:.3rem 1rem 1rem;
margin:1rem 0}
table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}
tr.this{background:#eef6ff;font-weight:600}
.note{color:#666;font-size:.9em}
code{font-family:ui-monospace,monospace;font-size:.9em}
svg{max-width:100%;height:auto}
dl.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:.4rem;
margin:.5rem 0}
dl.facts div{background:#f6f6f6;border-radius:4px;padding:.3rem .6rem}
dt{color:#666;font-size:.8em}dd{margin:0;font-weight:600;overflow-wrap:anywhere}
"""


def _table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()
) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        cells = "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _facts(fields: dict[str, Any]) -> str:
    items = "".join(
        f"<div><dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd></div>"
        for k, v in fields.items()
    )
    return f'<dl class="facts">{items}</dl>'


def _section(key: str, title: str, *parts: str | None) -> str:
    inner = "\n".join(p for p in parts if p)
    return f'<section id="{key}">\n<h2>{html.escape(title)}</h2>\n{inner}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def render(job: ReportInput) -> str:
    """The whole page as a string."""
    s = job.summary
    data = report_data(job)
    algorithm = str(s.get("algorithm"))
    knn = algorithm in ("knn", "sknn")
    placed = bool(s.get("placement"))
    shown = {
        k: s.get(k)
        for k in ("algorithm", "scheme", "protocol", "distance", "k", "records", "attributes")
    }
    if s.get("iterations") is not None:
        shown["iterations"] = f"{s['iterations']} (converged: {s.get('converged')})"
    if s.get("session"):
        shown["session"] = s["session"]
    for key, value in (s.get("comparison") or {}).items():
        shown[key] = round(value, 4) if isinstance(value, float) else value
    summary_part = _facts(shown)

    c = data["clusters"]
    cluster_notes = []
    if c["shown"] < c["total"]:
        cluster_notes.append(f"{c['shown']:,} of {c['total']:,} rows drawn (a seeded sample).")
    if "adjusted_rand_index" in c:
        cluster_notes.append(
            f"Against plaintext k-means on the same data: adjusted Rand index "
            f"{c['adjusted_rand_index']:.4f}, {c['matched_agreement']:.2%} of records in the "
            "same cluster once clusters are matched (cluster numbers are arbitrary; the "
            "baseline's are renamed to match)."
        )
    if "agreement_with_plain" in c:
        cluster_notes.append(
            f"Predictions equal plaintext k-NN's for {c['agreement_with_plain']:.2%} of queries."
        )
    what = "queries" if knn else "records"
    clusters = _section(
        "clusters",
        f"{'Predictions' if knn else 'Clusters'} in 2-D (PCA of the {what})",
        _scatter_figure(data, algorithm) if c["total"] else _note("no rows"),
        *(_note(n) for n in cluster_notes),
    )

    conv = data["convergence"]
    conv_note = (
        f"{conv['iterations']} round(s); converged: {conv['converged']}."
        if conv["iterations"] is not None
        else "k-NN answers its queries in blocks: there are no rounds to converge."
    )
    if placed:
        conv_note += " Placed: time per step is the slowest shard's, as the owner waited."
    convergence = _section(
        "convergence", "Convergence per round", _convergence_figure(data), _note(conv_note)
    )

    timing_rows = [[r["who"], r["phase"], f"{r['s']:.3f}"] for r in data["timings"]]
    timings = _section(
        "timings",
        "Time per phase",
        _timings_figure(data),
        _table(["who", "phase", "seconds"], timing_rows) if timing_rows else None,
    )

    if placed:
        rows = [
            [p["shard"], p["peer_id"], p["rows"], p["mb_sent"], p["mb_received"], p["placements"]]
            for p in data["placement"]
        ]
        placement = _section(
            "placement",
            "Placement",
            _placement_figure(data),
            _table(["shard", "peer", "rows", "MB to worker", "MB to owner", "placements"], rows),
            _note(f"replacements: {s.get('replacements', 0)}"),
        )
    else:
        b = data["bytes"]
        moved = (
            f" Messages between the two roles: {(b['to_worker'] or 0) / 1e6:.2f} MB to the "
            f"worker, {(b['to_owner'] or 0) / 1e6:.2f} MB back."
        )
        placement = _section(
            "placement",
            "Placement",
            _note("Run with --local: the owner and the worker both ran on this machine." + moved),
        )

    if knn:
        if data.get("confusion"):
            conf = data["confusion"]
            matrix_rows = [
                [name, *row] for name, row in zip(conf["labels"], conf["matrix"], strict=True)
            ]
            confusion_part = _section(
                "confusion",
                "Confusion matrix (true labels down, predictions across)",
                _confusion_figure(data),
                _table(["true \\ predicted", *conf["labels"]], matrix_rows),
            )
        else:
            confusion_part = _section(
                "confusion", "Confusion matrix", _note("The test file has no labels to compare.")
            )
    else:
        confusion_part = ""

    this = data["learned"]["case"]
    learned = _section(
        "learned",
        "What each party learned",
        _table(
            ["algorithm, protocol, scheme", "worker learns", "data owner learns"],
            [[r.case, r.worker, r.owner] for r in LEARNED],
            ["this" if r.case == this else "" for r in LEARNED],
        ),
        _note(f"This job's row is highlighted ({this}).") if this else None,
        _note(f"Placed on other nodes, each provider's node also sees: {PROVIDER_NODE}.")
        if placed
        else None,
    )

    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = f"dms mining report: {algorithm} ({s.get('scheme')}, {s.get('protocol')})"
    body = "\n".join(
        [
            _section(
                "summary",
                "Job",
                summary_part,
                _note(f"Written {data['generated_at']} by dms mine --report."),
            ),
            clusters,
            convergence,
            timings,
            placement,
            confusion_part,
            learned,
        ]
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<style>{STYLE}</style></head>\n"
        f"<body><main>\n<h1>{html.escape(title)}</h1>\n{body}\n"
        f'<script type="application/json" id="report-data">{payload}</script>\n'
        "</main></body></html>\n"
    )


def write_report(out: Path, job: ReportInput) -> Path:
    path = Path(out) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(job), encoding="utf-8")
    return path
