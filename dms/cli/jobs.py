"""``dms job validate``, ``dms deploy`` and ``dms deployment ...``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dms.actor import ErrorCode, RemoteError
from dms.cli.actor import TimeoutOption
from dms.cli.common import JsonOption, settings
from dms.cli.events import EventFeed
from dms.cli.output import (
    ago,
    console,
    emit_json,
    emit_result,
    emit_table,
    error,
    jsonable,
    say,
    short_peer,
    stored_state,
)
from dms.cli.waiting import Waiting, placement_hint
from dms.node.client import NodeClient
from dms.orchestrator.states import DEPLOYMENT

if TYPE_CHECKING:
    from dms.jobs.spec import DeploymentSpec

job_app = typer.Typer(help="Job files: check them before deploying.")
deployment_app = typer.Typer(help="Deployments this node requested.")

FileArg = Annotated[Path, typer.Argument(help="A job file (YAML or JSON).")]
IdArg = Annotated[str, typer.Argument(help="Deployment id.")]
AllOption = Annotated[bool, typer.Option("--all", help="Every row, not the first 20.")]
ROWS = 20  # rows a long table shows without --all


def _limit(every: bool) -> int | None:
    return None if every else ROWS


def _load_job(path: Path, json_out: bool) -> DeploymentSpec:
    """The job file's spec; an invalid one fails naming every problem, each with its
    field and line, one ``error:`` line each (with ``json_out`` also on stdout:
    ``{"valid": false, "errors": [...]}``). ``dms job validate`` and ``dms deploy``."""
    from dms.jobs.spec import JobSpecError, load_spec  # the executors' checks: NumPy, TenSEAL

    try:
        return load_spec(path)
    except JobSpecError as exc:
        if json_out:
            emit_json({"valid": False, "errors": exc.problems})
        for problem in exc.problems[:-1]:
            error(problem)
        raise JobSpecError(exc.problems[-1]) from None


@job_app.command("validate")
def validate(path: FileArg, json_out: JsonOption = False) -> None:
    """Check a job file; errors name the field and the line, every one of them (with
    --json also on stdout: {"valid": false, "errors": [...]})."""
    spec = _load_job(path, json_out)
    summary = {
        "valid": True,
        "name": spec.name,
        "strategy": spec.strategy,
        "allocations": [
            {"name": a.name, "executor": a.executor, "count": a.count, **a.resources.human()}
            for a in spec.allocations
        ],
        "deadline_s": spec.deadline_s,
    }
    emit_result(summary, json_out, title=str(path))


def _client() -> NodeClient:
    return NodeClient(settings().home)


def _ask(what: str, deployment_id: str, timeout: float, client: NodeClient | None = None) -> Any:
    """``/dms/node/deployment/<what>`` for one deployment; one this node does not have
    is said with where its deployments' ids are, its code kept (``not_found: ...``, as
    every error reply prints: scripts read it)."""
    try:
        return (client or _client()).invoke(
            f"/dms/node/deployment/{what}", {"id": deployment_id}, timeout=timeout
        )
    except RemoteError as exc:
        if exc.code != ErrorCode.NOT_FOUND:
            raise
        where = f"{exc.reason} on this node: 'dms deployment list' lists its deployments"
        raise RemoteError(exc.code, where, exc.rule) from None


def _print_event(event: dict[str, Any]) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["at"]))
    say(f"{stamp}  {event['what']}")


def _show_status(status: dict[str, Any], json_out: bool, every: bool = False) -> None:
    if json_out:
        emit_json(jsonable(status))
        return
    head = {k: status[k] for k in ("id", "name", "state", "strategy") if k in status}
    emit_result(head, False, title="deployment")
    if status.get("unreadable"):  # parts of its stored record (dms.orchestrator.stored)
        say(f"its stored record could not be read: {status['unreadable']}")
    slots = status["slots"]
    emit_table(
        "allocations",
        ["slot", "status", "peer", "attempts"],
        [[s["slot"], s["status"], s["peer_id"] or "", s["attempts"]] for s in slots],
        whole=["slot", "peer"],
        hideable=["attempts"],
        limit=_limit(every),
        more=f"'dms deployment status {status.get('id', 'ID')} --all' or --json",
    )
    # Errors are sentences: below the table, where they wrap between words.
    for s in slots[: _limit(every)]:
        if s.get("error"):
            say(f"{s['slot']}: {s['error']}")


def deploy(
    path: FileArg,
    follow: Annotated[
        bool, typer.Option("--follow", help="Show progress until the deployment ends.")
    ] = False,
    timeout: TimeoutOption = 10.0,
    json_out: JsonOption = False,
) -> None:
    """Place a job on the network: bid request, bids, commit, allocate. An invalid job
    file is refused naming every problem, as 'dms job validate' does."""
    spec = _load_job(path, json_out)
    client = _client()
    created = client.invoke(
        "/dms/node/deployment/new", {"spec": spec.model_dump(mode="json")}, timeout=timeout
    )
    deployment_id = created["id"]
    if not follow:
        if json_out:
            emit_json(created)
        else:
            hint = f"'dms deployment status {deployment_id}' shows its progress"
            console.print(f"deployment {deployment_id} submitted; {hint}")
        return
    status: dict[str, Any] = {}
    waiting = Waiting(client, deployment_id, say)
    feed = EventFeed()
    while True:
        status = _ask("status", deployment_id, timeout, client)
        if not json_out:
            for line in feed.lines(status.get("events", [])):
                say(line)
                waiting.news()
        if status["state"] in DEPLOYMENT.terminal:
            break
        if not json_out:
            waiting.tick()  # nothing new for a few seconds: say what it waits for
        time.sleep(0.2)
    _show_status(status, json_out)
    if status["state"] != "completed":
        errors = " ".join(s.get("error") or "" for s in status["slots"])
        hint = placement_hint(errors)
        if hint and not json_out:
            console.print(hint, highlight=False)
        raise typer.Exit(1)


@deployment_app.command("list")
def list_deployments(
    every: AllOption = False, timeout: TimeoutOption = 10.0, json_out: JsonOption = False
) -> None:
    """Deployments this node requested, newest first."""
    rows = _client().invoke("/dms/node/deployment/list", timeout=timeout)
    if json_out:
        emit_json(jsonable(rows))
        return
    if not rows:
        console.print(
            "no deployments yet: dms deploy JOB.yaml places one (so does a dms mine without "
            "--local)",
            highlight=False,
        )
        return
    now = time.time()
    emit_table(
        "deployments",
        ["id", "name", "state", "allocations", "created"],
        [
            [
                r["id"],
                r["name"],
                stored_state(r["state"], r.get("unreadable")),
                r["allocations"],
                ago(r["created_at"], now),
            ]
            for r in rows
        ],
        whole=["id"],
        hideable=["allocations", "created"],
        limit=_limit(every),
    )


@deployment_app.command("status")
def status(
    deployment_id: IdArg,
    every: AllOption = False,
    timeout: TimeoutOption = 10.0,
    json_out: JsonOption = False,
) -> None:
    """State of a deployment and of each allocation."""
    _show_status(_ask("status", deployment_id, timeout), json_out, every)


@deployment_app.command("logs")
def logs(deployment_id: IdArg, timeout: TimeoutOption = 20.0, json_out: JsonOption = False) -> None:
    """The deployment's events and each allocation's log lines."""
    result = _ask("logs", deployment_id, timeout)
    if json_out:
        emit_json(jsonable(result))
        return
    for event in result["events"]:
        _print_event(event)
    for slot, lines in result["logs"].items():
        say(f"--- {slot}")
        for line in lines:
            say(line)


@deployment_app.command("manifest")
def manifest(
    deployment_id: IdArg,
    every: AllOption = False,
    timeout: TimeoutOption = 10.0,
    json_out: JsonOption = False,
) -> None:
    """Where each allocation runs, and why each bid won or lost."""
    result = _ask("manifest", deployment_id, timeout)
    if json_out:
        emit_json(jsonable(result))
        return
    emit_table(
        f"deployment {result['id']} ({result['state']})",
        ["slot", "status", "peer", "lease"],
        [
            [s["slot"], s["status"], s["peer_id"] or "", s["lease_id"] or ""]
            for s in result["slots"]
        ],
        whole=["slot", "peer", "lease"],
        hideable=["lease"],
        limit=_limit(every),
    )
    bids = result["bids"]
    emit_table(
        "bids (peers by the end of their id)",
        ["slot", "peer", "outcome", "price", "reason"],
        [[b["slot"], short_peer(b["peer_id"]), b["outcome"], b["price"], b["reason"]]
         for b in bids],
        whole=["slot", "peer"],
        limit=_limit(every),
    )  # fmt: skip


@deployment_app.command("shutdown")
def shutdown(
    deployment_id: IdArg, timeout: TimeoutOption = 10.0, json_out: JsonOption = False
) -> None:
    """Stop every allocation of a deployment and release what it holds."""
    result = _ask("shutdown", deployment_id, timeout)
    _show_status(result, json_out)
