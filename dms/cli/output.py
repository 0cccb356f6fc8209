"""How commands print: rich tables for people, one JSON document for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# emoji=False: rich would otherwise render the ":key:" of "did:key:..." as an emoji.
console = Console(emoji=False, highlight=False)
err_console = Console(stderr=True, emoji=False, highlight=False)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


def emit_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    whole: Sequence[str] = (),
    hideable: Sequence[str] = (),
) -> None:
    """A table for a person.

    ``whole`` columns (identifiers a person copies into the next command) are never
    wrapped. When the terminal is too narrow for every column at its natural width,
    ``hideable`` columns are left out, the last first, and a note says so: a table
    squeezed to unreadable slivers helps nobody, and ``--json`` has everything.
    """
    cells = [["" if v is None else str(v) for v in row] for row in rows]

    def natural(i: int) -> int:  # content width plus the cell's padding and border
        return max([len(columns[i]), *(len(row[i]) for row in cells)]) + 3

    shown = list(range(len(columns)))
    hidden: list[str] = []
    for name in reversed(hideable):
        if sum(natural(i) for i in shown) + 1 <= console.width:
            break
        if name in columns:
            shown.remove(columns.index(name))
            hidden.insert(0, name)
    table = Table(title=title, show_header=True, header_style="bold")
    for i in shown:
        if columns[i] in whole:
            table.add_column(columns[i], no_wrap=True, min_width=natural(i) - 3)
        else:
            table.add_column(columns[i], overflow="fold")
    for row in cells:
        table.add_row(*(row[i] for i in shown))
    console.print(table)
    if hidden:
        console.print(f"({', '.join(hidden)} not shown: widen the terminal or use --json)")


def emit_fields(data: dict[str, Any], title: str | None = None) -> None:
    emit_table(title, ["field", "value"], [(k, v) for k, v in data.items()])


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def jsonable(value: Any) -> Any:
    """Reply data as JSON can hold it: bytes become hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(jsonable(value))
    return "" if value is None else str(jsonable(value))


def emit_result(result: Any, json_out: bool, title: str | None = None) -> None:
    """Print a behaviour's reply: fields, a table of records, or a plain value."""
    if json_out:
        emit_json(jsonable(result))
    elif isinstance(result, dict):
        emit_table(title, ["field", "value"], [(k, _cell(v)) for k, v in result.items()])
    elif isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        columns = list(dict.fromkeys(k for r in result for k in r))
        emit_table(title, columns, [[_cell(r.get(c)) for c in columns] for r in result])
    elif isinstance(result, list):
        emit_table(title, ["value"], [[_cell(r)] for r in result])
    else:
        console.print(_cell(result) if result is not None else "ok")


@contextmanager
def progress_bar(enabled: bool, label: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A transient progress bar; ``update(completed, detail, total)`` moves it."""
    if not enabled:
        yield lambda *a, **k: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=total, detail="")

        def update(completed: int, detail: str = "", total: int | None = None) -> None:
            progress.update(
                task, completed=completed, detail=detail, **({"total": total} if total else {})
            )

        yield update
