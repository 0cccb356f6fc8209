"""A ``dms`` command that talks to the local node or prints help starts without the
heavy libraries (each ``dms`` subprocess paid about 130 ms of SQLAlchemy because the
trust anchors imported the store; ``dms deployment list`` also NumPy and TenSEAL):
measured by bench/cli_startup.py, checked here by what is imported. A daemon ('dms run')
starts and stops without NumPy or TenSEAL: they load when it mines."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dms.cli.app import COMMANDS
from tests.clitools import Daemon, dms_json, init_home_quick
from tests.conftest import wait_for

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


def test_dms_sim_with_its_nodes_in_processes_loads_no_libp2p(tmp_path: Path) -> None:
    """Its nodes are 'dms run' daemons; the parent only talks to their APIs (a fault
    plan's NetworkError came from the libp2p host module)."""
    code = "import dms.sim.runner, dms.sim.processes, dms.sim.faults\n"
    # and what 'dms sim run' does around the run: its log (dms.cli.sim.quiet_logging)
    code += "import sys\nfrom pathlib import Path\nfrom dms.cli.sim import quiet_logging\n"
    code += "with quiet_logging(Path(sys.argv[1]), 'processes'):\n    pass\n"
    assert not [
        m
        for m in loaded(code, str(tmp_path))
        if m.startswith(("libp2p", "sqlalchemy", "dms.store"))
    ]


def test_help_and_the_mine_commands_help_load_no_numpy_or_tenseal() -> None:
    """'dms --help' builds every command, 'dms mine' with them: it loaded NumPy and
    TenSEAL (dms/cli/mine.py and dms.mining imported them at the top), about 0.12 s
    of CPU of every such start. They load when a mining command runs."""
    code = "import sys\nfrom dms.cli.app import main\nassert main(sys.argv[1:]) == 0\n"
    for args in (["--help"], ["mine", "--help"], ["mine", "skmeans", "--help"]):
        found = [m for m in loaded(code, *args) if m.startswith(("numpy", "tenseal"))]
        assert found == [], (args, found[:5])
    assert [m for m in loaded("import dms.cli.mine, dms.mining") if m.startswith("numpy")] == []


IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|( *)(\S+)$")


def importer_chain(lines: list[str], module: str) -> list[str]:
    """From ``-X importtime`` lines (each import's line after those it caused, nested
    ones indented deeper): ``module`` and the modules whose imports brought it in."""
    found = [(len(m[1]), m[2]) for m in map(IMPORTED.match, lines) if m]
    at = next(i for i, (_, name) in enumerate(found) if name == module)
    depth, chain = found[at][0], [module]
    for indent, name in found[at + 1 :]:
        if indent < depth:
            depth = indent
            chain.append(name)
    return chain


def test_a_daemon_starts_and_stops_without_numpy_or_tenseal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'dms run' loaded NumPy and TenSEAL at start (the mining and collab executors, the
    mining owner's and the collaboration's roles, the capability benchmark imported them
    at the top): about 0.4 s of CPU of every daemon the suite and the simulator start.
    They load when a node mines, collaborates or measures itself, not to start."""
    home = tmp_path / "home"
    init_home_quick(home)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # each import, on the daemon's log
    daemon = Daemon(home)
    assert daemon.stop() == 0, daemon.stderr()
    lines = daemon.stderr().splitlines()
    modules = {m[2] for m in map(IMPORTED.match, lines) if m}
    assert {"dms.node.daemon", "dms.jobs.mining", "dms.jobs.collab"} <= modules  # all seen
    for heavy in ("numpy", "tenseal"):
        assert heavy not in modules, " <- ".join(importer_chain(lines, heavy))


# What py-libp2p and dnspython import only for what a dms host does not use unless asked
# (dms.network.deferred): QUIC, WebSocket, AutoTLS, mDNS, secio, DNS over QUIC.
UNUSED = (
    "aioquic",
    "pylsqpack",
    "service_identity",
    "OpenSSL",
    "trio_websocket",
    "wsproto",
    "requests",
    "httpx",
    "urllib3",
    "zeroconf",
    "fastecdsa",
)


def imported(daemon: Daemon) -> tuple[list[str], set[str]]:
    """The daemon's log lines and the modules its ``-X importtime`` lines name."""
    lines = daemon.stderr().splitlines()
    return lines, {m[2] for m in map(IMPORTED.match, lines) if m}


def test_two_daemons_start_and_ping_without_quic_websocket_or_autotls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'dms run' imported every transport and option py-libp2p has (its QUIC and
    WebSocket transports, AutoTLS's ACME client with requests and httpx, mDNS, secio)
    and dnspython's DNS over QUIC, none of which a host on TCP uses: 268 of its 1,659
    modules, about 0.6 s of CPU of every start. They load when an address or an option
    asks for them; two daemons still start, find each other and ping."""
    one, two = tmp_path / "one", tmp_path / "two"
    init_home_quick(one)
    init_home_quick(two)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # each import, on the daemons' logs
    first = Daemon(one)
    try:
        second = Daemon(two, "--bootstrap", first.info["addrs"][0])
        monkeypatch.delenv("PYTHONPROFILEIMPORTTIME")
        try:
            first_id = first.info["peer_id"]
            wait_for(
                lambda: any(p["peer_id"] == first_id for p in dms_json(two, "peers", "list")),
                timeout=60,
                what="the second daemon to list the first",
            )
            assert dms_json(two, "peers", "ping", first_id)["peer_id"] == first_id
        finally:
            assert second.stop() == 0, second.stderr()
    finally:
        assert first.stop() == 0, first.stderr()
    for daemon in (first, second):
        lines, modules = imported(daemon)
        assert {"dms.node.daemon", "libp2p", "dns.resolver"} <= modules  # all seen
        for name in UNUSED:
            assert name not in modules, " <- ".join(importer_chain(lines, name))


def test_a_daemon_listening_on_quic_loads_the_quic_transport(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QUIC listen address still gets py-libp2p's QUIC transport, loaded when the host
    is built: the daemon listens on UDP and says so."""
    home = tmp_path / "home"
    init_home_quick(home)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    daemon = Daemon(home, "--listen", "/ip4/127.0.0.1/udp/0/quic-v1")
    assert daemon.stop() == 0, daemon.stderr()
    assert any("/udp/" in a and "/quic-v1/" in a for a in daemon.info["addrs"]), daemon.info
    _, modules = imported(daemon)
    assert {"libp2p.transport.quic.transport", "aioquic.quic.connection"} <= modules


def _switches(pid: int, tid: int) -> int:
    """Times thread ``tid`` of ``pid`` went to sleep and was woken (Linux)."""
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="Linux's /proc")
def test_a_running_daemons_main_thread_sleeps_until_it_is_stopped(tmp_path: Path) -> None:
    """'dms run' waited for its stop signal in 0.5 s slices: an idle node's main thread
    woke twice a second for nothing. It sleeps until the signal now. Counted, not
    timed: while the daemon's other threads wake 75 times (its heartbeats, timers,
    network), the main thread does not; SIGTERM still stops it cleanly. Polling, it woke
    46 times while they woke 150, 13 while they woke 75 (measured): four times the 3
    allowed (150 took 12 s of the test)."""
    from tests.conftest import wait_for

    home = tmp_path / "home"
    init_home_quick(home)
    daemon = Daemon(home)
    pid = daemon.proc.pid
    try:

        def others() -> int:
            total = 0
            for task in Path(f"/proc/{pid}/task").iterdir():
                if int(task.name) != pid:
                    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                        total += _switches(pid, int(task.name))
            return total

        main, rest = _switches(pid, pid), others()
        wait_for(lambda: others() >= rest + 75, 120, "the daemon's threads at work a while")
        assert _switches(pid, pid) - main <= 3
    finally:
        assert daemon.stop() == 0, daemon.stderr()
