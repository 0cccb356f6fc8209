"""``dms mine collab``: joint k-means with other data owners, by secure aggregation.

One owner proposes (``propose``): the owners' peer ids, k, the announced
number of rounds, the threshold, and its own CSV. Its node places the
aggregator by the ordinary bid rounds and writes the proposal to a file that
the other owners receive out of band. Each of them joins with its own CSV on its
own node (``join FILE --data``). ``result ID`` writes this owner's labels and
the shared centroids once the rounds are done (``specs/mining.md``,
"Collaborative k-means").
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from dms.actor import RemoteError
from dms.cli.common import JsonOption, settings
from dms.cli.output import console, emit_fields, emit_json
from dms.errors import DmsError
from dms.node.client import NodeClient, running_node
from dms.orchestrator.states import COLLAB

app = typer.Typer(help="Joint k-means with other data owners (secure aggregation).")


class CollabError(DmsError):
    pass


def _node() -> NodeClient:
    home = settings().home
    client = running_node(home)
    if client is None:
        raise CollabError(f"no node is running for {home}: start one with 'dms run'")
    return client


def _invoke(client: NodeClient, behaviour: str, payload: dict[str, Any]) -> Any:
    try:
        return client.invoke(behaviour, payload, timeout=60)
    except RemoteError as exc:
        raise CollabError(f"{exc.code}: {exc.reason}") from None


@app.command("propose")
def propose(
    data: Annotated[Path, typer.Option("--data", help="this owner's CSV (stays on its node)")],
    owners: Annotated[
        str, typer.Option("--owners", help="the other owners' peer ids, comma-separated")
    ],
    k: Annotated[int, typer.Option("--k", help="clusters")] = 3,
    rounds: Annotated[int, typer.Option("--rounds", help="announced number of rounds")] = 10,
    threshold: Annotated[
        int | None, typer.Option("--threshold", help="owners needed each round (default: most)")
    ] = None,
    init: Annotated[
        str,
        typer.Option(
            "--init",
            help="moments: drawn around the union's mean and spread (reveals those); "
            "supplied: the centroids in --centroids (reveals them to every owner)",
        ),
    ] = "moments",
    centroids: Annotated[
        Path | None, typer.Option("--centroids", help="CSV of k initial centroids")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    epsilon: Annotated[
        float | None, typer.Option("--epsilon", help="differential privacy per round")
    ] = None,
    delta: Annotated[float, typer.Option("--delta")] = 1e-5,
    clip: Annotated[float, typer.Option("--clip", help="row norm bound for privacy")] = 10.0,
    out: Annotated[
        Path | None, typer.Option("--out", help="where to write the proposal for the others")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Propose a collaboration and join it with this node's CSV."""
    from dms.mining.collab import Init, Privacy, Proposal  # NumPy: only for this command
    from dms.mining.data import read_table
    from dms.mining.errors import MiningError

    client = _node()
    me = client.node_peer_id
    others = [o.strip() for o in owners.split(",") if o.strip() and o.strip() != me]
    every = [me, *others]
    try:
        a = read_table(data).features.shape[1]
        grid = read_table(centroids).features.tolist() if centroids is not None else None
        proposal = Proposal(
            collab_id=f"collab-{secrets.token_hex(6)}",
            owners=every,
            a=a,
            k=k,
            rounds=rounds,
            threshold=threshold if threshold is not None else len(every) // 2 + 1,
            init=Init(init),
            centroids=grid,
            seed=seed,
            privacy=None if epsilon is None else Privacy(epsilon=epsilon, delta=delta, clip=clip),
        )
    except (MiningError, ValueError) as exc:
        first = str(exc).splitlines()[-1 if isinstance(exc, ValidationError) else 0]
        raise CollabError(f"the proposal cannot be used: {first.strip()}") from None
    body = proposal.model_dump(mode="json")
    # The node reads the file: a path as the user typed it was relative to the node's
    # own working folder ('bad_payload: mine.csv: no such file' for a file right here).
    payload = {"proposal": body, "data": str(data.resolve())}
    answer = _invoke(client, "/dms/node/collab/propose", payload)
    path = out or Path(f"{proposal.collab_id}.json")
    path.write_text(json.dumps({"proposer": me, "proposal": body}, indent=1) + "\n")
    shown = {**answer, "proposal_file": str(path), "owners": len(every)}
    if as_json:
        emit_json(shown)
        return
    emit_fields(shown, "collaboration proposed")
    console.print(f"each other owner joins with: dms mine collab join {path} --data THEIR.csv")


@app.command("join")
def join(
    proposal_file: Annotated[Path, typer.Argument(help="the proposal file the proposer sent")],
    data: Annotated[Path, typer.Option("--data", help="this owner's CSV (stays on its node)")],
    as_json: JsonOption = False,
) -> None:
    """Join a proposed collaboration with this node's CSV."""
    try:
        announced = json.loads(proposal_file.read_text())
        payload = {
            "proposal": announced["proposal"],
            "proposer": announced["proposer"],
            "data": str(data.resolve()),  # read by the node, from its own folder
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CollabError(f"{proposal_file}: not a proposal file ({exc})") from None
    answer = _invoke(_node(), "/dms/node/collab/join", payload)
    if as_json:
        emit_json(answer)
    else:
        emit_fields(answer, "joined")


@app.command("result")
def result(
    collab_id: Annotated[str, typer.Argument(help="the collaboration's id")],
    out: Annotated[
        Path | None, typer.Option("--out", help="write labels.csv and result.json here")
    ] = None,
    wait: Annotated[float, typer.Option("--wait", help="seconds to wait for the end")] = 0.0,
    as_json: JsonOption = False,
) -> None:
    """This owner's labels and the shared centroids, once the rounds are done."""
    client = _node()
    deadline = time.monotonic() + wait
    while True:
        answer = _invoke(client, "/dms/node/collab/result", {"collab_id": collab_id})
        ended = answer["phase"] in COLLAB.terminal
        if ended or time.monotonic() >= deadline:
            break
        # A local call: asked 4 times a second, the result shows within 0.25 s of the
        # end (once a second, 0.5 s late on average), never past the --wait deadline.
        time.sleep(min(0.25, max(deadline - time.monotonic(), 0.0)))
    if answer["phase"] == "failed":
        raise CollabError(f"collaboration failed: {answer['session'].get('reason')}")
    found = answer.get("result")
    if found is not None and out is not None:
        from dms.mining.data import write_labels

        out.mkdir(parents=True, exist_ok=True)
        write_labels(out / "labels.csv", list(found["labels"]))
        summary = {k: v for k, v in found.items() if k != "labels"}
        (out / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
    shown: dict[str, Any] = {"collab_id": collab_id, "phase": answer["phase"]}
    if found is not None:
        shown.update(
            rounds=found["rounds"],
            records=len(found["labels"]),
            dropped=[f"{d['owner']} (round {d['round']})" for d in found["dropped"]],
            centroids=[[round(x, 4) for x in row] for row in found["centroids"]],
        )
    if answer["session"]:
        shown["session"] = {k: answer["session"].get(k) for k in ("phase", "round", "reason")}
    # A wait that ended without this owner's result is a failure, with its reason (the
    # status is shown first, so the user sees where the collaboration stands).
    missing = _no_result(answer, wait) if found is None and wait > 0 else None
    if as_json:
        emit_json({**answer, "out": str(out) if out else None, "error": missing})
    else:
        emit_fields(shown, "collaboration")
    if missing is not None:
        raise CollabError(missing)


def _no_result(answer: dict[str, Any], wait: float) -> str:
    """Why ``result --wait`` ended without this owner's result."""
    session = answer["session"] or {}
    if answer["phase"] in COLLAB.terminal:
        return f"the collaboration is {answer['phase']} but this node holds no result"
    where = f"phase {session.get('phase') or answer['phase']}"
    if session.get("round") is not None:
        where += f", round {session['round']}"
        where += f" of {session['rounds']}" if session.get("rounds") else ""
    why = f"no result after waiting {wait:g} s: the collaboration is still at {where}"
    losses = session.get("aggregator_losses") or []
    if losses:  # the round waits for a new aggregator: say why the last one went
        why += f"; its aggregator was lost {len(losses)} time(s), last: {losses[-1]['reason']}"
    return why
