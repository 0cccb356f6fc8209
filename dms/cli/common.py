"""Options and context shared by every command."""

from __future__ import annotations

from typing import Annotated

import typer

from dms.config import Settings, load_settings

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def settings() -> Settings:
    return load_settings()
