"""``dms actor``: send a signed message to any behaviour of this node or another one."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from dms.cli.common import JsonOption, settings
from dms.cli.output import emit_result
from dms.errors import DmsError
from dms.node.client import NodeClient

app = typer.Typer(help="Send signed messages to behaviours (as the user key, via the local node).")

BehaviourArg = Annotated[str, typer.Argument(help="Behaviour path, e.g. /dms/node/peers/list.")]
DestOption = Annotated[
    str | None,
    typer.Option("--dest", help="DID or peer id of the target node (default: this node)."),
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.1, max=3600, help="Seconds to wait for the reply.")
]
PayloadOption = Annotated[
    str | None, typer.Option("--payload", help="The payload as a JSON document.")
]
FieldsArg = Annotated[
    list[str] | None, typer.Argument(help="Payload fields as key=value (values may be JSON).")
]


class PayloadError(DmsError):
    """A --payload or key=value argument that cannot be read."""


def build_payload(payload: str | None, fields: list[str] | None) -> Any:
    """``--payload JSON`` or ``key=value ...`` (not both); ``None`` when neither."""
    if payload is not None and fields:
        raise PayloadError("give either --payload or key=value fields, not both")
    if payload is not None:
        try:
            return json.loads(payload)
        except json.JSONDecodeError as exc:
            raise PayloadError(f"--payload is not JSON: {exc}") from None
    if not fields:
        return None
    out: dict[str, Any] = {}
    for item in fields:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PayloadError(f"{item!r} is not key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command("cmd")
def cmd(
    behaviour: BehaviourArg,
    fields: FieldsArg = None,
    dest: DestOption = None,
    timeout: TimeoutOption = 10.0,
    payload: PayloadOption = None,
    json_out: JsonOption = False,
) -> None:
    """Invoke a behaviour and print its reply."""
    body = build_payload(payload, fields)
    result = NodeClient(settings().home).invoke(behaviour, body, dest=dest, timeout=timeout)
    emit_result(result, json_out, title=behaviour)


@app.command("send")
def send(
    behaviour: BehaviourArg,
    fields: FieldsArg = None,
    dest: DestOption = None,
    timeout: TimeoutOption = 10.0,
    payload: PayloadOption = None,
    json_out: JsonOption = False,
) -> None:
    """Send a message to a behaviour without waiting for a reply."""
    body = build_payload(payload, fields)
    result = NodeClient(settings().home).send(behaviour, body, dest=dest, timeout=timeout)
    emit_result(result, json_out)


@app.command("broadcast")
def broadcast(
    topic: Annotated[str, typer.Argument(help="Gossip topic, e.g. /dms/broadcast.")],
    fields: FieldsArg = None,
    behaviour: Annotated[
        str, typer.Option("--behaviour", help="Behaviour the subscribers run.")
    ] = "/broadcast/hello",
    timeout: TimeoutOption = 10.0,
    payload: PayloadOption = None,
    json_out: JsonOption = False,
) -> None:
    """Publish a message to every node subscribed to TOPIC."""
    body = build_payload(payload, fields)
    result = NodeClient(settings().home).broadcast(topic, behaviour, body, timeout=timeout)
    emit_result(result, json_out)
