"""Reading a deployment's stored row: what can be read of it, and why the rest cannot.

A row is written by this code, but it is read after upgrades, by hand edits and
after disk trouble: a JSON column that is not JSON, a state this version does not
know, a slot whose lease columns contradict its status. Such a row raised out of
every read of the table, the node's start (``Requester.start``) among them, and
the daemon could not run until someone edited the database. Now each read gives
what it can: the bad column in an empty form and, under :data:`UNREADABLE`, why,
column by column. ``Requester.start`` fails such a deployment (only its state,
its end time and, when they can be read, its events are written: the unreadable
part is left as it is, for whoever looks), and status and lists show it with the
reason. See ``specs/orchestration.md``, "Restart safety".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dms.orchestrator.slots import Slot
from dms.orchestrator.states import DeploymentState

# The key of a row (a dict) that holds why parts of it could not be read: {column: why};
# absent when all of it could.
UNREADABLE = "unreadable"
# The key of a row that lists the peers its unreadable slots name (absent when none):
# what they hold there is reverted too when the deployment fails (Requester.start).
UNREADABLE_PEERS = "unreadable_peers"
# A JSON column's value when it cannot be read (what status and lists show in its place).
_EMPTY: dict[str, type] = {"spec": dict, "slots": list, "events": list}
_STATES = frozenset(s.value for s in DeploymentState)


def unreadable_reason(row: Mapping[str, Any]) -> str:
    """Why parts of ``row`` could not be read, as one line ("" if all could)."""
    problems: dict[str, str] = row.get(UNREADABLE) or {}
    return "; ".join(f"its {column} {why}" for column, why in problems.items())


def read_row(stored: Mapping[str, Any], json_columns: frozenset[str]) -> dict[str, Any]:
    """A deployment's row as read from the table, its ``json_columns`` given as their
    stored text: each parsed, and checked for the shape every reader expects. A part
    that cannot be read is replaced by its empty form and named under
    :data:`UNREADABLE` (absent when every part could be read). The slots that
    :meth:`Slot.from_row` reads are kept, in their stored form; the others are left
    out (and named), the peers they name under :data:`UNREADABLE_PEERS`."""
    row = dict(stored)
    problems: dict[str, str] = {}
    for column in sorted(json_columns):
        text = row.get(column)
        try:
            value = json.loads(text) if isinstance(text, str | bytes) else text
        except ValueError as exc:
            problems[column] = f"is not JSON ({exc})"
            value = None
        empty = _EMPTY.get(column)
        if empty is not None and not isinstance(value, empty):
            if column not in problems:
                problems[column] = f"is {type(value).__name__}, not {empty.__name__}"
            value = empty()
        row[column] = value
    for column in ("created_at", "running_at", "ended_at"):
        when = row.get(column)
        if (when is not None or column == "created_at") and not isinstance(when, int | float):
            problems[column] = f"{when!r} is no time"
            row[column] = 0.0 if column == "created_at" else None
    if not isinstance(row.get("name"), str):
        problems["name"] = f"{row.get('name')!r} is no name"
        row["name"] = str(row.get("name"))
    if row.get("state") not in _STATES:
        problems["state"] = f"{row.get('state')!r} is unknown"
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


def _said(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r}"
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
