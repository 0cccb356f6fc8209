"""The report page: :func:`render` decides what each section shows; the HTML is the
jinja2 template ``templates/report.html.j2`` (escaped as ``html.escape`` does)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from dms.mining.learned import LEARNED, PROVIDER_NODE
from dms.report.data import ReportInput, report_data
from dms.report.figures import (
    confusion_figure,
    convergence_figure,
    placement_figure,
    scatter_figure,
    timings_figure,
)

REPORT_FILE = "report.html"
SECTIONS = ("summary", "clusters", "convergence", "timings", "placement", "confusion", "learned")
Part = dict[str, Any]


def _escape(value: Any) -> Any:
    """Every value the template prints, escaped as the page always was (``html.escape``);
    figures and the JSON payload come in as ``Markup`` and stay as they are."""
    return value if isinstance(value, Markup) else Markup(html.escape(str(value)))


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        finalize=_escape,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.j2")


def figure(svg: str | None) -> Part | None:
    return {"kind": "figure", "svg": Markup(svg)} if svg else None


def table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()
) -> Part:
    padded = [*classes, *[""] * (len(rows) - len(classes))]
    return {"kind": "table", "columns": list(columns), "rows": rows, "classes": padded}


def facts(fields: dict[str, Any]) -> Part:
    return {"kind": "facts", "fields": fields}


def note(text: str) -> Part:
    return {"kind": "note", "text": text}


def section(key: str, title: str, *parts: Part | None) -> dict[str, Any]:
    return {"key": key, "title": title, "parts": [p for p in parts if p]}


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
    summary_part = facts(shown)

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
    clusters = section(
        "clusters",
        f"{'Predictions' if knn else 'Clusters'} in 2-D (PCA of the {what})",
        figure(scatter_figure(data, algorithm)) if c["total"] else note("no rows"),
        *(note(n) for n in cluster_notes),
    )

    conv = data["convergence"]
    conv_note = (
        f"{conv['iterations']} round(s); converged: {conv['converged']}."
        if conv["iterations"] is not None
        else "k-NN answers its queries in blocks: there are no rounds to converge."
    )
    if placed:
        conv_note += " Placed: time per step is the slowest shard's, as the owner waited."
    convergence = section(
        "convergence", "Convergence per round", figure(convergence_figure(data)), note(conv_note)
    )

    timing_rows = [[r["who"], r["phase"], f"{r['s']:.3f}"] for r in data["timings"]]
    timings = section(
        "timings",
        "Time per phase",
        figure(timings_figure(data)),
        table(["who", "phase", "seconds"], timing_rows) if timing_rows else None,
    )

    if placed:
        rows = [
            [p["shard"], p["peer_id"], p["rows"], p["mb_sent"], p["mb_received"], p["placements"]]
            for p in data["placement"]
        ]
        placement = section(
            "placement",
            "Placement",
            figure(placement_figure(data)),
            table(["shard", "peer", "rows", "MB to worker", "MB to owner", "placements"], rows),
            note(f"replacements: {s.get('replacements', 0)}"),
        )
    else:
        b = data["bytes"]
        moved = (
            f" Messages between the two roles: {(b['to_worker'] or 0) / 1e6:.2f} MB to the "
            f"worker, {(b['to_owner'] or 0) / 1e6:.2f} MB back."
        )
        placement = section(
            "placement",
            "Placement",
            note("Run with --local: the owner and the worker both ran on this machine." + moved),
        )

    if knn:
        if data.get("confusion"):
            conf = data["confusion"]
            matrix_rows = [
                [name, *row] for name, row in zip(conf["labels"], conf["matrix"], strict=True)
            ]
            confusion_part = section(
                "confusion",
                "Confusion matrix (true labels down, predictions across)",
                figure(confusion_figure(data)),
                table(["true \\ predicted", *conf["labels"]], matrix_rows),
            )
        else:
            confusion_part = section(
                "confusion", "Confusion matrix", note("The test file has no labels to compare.")
            )
    else:
        confusion_part = None

    this = data["learned"]["case"]
    learned = section(
        "learned",
        "What each party learned",
        table(
            ["algorithm, protocol, scheme", "worker learns", "data owner learns"],
            [[r.case, r.worker, r.owner] for r in LEARNED],
            ["this" if r.case == this else "" for r in LEARNED],
        ),
        note(f"This job's row is highlighted ({this}).") if this else None,
        note(f"Placed on other nodes, each provider's node also sees: {PROVIDER_NODE}.")
        if placed
        else None,
    )

    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = f"dms mining report: {algorithm} ({s.get('scheme')}, {s.get('protocol')})"
    summary = section(
        "summary",
        "Job",
        summary_part,
        note(f"Written {data['generated_at']} by dms mine --report."),
    )
    sections = [summary, clusters, convergence, timings, placement, confusion_part, learned]
    return _template().render(title=title, sections=sections, payload=Markup(payload))


def write_report(out: Path, job: ReportInput) -> Path:
    path = Path(out) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(job), encoding="utf-8")
    return path
