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

LOADED = """
import json, sys
from dms.cli.app import build_app
for name in json.loads(sys.argv[1]):
    build_app(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {"sqlalchemy", "alembic",
      "numpy", "tenseal", "libp2p", "trio"} or m in {"dms.store", "dms.mining"})))
"""


def test_commands_that_talk_to_the_node_load_no_store_mining_or_libp2p() -> None:
    # 'dms mine' encrypts and reads CSVs here: it loads NumPy and TenSEAL itself.
    light = [name for name in COMMANDS if name != "mine"]
    assert {"actor", "peers", "status", "deployment", "cap", "init", "run"} <= set(light)
    done = subprocess.run(
        [sys.executable, "-c", LOADED, json.dumps(light)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert not [m for m in loaded if m.startswith(HEAVY)], loaded
