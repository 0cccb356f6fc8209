"""Reading the orchestrator's stored rows: what can be read of them, and why the rest cannot.

A row is written by this code, but it is read after upgrades, by hand edits and
after disk trouble: a JSON column that is not JSON, a state this version does not
know, a slot whose lease columns contradict its status. Such a row raised out of
every read of its table, the node's start (``Requester.start``) among them, and
the daemon could not run until someone edited the database. Now each read gives
what it can: the bad column in an empty form and, under :data:`UNREADABLE`, why,
column by column. Two tables are read so: ``deployments`` (:func:`read_row`) and
a data owner's ``mining_sessions`` (:func:`read_session`), each described by a
:class:`Shape`. ``Requester.start`` fails a deployment or session that cannot be
carried on from (only its state, its end and, when they can be read, its events or
progress are written: the unreadable part is left as it is, for whoever looks),
and status and lists show it with the reason. See ``specs/orchestration.md``,
"Restart safety".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from dms.orchestrator.slots import Slot
from dms.orchestrator.states import DeploymentState, SessionPhase
from dms.store.sql import json_value

# The key of a row (a dict) that holds why parts of it could not be read: {column: why};
# absent when all of it could.
UNREADABLE = "unreadable"
# The key of a row that lists the peers its unreadable slots name (absent when none):
# what they hold there is reverted too when the deployment fails (Requester.start).
UNREADABLE_PEERS = "unreadable_peers"


@dataclass(frozen=True)
class Shape:
    """What a table's row must hold to be read: its JSON columns, each with the type its
    value must have (``nullable``: None too; a bad one reads as None, else as the type's
    empty value), its times (``required``: a bad one reads 0.0, else None), its text
    columns, and the column of its state with the values this version knows."""

    json: Mapping[str, type]
    required: tuple[str, ...]
    times: tuple[str, ...]
    texts: tuple[str, ...]
    state: str
    states: frozenset[str]
    nullable: frozenset[str] = frozenset()


DEPLOYMENT_ROW = Shape(
    json={"spec": dict, "slots": list, "events": list},
    required=("created_at",),
    times=("running_at", "ended_at"),
    texts=("name",),
    state="state",
    states=frozenset(s.value for s in DeploymentState),
)
SESSION_ROW = Shape(
    json={"progress": dict, "checkpoint": dict, "result": dict, "labels": list},
    nullable=frozenset({"checkpoint", "result", "labels"}),
    required=("created_at", "updated_at"),
    times=(),
    texts=("algorithm",),
    state="phase",
    states=frozenset(p.value for p in SessionPhase),
)


def describe(problems: Mapping[str, str] | None, whose: str = "its") -> str:
    """Why parts of a row could not be read (its ``UNREADABLE``), as one line ("" if all
    could): ``whose`` names the row the columns are of."""
    return "; ".join(f"{whose} {column} {why}" for column, why in (problems or {}).items())


def unreadable_reason(row: Mapping[str, Any]) -> str:
    """Why parts of ``row`` could not be read, as one line ("" if all could)."""
    return describe(row.get(UNREADABLE))


def read_columns(stored: Mapping[str, Any], shape: Shape) -> tuple[dict[str, Any], dict[str, str]]:
    """A row as read from its table (its JSON columns as their stored text) checked
    against ``shape``: the row, each JSON column parsed and each part that cannot be
    read in its empty form, and why, by column. Only the columns ``stored`` holds are
    read (a read may leave some out)."""
    row = dict(stored)
    problems: dict[str, str] = {}
    for column, kind in sorted(shape.json.items()):
        if column not in row:
            continue
        try:
            value = json_value(row[column])
        except ValueError as exc:
            problems[column] = f"is not JSON ({exc})"
            value = None
        nullable = column in shape.nullable
        if not isinstance(value, kind) and not (value is None and nullable):
            if column not in problems:
                problems[column] = f"is {type(value).__name__}, not {kind.__name__}"
            value = None if nullable else kind()
        row[column] = value
    for column in (*shape.required, *shape.times):
        if column not in row:
            continue
        when = row[column]
        if (when is not None or column in shape.required) and not isinstance(when, int | float):
            problems[column] = f"{when!r} is no time"
            row[column] = 0.0 if column in shape.required else None
    for column in shape.texts:
        if column in row and not isinstance(row[column], str):
            problems[column] = f"{row[column]!r} is no name"
            row[column] = str(row[column])
    if shape.state in row and row[shape.state] not in shape.states:
        problems[shape.state] = f"{row[shape.state]!r} is unknown"
    return row, problems


def read_row(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A deployment's row as read from the table (``dms.store.sql.as_text``), checked
    against :data:`DEPLOYMENT_ROW`. A part that cannot be read is replaced by its empty
    form and named under :data:`UNREADABLE` (absent when every part could be read). The
    slots that :meth:`Slot.from_row` reads are kept, in their stored form; the others
    are left out (and named), the peers they name under :data:`UNREADABLE_PEERS`."""
    row, problems = read_columns(stored, DEPLOYMENT_ROW)
    slots, bad, peers = [], [], set()
    for at, slot in enumerate(row.get("slots") or []):
        try:
            Slot.from_row(slot)
        except (ValueError, KeyError, TypeError) as exc:
            bad.append(f"#{at + 1}: {_said(exc)}")
            peer = slot.get("peer_id") if isinstance(slot, dict) else None
            if isinstance(peer, str) and peer:
                peers.add(peer)
        else:
            slots.append(slot)
    if bad:
        problems["slots"] = "cannot be read (" + "; ".join(bad) + ")"
        row["slots"] = slots
    if peers:
        row[UNREADABLE_PEERS] = sorted(peers)
    if problems:
        row[UNREADABLE] = problems
    return row


class _Progress(BaseModel):
    """What the readers of a session's progress take from it (``dms status``, ``dms
    mine``, the metrics): the rest is shown as stored."""

    model_config = ConfigDict(extra="allow")
    phase: str = ""
    reason: str = ""
    steps: list[dict[str, Any]] = []
    shards: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []


def read_session(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A mining session's row as read from ``mining_sessions`` (any of its columns, by
    ``dms.store.sql.as_text``), checked against :data:`SESSION_ROW`, its progress against
    what its readers take from it; what cannot be read named under :data:`UNREADABLE`."""
    row, problems = read_columns(stored, SESSION_ROW)
    if "progress" in row and "progress" not in problems:
        try:
            _Progress.model_validate(row["progress"])
        except ValidationError as exc:
            problems["progress"] = f"cannot be read ({invalid_said(exc)})"
            row["progress"] = {}
    if problems:
        row[UNREADABLE] = problems
    return row


def invalid_said(exc: ValidationError) -> str:
    """A validation error's first problems, on one line."""
    return "; ".join(
        f"{'.'.join(str(x) for x in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()[:3]
    )


def _said(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r}"
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
