"""``dms sim``: networks of real nodes on this machine, for scenarios and for trying dms.

``dms sim run SCENARIO.yaml`` starts the scenario's nodes, plays its timeline
(jobs, kills, restarts, partitions, link faults), prints what happens as it
happens and a summary at the end, and exits non-zero naming each expectation
that failed. See ``specs/sim.md`` and ``examples/sim/``.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from dms.cli.common import JsonOption
from dms.cli.output import console, emit_json, emit_table, err_console
from dms.errors import DmsError

app = typer.Typer(help="Simulated networks of real nodes: scenarios, faults, scale.")

ScenarioArg = Annotated[Path, typer.Argument(help="A scenario file (YAML or JSON).")]
ReportOption = Annotated[
    Path | None, typer.Option("--report", help="Write DIR/report.json.", metavar="DIR")
]
ModeOption = Annotated[
    str | None,
    typer.Option("--mode", help="threads, processes, memory or netns (default: the scenario's)."),
]
RootOption = Annotated[
    Path | None,
    typer.Option(
        "--root", help="Keep the nodes' homes here (default: a temp folder).", metavar="DIR"
    ),
]


class SimFailed(DmsError):
    """Expectations that did not hold; the message names them."""


class Interrupted(DmsError):
    exit_code = 130


IN_PROCESS = ("threads", "memory")  # the modes whose nodes run in this process


@contextmanager
def quiet_logging(root: Path, mode: str) -> Iterator[None]:
    """The nodes of this process log to ROOT/sim.log, not over the timeline.

    py-libp2p detaches its ``libp2p`` logger when it is first imported, which the
    backends whose nodes run here (``IN_PROCESS``) do after this point: imported here
    first, so the logger sent to the file below stays so (before, its warnings and
    errors, a killed node's failed dials, went to stderr bare through logging's last
    resort, between the timeline's lines). The others' nodes are processes, and this
    one loads no py-libp2p."""
    if mode in IN_PROCESS:
        importlib.import_module("libp2p")  # its logging set up now, not under the scenario

    root.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(root / "sim.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger, libp2p = logging.getLogger(), logging.getLogger("libp2p")
    level, propagate = logger.level, libp2p.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    libp2p.propagate = True  # py-libp2p detaches its logger at import
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        libp2p.propagate = propagate
        handler.close()


TEXT_COLUMN = 20  # where the runner's line text starts: f"{t:7.1f}s  {action:<9} "


def run(
    path: ScenarioArg,
    json_out: JsonOption = False,
    report_dir: ReportOption = None,
    mode: ModeOption = None,
    root: RootOption = None,
) -> None:
    """Run a scenario: nodes, a timeline of jobs and faults, and expectations."""
    import tempfile

    from dms.sim.runner import run_scenario
    from dms.sim.scenario import load_scenario

    scenario = load_scenario(path, mode)
    keep = root is not None
    work = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="dms-sim-"))
    out = err_console if json_out else console

    def say(line: str) -> None:
        # Wrapped between words under the text column ("   12.3s  job       "), never cut.
        wrapped = textwrap.fill(
            line,
            width=max(out.width, 40),
            subsequent_indent=" " * TEXT_COLUMN,
            break_long_words=False,
            break_on_hyphens=False,
        )
        out.print(wrapped, highlight=False, soft_wrap=True)

    try:
        with quiet_logging(work, scenario.mode):
            report = run_scenario(scenario, root=work, say=say)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: every node was stopped") from None
    data = report.as_dict()
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    if json_out:
        emit_json(data)
    else:
        show_summary(data)
    if report.ok and not keep:
        shutil.rmtree(work, ignore_errors=True)
    elif not report.ok:
        err_console.print(f"node homes and logs kept in {work}", highlight=False)
    if not report.ok:
        failed = report.failed
        names = "; ".join(f"{c.name} ({c.detail})" for c in failed)
        raise SimFailed(f"{len(failed)} expectation(s) failed: {names}")


def show_summary(data: dict[str, Any]) -> None:
    from dms.sim.runner import Report, summary_rows

    report = Report(data["scenario"], data["mode"], data["nodes"], data["started_at"])
    report.jobs, report.batches = data["jobs"], data["batches"]
    rows = summary_rows(report)
    if rows:
        emit_table("jobs", ["job", "kind", "state", "placed ms", "note"], rows)
    placement = data["placement"]
    if placement.get("count"):
        console.print(
            f"placement: {placement['count']} job(s), p50 {placement['p50_ms']:g} ms, "
            f"p95 {placement['p95_ms']:g} ms",
            highlight=False,
        )
    emit_table(
        "expectations",
        ["expectation", "result", "detail"],
        [[e["name"], "ok" if e["ok"] else "FAILED", e["detail"]] for e in data["expectations"]],
    )
    verdict = "all expectations hold" if data["ok"] else f"{len(data['failed'])} failed"
    console.print(
        f"{data['scenario']}: {data['nodes']} nodes ({data['mode']}), "
        f"{data['duration_s']:.1f} s: {verdict}",
        highlight=False,
    )


def up(
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=200, help="How many nodes.")] = 3,
    mode: Annotated[
        str, typer.Option("--mode", help="processes (a dms run each) or threads (one process).")
    ] = "processes",
    cpu: Annotated[str, typer.Option("--cpu", help="What each node onboards.")] = "1",
    ram: Annotated[str, typer.Option("--ram", help="What each node onboards.")] = "1",
    disk: Annotated[str, typer.Option("--disk", help="What each node onboards.")] = "1",
    root: RootOption = None,
    json_out: JsonOption = False,
) -> None:
    """Start a local network and keep it running: use any node with the normal CLI
    (DMS_HOME=<its home> dms ...). Ctrl-C stops them all."""
    import os
    import secrets
    import tempfile

    from pydantic import ValidationError

    from dms.cli.signals import stop_signals
    from dms.sim.faults import FaultPlan
    from dms.sim.runner import Runner, make_backend
    from dms.sim.scenario import Scenario, ScenarioError

    if mode not in ("processes", "threads"):
        raise ScenarioError(f"--mode: {mode!r}: use processes or threads")
    try:
        scenario = Scenario.model_validate(
            {
                "name": "up",
                "mode": mode,
                "nodes": [
                    {
                        "name": "node",
                        "count": nodes,
                        "onboard": {"cpu": cpu, "ram": ram, "disk": disk},
                    }
                ],
            }
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        raise ScenarioError(f"--{err['loc'][-1]}: {message}") from None
    given = os.environ.get("DMS_PASSPHRASE")
    passphrase = given or secrets.token_urlsafe(12)
    work = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="dms-sim-"))
    out = err_console if json_out else console
    with stop_signals() as signals:
        faults = FaultPlan()
        backend = make_backend(scenario, work, faults, passphrase=passphrase, serve_api=True)
        runner = Runner(scenario, backend, faults, lambda line: out.print(line, highlight=False))
        try:
            with quiet_logging(work, mode):
                runner.setup()
                rows = [backend.describe(name) for name in backend.names]
                if json_out:
                    emit_json(
                        {"mode": mode, "root": str(work), "passphrase": passphrase, "nodes": rows}
                    )
                else:
                    show_network(rows, mode, passphrase if not given else None)
                sys.stdout.flush()  # scripts wait for these lines
                signals.wait()  # the handler takes no lock (dms.cli.signals)
                out.print("stopping every node ...", highlight=False)
        finally:
            backend.stop()
            faults.close()
    out.print(f"{len(rows)} node(s) stopped; their homes stay in {work}", highlight=False)


def show_network(rows: list[dict[str, Any]], mode: str, passphrase: str | None) -> None:
    console.print(f"{len(rows)} node(s) running ({mode}); Ctrl-C stops them all.", highlight=False)
    if passphrase is not None:
        console.print(
            f"Their keys are sealed with: export DMS_PASSPHRASE={passphrase}", highlight=False
        )
    for row in rows:
        console.print(
            f"  {row['name']:<8} {row.get('api', '')}  DMS_HOME={row['home']}",
            highlight=False,
            soft_wrap=True,
        )
    first = rows[0]["home"]
    console.print(f"Try:  DMS_HOME={first} dms peers list", highlight=False, soft_wrap=True)


app.command("run")(run)
app.command("up")(up)
