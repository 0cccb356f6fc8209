"""How the code is put together, measured from its imports (issue 26's acceptance).

    python bench/structure.py [--json] [--list] [--uses]

One JSON line:

- ``import_cycles``: strongly connected sets of ``dms`` modules (imports inside
  functions and under ``TYPE_CHECKING`` count: a cycle hidden from the run is still
  one); ``type_only_cycles`` of them close only through ``TYPE_CHECKING`` imports;
- ``upward_arrows``: imports from a package to one above it in ``LAYERS`` (the
  README's Layout table, top to bottom);
- ``classes_over_two_bases``: classes in ``dms/`` with more than two base classes
  (``Protocol`` and ``Generic[...]`` are markers, not counted);
- ``getattr_self``: occurrences of ``getattr(self, "`` in ``dms/`` (DESIGN decision 14).

``--list`` prints what each figure counts, one per line, on stderr; ``--uses``
prints, for each package top to bottom, the packages it imports (the README's
Layout table).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DMS = ROOT / "dms"

# Top to bottom: a package may import those below it, never one above. Modules at the
# root of dms (errors, config, the helpers) are named as such. dms/mining imports
# nothing else of dms, so it sits below everything that uses it.
LAYERS = [
    "__main__",
    "cli",
    "sim",
    "report",
    "node",
    "provider",
    "orchestrator",
    "jobs",
    "config",
    "resources",
    "network",
    "actor",
    "security",
    "store",
    "mining",
    "backoff",
    "statemachine",
    "yamlfile",
    "files",
    "errors",
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, name: str, modules: set[str]) -> list[tuple[str, bool]]:
    """(module imported, whether only for type checking) for each dms import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    typed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            typed |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, id(node) in typed))
                break
    return found


MARKERS = {"Protocol", "Generic"}


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dms"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    out.append(sorted(group))
    return out


def measure() -> tuple[dict[str, object], dict[str, list[str]]]:
    paths = {module_name(p): p for p in DMS.rglob("*.py") if "versions" not in p.parts}
    modules = set(paths)
    graph: dict[str, set[str]] = defaultdict(set)
    runtime: dict[str, set[str]] = defaultdict(set)
    arrows: set[tuple[str, str, str]] = set()
    rank = {name: i for i, name in enumerate(LAYERS)}
    for name, path in paths.items():
        graph[name]
        for target, typed in imports_of(path, name, modules):
            graph[name].add(target)
            if not typed:
                runtime[name].add(target)
            src, dst = layer_of(name), layer_of(target)
            # A package not (yet) in LAYERS is listed apart, and counts no arrow.
            if src != dst and src in rank and dst in rank and rank[dst] < rank[src]:
                arrows.add((src, dst, f"{name} -> {target}"))
    all_cycles = cycles(graph)
    run_cycles = cycles(runtime)
    uses: dict[str, set[str]] = defaultdict(set)
    for name, targets in graph.items():
        uses[layer_of(name)] |= {layer_of(t) for t in targets} - {layer_of(name), "dms"}
    bases: list[str] = []
    getattrs: list[str] = []
    for name, path in paths.items():
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                # typing's markers (Protocol, Generic[...]) say what kind of class it is:
                # they are not bases it inherits behaviour from.
                real = [b for b in node.bases if _base_name(b) not in MARKERS]
                if len(real) > 2:
                    bases.append(f"{name}.{node.name} ({len(real)} bases)")
        for n, line in enumerate(text.splitlines(), 1):
            if 'getattr(self, "' in line:
                getattrs.append(f"{path.relative_to(ROOT)}:{n}")
    unknown = sorted({layer_of(m) for m in modules} - set(rank) - {"dms"})
    figures: dict[str, object] = {
        "bench": "structure",
        "modules": len(modules),
        "import_cycles": len(all_cycles),
        "type_only_cycles": len(all_cycles) - len(run_cycles),
        "upward_arrows": len({(s, d) for s, d, _ in arrows}),
        "classes_over_two_bases": len(bases),
        "getattr_self": len(getattrs),
    }
    if unknown:
        figures["packages_not_in_layers"] = unknown
    detail = {
        "import_cycles": [" <-> ".join(c) for c in all_cycles],
        "upward_arrows": sorted(a for _, _, a in arrows),
        "classes_over_two_bases": sorted(bases),
        "getattr_self": getattrs,
        "uses": [
            f"{layer}: {', '.join(sorted(uses[layer], key=lambda u: rank.get(u, len(LAYERS))))}"
            for layer in LAYERS
            if layer in uses
        ],
    }
    return figures, detail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON line (the default)")
    parser.add_argument("--list", action="store_true", help="what each figure counts, on stderr")
    parser.add_argument("--uses", action="store_true", help="what each package imports, on stderr")
    args = parser.parse_args()
    figures, detail = measure()
    if args.uses:
        for line in detail["uses"]:
            print(line, file=sys.stderr)
    if args.list:
        for key, items in detail.items():
            if key == "uses":
                continue
            for item in items:
                print(f"{key}: {item}", file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
