"""``processes`` mode: one OS process per node, each a ``dms run`` with its own DMS_HOME.

This is what a person does on one machine (README, "Mining on other nodes"),
done N times: each home gets its keys as ``dms init`` makes them (the user key a
root of the node) and a ``config.toml``; each node runs ``dms run --listen
/ip4/127.0.0.1/tcp/0 --api-port 0 --json``, bootstrapping from up to three nodes
already running, and logs to ``DMS_HOME/logs/run.log``. The simulation talks to
each node as its user does, through the node's local API (``NodeClient``), and
a kill is a real SIGKILL. Nodes run in sessions of their own (a Ctrl-C reaches
the simulation, which stops them all with SIGTERM) and die with it
(``PR_SET_PDEATHSIG`` where Linux offers it: the signal follows the *thread*
that spawned the node, so the thread that starts and restarts nodes must live
as long as they do; the runner's main thread does).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dms.node.client import NodeClient
from dms.security import Identity
from dms.sim.backend import Backend, NodeSpec, Say, SimError, heartbeat_budget, prepare_home
from dms.sim.faults import FaultPlan
from dms.sim.scenario import NodeSettings

START_TIMEOUT_S = 180.0  # a node's first line, with many starting on two cores
STOP_TIMEOUT_S = 30.0
START_WAVE = 8  # nodes starting at once: their imports and handshakes share the cores
FAULTS_FILE = "faults.json"


@dataclass
class _Proc:
    home: Path
    node: Identity
    user: Identity
    proc: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] | None = None
    client: NodeClient | None = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGTERM this child when the simulation's process dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    """The first line of ``stream`` within ``timeout`` (b"" if none came)."""
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return out[0] if out else b""


def toml_config(values: dict[str, Any]) -> str:
    """Settings as TOML (numbers, strings, lists of them, and one level of tables):
    their JSON form is valid TOML for these types."""
    lines, tables = [], []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]")
            tables += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines + tables) + "\n"


class ProcessBackend(Backend):
    mode = "processes"

    def __init__(
        self,
        root: Path,
        specs: list[NodeSpec],
        settings: NodeSettings,
        faults: FaultPlan,
        *,
        passphrase: str | None = None,
        serve_api: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(root, specs, settings, faults)
        self.passphrase = passphrase or secrets.token_urlsafe(16)
        self._procs: dict[str, _Proc] = {}
        self._rng = random.Random(seed)
        self.faults_file = self.root / FAULTS_FILE

    def default_heartbeat(self) -> tuple[float, float]:
        # All N nodes share this machine's cores, as in one process.
        return 1.0, heartbeat_budget(len(self.specs), 60.0)

    # ---- starting --------------------------------------------------------------------

    def start(self, say: Say) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # Every node follows this file; the plan rewrites it on each change.
        self.faults.save(self.faults_file)
        self.faults.on_change(lambda: self.faults.save(self.faults_file))
        heartbeat_s, budget = self.mode_defaults()
        for spec in self.specs:
            home = self.root / spec.name
            node, user = prepare_home(home, self.passphrase)
            config = {
                "heartbeat_s": heartbeat_s,
                "heartbeat_budget_per_s": budget,
                "orphan_s": self.settings.orphan_s,
                "invoke_timeout_s": self.settings.invoke_timeout_s,
                "labels": spec.labels,
                "preferences": spec.preferences.model_dump(),
                **self.extra_config(spec),
            }
            (home / "config.toml").write_text(toml_config(config))
            (home / "logs").mkdir(mode=0o700, exist_ok=True)
            self._procs[spec.name] = _Proc(home, node, user)
        names = self.names
        self._launch(names[0])
        say(f"started 1/{len(names)}")
        done = 1
        with ThreadPoolExecutor(START_WAVE, thread_name_prefix="dms-sim-start") as pool:
            for i in range(1, len(names), START_WAVE):
                wave = names[i : i + START_WAVE]
                # Spawned from this thread (a child's death signal follows the thread that
                # spawned it), their first lines read in parallel.
                for name in wave:
                    self._spawn(name)
                list(pool.map(self._started, wave))
                done += len(wave)
                say(f"started {done}/{len(names)}")

    def _env(self, home: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
        env.update(DMS_HOME=str(home), DMS_PASSPHRASE=self.passphrase)
        # Each node runs the dms this process runs: 'python -m dms' put the working
        # directory first on its path, so a node started from another checkout's
        # folder ran that checkout's dms whatever PYTHONPATH said (a before/after
        # bench run from one folder compared one tree's daemons with themselves).
        here = str(Path(__file__).resolve().parents[2])
        path = env.get("PYTHONPATH")
        env.update(PYTHONSAFEPATH="1", PYTHONPATH=here + (os.pathsep + path if path else ""))
        return env

    def _bootstrap(self, exclude: str) -> list[str]:
        running = [self.addrs(n)[0] for n in self._procs if n != exclude and self.addrs(n)]
        return self._rng.sample(running, min(3, len(running)))

    def addrs(self, name: str) -> list[str]:
        """Where node ``name`` listens (as its first line said), if it is running."""
        info = self._proc(name).info
        return list(info.get("addrs") or []) if info and self.running(name) else []

    def _launch(self, name: str) -> None:
        self._spawn(name)
        self._started(name)

    def _spawn(self, name: str) -> None:
        proc = self._procs[name]
        args = [*self.run_argv(name), "--api-port", "0", "--json"]
        for addr in self._bootstrap(name):
            args += ["--bootstrap", addr]
        args += self.extra_run_args()
        fd = os.open(proc.home / "logs" / "run.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log = os.fdopen(fd, "ab")  # the daemon's log is as private as its home
        try:
            proc.proc = subprocess.Popen(
                args,
                env=self._env(proc.home),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            log.close()

    def _started(self, name: str) -> None:
        """Wait for the node's first line (peer id, addresses, API)."""
        proc = self._procs[name]
        assert proc.proc is not None and proc.proc.stdout is not None
        line = _read_line(proc.proc.stdout, START_TIMEOUT_S)
        if not line:
            self._kill(proc)
            tail = (proc.home / "logs" / "run.log").read_text(errors="replace").strip()
            last = tail.splitlines()[-1] if tail else "no output"
            raise SimError(f"{name} did not start within {START_TIMEOUT_S:g} s: {last}")
        proc.info = json.loads(line)
        proc.client = None

    def extra_run_args(self) -> list[str]:
        return ["--faults", str(self.faults_file)]

    def run_argv(self, name: str) -> list[str]:
        """``dms run`` for node ``name`` and where it listens."""
        return [sys.executable, "-m", "dms", "run", "--listen", "/ip4/127.0.0.1/tcp/0"]

    def extra_config(self, spec: NodeSpec) -> dict[str, Any]:
        """Settings of this node beyond the scenario's (config.toml)."""
        return {}

    # ---- the operations ------------------------------------------------------------------

    def _proc(self, name: str) -> _Proc:
        try:
            return self._procs[name]
        except KeyError:
            raise SimError(f"no node {name!r}") from None

    def running(self, name: str) -> bool:
        proc = self._proc(name).proc
        return proc is not None and proc.poll() is None

    def peer_id(self, name: str) -> str:
        return self._proc(name).node.peer_id

    def client(self, name: str) -> NodeClient:
        proc = self._proc(name)
        if not self.running(name):
            raise SimError(f"{name} is not running")
        if proc.client is None:
            proc.client = NodeClient(proc.home, user=proc.user)
        return proc.client

    def call(self, name: str, behaviour: str, payload: Any = None, timeout: float = 30.0) -> Any:
        return self.client(name).invoke(behaviour, payload, timeout=timeout)

    def hello(self, name: str, peer_id: str, timeout: float = 10.0) -> None:
        # Relayed by the node's local API, as 'dms actor cmd /public/hello --dest PEER'.
        self.client(name).invoke("/public/hello", dest=peer_id, timeout=timeout)

    def crash(self, name: str) -> None:
        self.check_running(name)
        self._kill(self._proc(name))

    def _kill(self, proc: _Proc) -> None:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()  # SIGKILL: no clean-up of any kind
            proc.proc.wait(STOP_TIMEOUT_S)
        proc.client = None

    def restart(self, name: str) -> None:
        if self.running(name):
            raise SimError(f"{name} is running: kill it first")
        self._launch(name)

    def live_leases(self, name: str) -> int:
        return len(self.call(name, "/dms/node/resources/allocated", timeout=10)["leases"])

    def alive_peers(self, name: str) -> dict[str, float]:
        rows = self.call(name, "/dms/node/peers/list", timeout=10)
        return {
            r["peer_id"]: float((r.get("onboarded") or {}).get("cpu") or 0.0)
            for r in rows
            if r.get("status") == "alive"
        }

    def settle(self, timeout: float, quiet_s: float = 2.0) -> bool:
        """Until the nodes together use less than a quarter of a core, plus 2 % of one
        a node (an idle node's gossipsub heartbeats cost about 1.3 %), for ``quiet_s``:
        N processes started together dial each other and mesh for a while, and that
        would load whatever is measured next."""
        import psutil

        busy = 0.25 + 0.02 * len(self.specs)
        procs = []
        for proc in self._procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(proc.proc.pid))
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.cpu_percent(None)  # the first call starts the measurement
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            used = 0.0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    used += p.cpu_percent(None) / 100.0
            now = time.monotonic()
            if used >= busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= quiet_s:
                return True
        return False

    def describe(self, name: str) -> dict[str, Any]:
        proc = self._proc(name)
        info = super().describe(name)
        info["home"] = str(proc.home)
        if proc.info is not None:
            info["api"] = proc.info.get("api")
        if proc.proc is not None:
            info["pid"] = proc.proc.pid
        return info

    def stop(self) -> None:
        """SIGTERM to every node at once (each stops cleanly), SIGKILL to a straggler."""
        live = [p for p in self._procs.values() if p.proc is not None and p.proc.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                assert proc.proc is not None
                proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in live:
            assert proc.proc is not None
            try:
                proc.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.proc.kill()
                proc.proc.wait(5)
        for proc in self._procs.values():
            if proc.proc is not None and proc.proc.stdout is not None:
                proc.proc.stdout.close()
            proc.client = None
