"""How the command lists of ``dms --help`` read at 80 columns."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import typer

from dms.cli.app import build_app


def commands(command: typer.core.TyperGroup, path: str) -> list[tuple[str, object]]:
    found = []
    for name, sub in (getattr(command, "commands", None) or {}).items():
        found.append((f"{path} {name}", sub))
        found += commands(sub, f"{path} {name}")
    return found


def test_every_listed_summary_is_one_paragraph_on_its_own_lines() -> None:
    """A docstring's first paragraph wraps in the source; listed as it was, a group's
    command list broke the sentence where the source did ('amounts (the' / 'ones
    not given...')."""
    every = commands(typer.main.get_command(build_app()), "dms")
    assert len(every) > 40
    for path, command in every:
        listed = command.short_help or command.help or ""  # type: ignore[attr-defined]
        assert "\n" not in listed.strip(), f"{path}: {listed!r}"


@pytest.mark.parametrize(
    ("group", "sentence"),
    [
        ((), "run again to change any of the amounts (the ones not given stay as they are)"),
        (("config",), "variables; while this home's node runs, the settings it runs with"),
    ],
)
def test_a_listed_summary_wraps_at_the_terminal_not_at_the_source(
    group: tuple[str, ...], sentence: str
) -> None:
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    done = subprocess.run(
        [sys.executable, "-m", "dms", *group, "--help"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), done.stdout
    body = " ".join(line.strip("│ ").strip() for line in lines)
    assert sentence in body, done.stdout
    # Every wrapped line of the list is filled to near the box's edge before it breaks.
    for before, after in itertools.pairwise(lines):
        if before.startswith("│") and after.startswith("│    "):
            words = after.strip("│ ").split()
            if words:
                assert len(before.rstrip("│ ")) + len(words[0]) + 1 > 76, (before, after)
