"""The layers hold (issue 26's acceptance, measured from the imports by bench/structure.py):
no import cycle, not even one for type checking only, no import running back up, and no
class assembled from more than two base classes (the node is a composition of roles), no
getattr(self, "...")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "structure.py"


def test_no_import_cycle_and_no_import_back_up() -> None:
    spec = importlib.util.spec_from_file_location("structure", SCRIPT)
    assert spec is not None and spec.loader is not None
    structure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(structure)
    figures, detail = structure.measure()
    assert figures["import_cycles"] == 0, detail["import_cycles"]
    assert figures["upward_arrows"] == 0, detail["upward_arrows"]
    # Roles are services, not mixins (DESIGN decision 14): no class over two bases
    assert figures["classes_over_two_bases"] == 0, detail["classes_over_two_bases"]
    # getattr(self, "...") reaching into attributes another piece set: none in dms/
    # (DESIGN decision 14)
    assert figures["getattr_self"] == 0, detail["getattr_self"]
