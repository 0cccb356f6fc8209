"""A ``dms`` command that talks to the local node or prints help starts without the
heavy libraries (each ``dms`` subprocess paid about 130 ms of SQLAlchemy because the
trust anchors imported the store; ``dms deployment list`` also NumPy and TenSEAL):
measured by bench/cli_startup.py, checked here by what is imported."""

from __future__ import annotations

import json
import subprocess
import sys

from dms.cli.app import COMMANDS

# What the daemon, the store and mining need; none of it for the commands below.
HEAVY = ("sqlalchemy", "alembic", "numpy", "tenseal", "libp2p", "trio", "dms.store", "dms.mining")

REPORT = """
import json, sys
print(json.dumps(sorted(sys.modules)))
"""


def loaded(code: str, *args: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", code + REPORT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [m for m in json.loads(done.stdout.splitlines()[-1]) if m.startswith(HEAVY)]


def test_commands_that_talk_to_the_node_load_no_store_mining_or_libp2p() -> None:
    # 'dms mine' encrypts and reads CSVs here: it loads NumPy and TenSEAL itself.
    light = [name for name in COMMANDS if name != "mine"]
    assert {"actor", "peers", "status", "deployment", "cap", "init", "run"} <= set(light)
    build = "import json, sys\nfrom dms.cli.app import build_app\n"
    build += "for name in json.loads(sys.argv[1]):\n    build_app(name)\n"
    assert loaded(build, json.dumps(light)) == []


def test_dms_sim_with_its_nodes_in_processes_loads_no_libp2p() -> None:
    """Its nodes are 'dms run' daemons; the parent only talks to their APIs (a fault
    plan's NetworkError came from the libp2p host module)."""
    code = "import dms.sim.runner, dms.sim.processes, dms.sim.faults\n"
    assert not [m for m in loaded(code) if m.startswith(("libp2p", "sqlalchemy", "dms.store"))]


def test_help_and_the_mine_commands_help_load_no_numpy_or_tenseal() -> None:
    """'dms --help' builds every command, 'dms mine' with them: it loaded NumPy and
    TenSEAL (dms/cli/mine.py and dms.mining imported them at the top), about 0.12 s
    of CPU of every such start. They load when a mining command runs."""
    code = "import sys\nfrom dms.cli.app import main\nassert main(sys.argv[1:]) == 0\n"
    for args in (["--help"], ["mine", "--help"], ["mine", "skmeans", "--help"]):
        found = [m for m in loaded(code, *args) if m.startswith(("numpy", "tenseal"))]
        assert found == [], (args, found[:5])
    assert [m for m in loaded("import dms.cli.mine, dms.mining") if m.startswith("numpy")] == []
