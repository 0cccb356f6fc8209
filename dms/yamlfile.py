"""YAML (or JSON) files whose mistakes name the field and its line.

A file is parsed twice from the same text: once by PyYAML's composer, which keeps
each node's position, and once into plain data for pydantic. :class:`LinedYaml`
then turns a location from pydantic (``("allocations", 0, "resources", "cpu")``)
into ``allocations.0.resources.cpu (line 7)``. Job files (``dms.jobs.spec``) and
scenario files (``dms.sim.scenario``) both read their text through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from dms.errors import EXTRA_KEY, DmsError

__all__ = ["EXTRA_KEY", "LinedYaml", "data_loc", "parse_lined"]

Loc = tuple[int | str, ...]


@dataclass(frozen=True)
class LinedYaml:
    """A parsed document: its data, and where in the text each value is."""

    source: str  # what the file is called in messages (its path, or "job file")
    data: Any
    tree: yaml.Node | None

    def line(self, loc: Loc, key: bool = False) -> int | None:
        """The 1-based line of the value at ``loc`` (or of its nearest existing parent);
        ``key``: of the key that names it (an unknown key: its value may start on a
        later line, a block under it)."""
        node = self.tree
        line = node.start_mark.line + 1 if node is not None else None
        for part in loc:
            # (the node that names the value: its key in a mapping, itself in a list; the value)
            pair: tuple[yaml.Node, yaml.Node] | None = None
            if isinstance(node, yaml.MappingNode):
                pair = next(
                    (kv for kv in node.value if getattr(kv[0], "value", None) == part), None
                )
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                pair = (node.value[part],) * 2 if part < len(node.value) else None
            if pair is None:
                break
            named, node = pair
            line = (named if key else node).start_mark.line + 1
        return line

    def message(self, loc: Loc, problem: str, more: int = 0, key: bool = False) -> str:
        """``source: field (line N): problem (and M more)``; ``key``: the line of the
        key at ``loc``, not of its value (:meth:`line`)."""
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = self.line(loc, key)
        where = f" (line {line})" if line else ""
        extra = f" (and {more} more)" if more else ""
        return f"{self.source}: {field}{where}: {problem}{extra}"


def parse_lined(text: str, source: str, error: type[DmsError]) -> LinedYaml:
    """``text`` parsed with each value's line kept; a syntax error is ``error`` with its line."""
    try:
        tree = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{source}{where}: not valid YAML or JSON: {problem}") from None
    return LinedYaml(source, data, tree)


def data_loc(data: Any, loc: Loc) -> Loc:
    """A pydantic error's ``loc`` as a path into the file: without pydantic's tags for
    validators and for the member of a union (``str``, ``float``) that follow a plain value."""
    out: list[int | str] = []
    here = data
    for part in loc:
        if isinstance(part, str) and part.startswith("function-"):
            continue
        if isinstance(here, dict):
            here = here.get(part)
        elif isinstance(here, list) and isinstance(part, int):
            here = here[part] if part < len(here) else None
        elif here is not None:
            continue  # a union member's tag after a plain value
        out.append(part)
    return tuple(out)
