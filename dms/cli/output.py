"""How commands print: rich tables for people, one JSON document for scripts."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

# emoji=False: rich would otherwise render the ":key:" of "did:key:..." as an emoji.
console = Console(emoji=False, highlight=False)
err_console = Console(stderr=True, emoji=False, highlight=False)


def short_peer(peer_id: str | None) -> str:
    """A peer by the last 8 characters of its id, as the deployment's events name it."""
    return f"…{peer_id[-8:]}" if peer_id else ""


def stored_state(state: str, unreadable: str | None) -> str:
    """A stored row's state (a deployment's, a mining session's phase), and whether its
    stored record could be read (``unreadable``: why not; its status says it too)."""
    return f"{state} (unreadable)" if unreadable else state


def emit_json(data: Any) -> None:
    """One JSON document on a line of its own, sent at once: a pipe (``| jq``, a test)
    reads each refresh of ``status --watch --json`` as it is made, not a block later."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def _longest_word(text: str) -> int:
    return max((len(word) for word in text.split()), default=0)


def build_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    whole: Sequence[str] = (),
    hideable: Sequence[str] = (),
    *,
    limit: int | None = None,
    more: str = "--all or --json",
    width: int | None = None,
) -> tuple[Table, list[str]]:
    """A table for a person, and the notes to print under it. No word is ever broken.

    ``whole`` columns (identifiers a person copies into the next command) are never
    wrapped; the others wrap between words only. When the terminal is too narrow for
    every column at its natural width, ``hideable`` columns are left out, the last
    first, and a note says so: a table squeezed to unreadable slivers helps nobody,
    and ``--json`` has everything. If even then a column would have to cut a word,
    each row is shown as a block of ``column  value`` lines instead. With ``limit``,
    only the first ``limit`` rows are shown, and a note says how to see the rest.
    """
    width = width or console.width
    notes: list[str] = []
    if limit is not None and len(rows) > limit:
        notes.append(f"({len(rows) - limit} more not shown: {more})")
        rows = rows[:limit]
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    if not cells:
        notes.append("(none yet)")

    def natural(i: int) -> int:  # content width plus the cell's padding and border
        lines = [columns[i], *(line for row in cells for line in row[i].splitlines())]
        return max(len(line) for line in lines) + 3

    def least(i: int) -> int:  # the narrowest the column gets without cutting a word
        if columns[i] in whole:
            return natural(i)
        return max([_longest_word(columns[i]), *(_longest_word(row[i]) for row in cells)]) + 3

    shown = list(range(len(columns)))
    hidden: list[str] = []
    for name in reversed(hideable):
        if sum(natural(i) for i in shown) + 1 <= width:
            break
        if name in columns:
            shown.remove(columns.index(name))
            hidden.insert(0, name)
    if hidden:
        notes.insert(0, f"({', '.join(hidden)} not shown: widen the terminal or use --json)")
    if sum(least(i) for i in shown) + 1 > width:
        return _stacked(title, [columns[i] for i in shown], [[r[i] for i in shown] for r in cells])
    table = Table(title=title, show_header=True, header_style="bold")
    for i in shown:
        if columns[i] in whole:
            table.add_column(columns[i], no_wrap=True, min_width=natural(i) - 3)
        else:
            table.add_column(columns[i], min_width=least(i) - 3)
    for row in cells:  # Text: a cell says what it holds, brackets too (never markup)
        table.add_row(*(Text(row[i]) for i in shown))
    return table, notes


def _stacked(
    title: str | None, columns: list[str], rows: list[list[str]]
) -> tuple[Table, list[str]]:
    """Each row as a block of ``column  value`` lines: what a table too wide for the
    terminal becomes, so that no value is cut. A table of fields becomes one column:
    each field's name, then its value below it, indented."""
    if columns == ["field", "value"]:
        table = Table(title=title, show_header=False)
        table.add_column("field")
        for name, value in rows:
            indented = "\n".join(f"  {line}" for line in value.splitlines())
            table.add_row(Text.assemble((name, "bold"), "\n" if indented else "", indented))
        return table, []
    table = Table(title=title, show_header=False)
    table.add_column("column", style="bold", no_wrap=True)
    table.add_column("value")
    for n, row in enumerate(rows):
        if n:
            table.add_section()
        for name, value in zip(columns, row, strict=True):
            table.add_row(name, Text(value))
    return table, []


def emit_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    whole: Sequence[str] = (),
    hideable: Sequence[str] = (),
    *,
    limit: int | None = None,
    more: str = "--all or --json",
) -> None:
    """Print :func:`build_table`'s table and its notes."""
    table, notes = build_table(title, columns, rows, whole, hideable, limit=limit, more=more)
    console.print(table)
    for note in notes:
        console.print(note)


def ago(at: float | None, now: float | None = None) -> str:
    """A Unix time as people read it: "12 s ago", "3 min ago", "5 h ago", "2 d ago",
    "in 30 s" (the future), or the ISO time a week or more away."""
    if at is None:
        return ""
    now = time.time() if now is None else now
    age = now - at
    if abs(age) >= 7 * 86400:
        return iso(at)
    span = abs(age)
    if span < 60:
        amount = f"{span:.0f} s"
    elif span < 3600:
        amount = f"{span / 60:.0f} min"
    elif span < 86400:
        amount = f"{span / 3600:.0f} h"
    else:
        amount = f"{span / 86400:.0f} d"
    return f"in {amount}" if age < -0.5 else f"{amount} ago"


def iso(at: float | None) -> str:
    """A Unix time as local ISO 8601 to the second, with its UTC offset."""
    if at is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(at))


def duration(seconds: float | None) -> str:
    """A length of time: "45 s", "12 min", "3 h 5 min", "2 d 4 h"."""
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def emit_fields(data: dict[str, Any], title: str | None = None) -> None:
    emit_table(title, ["field", "value"], [(k, cell(v, k)) for k, v in data.items()])


def say(text: str) -> None:
    """Text from elsewhere (an event, a peer's reason, a program's line), wrapped at the
    console's width between words; brackets in it printed, never read as markup."""
    console.print(text, highlight=False, markup=False)


def say_line(text: str, err: bool = False) -> None:
    """One line for scripts and logs; on a terminal, wrapped between words (the terminal
    would cut a word, or a path, at its edge)."""
    out = err_console if err else console
    out.print(escape(between_words(text, out)), highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """One line for scripts and logs; on a terminal, wrapped between words (the terminal
    would cut a word at its edge)."""
    wrapped = between_words(f"error: {message}", err_console).removeprefix("error: ")
    err_console.print(f"[bold red]error:[/] {escape(wrapped)}", highlight=False, soft_wrap=True)


def between_words(text: str, out: Console) -> str:
    """``text`` wrapped between words at a terminal's width (unchanged elsewhere). A
    word longer than the terminal, a deep path or an address, stays whole: rich would
    fold it, and a copy of it would no longer paste."""
    if not out.is_terminal:
        return text
    return "\n".join(
        textwrap.fill(line, out.width, break_long_words=False, break_on_hyphens=False)
        for line in text.splitlines() or [""]
    )


def jsonable(value: Any) -> Any:
    """Reply data as JSON can hold it: bytes become hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


# A Unix time in seconds, as the store keeps them (after 2001-09-09).
UNIX_TIME_MIN = 1e9


def cell(value: Any, key: str = "") -> str:
    """One value as a table cell people read: lists one item a line, mappings one
    ``key: value`` a line, Unix times (``*_at``) relative or ISO, long multiaddrs split
    before their ``/p2p/`` part (so a line never has to cut one)."""
    value = jsonable(value)
    if key.endswith("_at") and isinstance(value, int | float) and value > UNIX_TIME_MIN:
        return ago(value)
    if isinstance(value, list):
        if all(not isinstance(v, dict | list) for v in value):
            return "\n".join(cell(v) for v in value)
        return json.dumps(value)
    if isinstance(value, dict):
        return "\n".join(
            f"{k}: {json.dumps(v) if isinstance(v, dict | list) else cell(v, str(k))}"
            for k, v in value.items()
        )
    if value is None:
        return ""
    text = str(value)
    if len(text) > 60 and text.startswith("/") and "/p2p/" in text:
        head, _, peer = text.partition("/p2p/")
        return f"{head}\n/p2p/{peer}"
    return text


def emit_result(result: Any, json_out: bool, title: str | None = None) -> None:
    """Print a behaviour's reply: fields, a table of records, or a plain value."""
    if json_out:
        emit_json(jsonable(result))
    elif isinstance(result, dict):
        emit_table(title, ["field", "value"], [(k, cell(v, k)) for k, v in result.items()])
    elif isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        columns = list(dict.fromkeys(k for r in result for k in r))
        emit_table(title, columns, [[cell(r.get(c), c) for c in columns] for r in result])
    elif isinstance(result, list):
        emit_table(title, ["value"], [[cell(r)] for r in result])
    else:
        console.print(cell(result) if result is not None else "ok")


@contextmanager
def progress_bar(enabled: bool, label: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A transient progress bar on a terminal; ``update(completed, detail, total)``
    moves it. Elsewhere (a pipe, a file) nothing: rich's bar left an empty line there."""
    if not enabled or not console.is_terminal:
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
