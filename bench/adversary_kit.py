"""What every attack of ``bench/adversary.py`` shares: the victim (a real ``dms run``
in a process of its own), the honest peer that keeps using it, the measurement
around one attack, and the targets a line must meet.

An attack module is any ``bench/adversary_<area>.py`` beside this file (found by
``bench/adversary.py`` at start; this kit is not one). It defines::

    ATTACKS: list[str]  # its attacks' names, in the order they run
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def plans(ctx: Context) -> dict[str, Plan]: ...

``plans`` (called once for every module before any attack: keep it cheap) maps
each attack's name (its ``attack`` key, an ``--only`` choice) to a ``Plan``:
``build()`` is called just before the attack (build its frames, peers and data
there, so that building costs the honest peer nothing) and returns the attack
itself, a callable that runs it to the end and returns the line's own keys
(``_cleanup``: a callable run after the figures, to give back what it holds).
``placements`` says what the honest peer measures meanwhile: placements on the
victim (True) or signed invokes of ``/public/hello`` (False).
``invoke_every_s`` paces those invokes (one started every so many seconds,
baseline and attack alike) so that the median weighs each second of the attack
the same; None: one after another.

Every line has ``attack, victim_rss_growth_mb, victim_alive, honest_success_rate,
honest_p50_ms, baseline_p50_ms, db_growth_mb``; ``missed_targets`` checks them and
the attack's own keys where it has them (``TARGETS``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import select
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from dms.jobs.spec import DeploymentSpec
from dms.node.api import TOKEN_HEADER, api_file, token_file
from dms.node.client import root_handle
from dms.orchestrator.states import DEPLOYMENT
from dms.orchestrator.store import DeploymentStore
from dms.sim.cluster import LocalCluster

MIB = 1024 * 1024
PASSPHRASE = "adversary bench"
# The victim is a provider: what it contributes, and every slot asked of it (the
# honest requester's and the hostile's alike).
VICTIM_ONBOARD = {"cpu": "1", "ram": "1", "disk": "1"}
SLOT_RESOURCES = {"cpu": "100m", "ram": "16MiB"}
VICTIM_PREFERENCES: dict[str, Any] = {"max_peer_share": 0.5}  # --victim-share changes it
DEPLOYMENT_NEW = "/dms/node/deployment/new"
HONEST_DEADLINE_S = 10.0
PLACE_POLL_S = 0.01
FAILURE_CHARS = 600  # of each failed placement's reason in a line
METRICS_WAIT_S = 60.0  # the longest a read of the victim's GET /metrics may take


@dataclass(frozen=True)
class Plan:
    """One attack: ``build()`` returns the attack to run (see the module docstring)."""

    build: Callable[[], Callable[[], dict[str, Any] | None]]
    placements: bool = False
    # Invokes only: start one every this many seconds (open loop) instead of one after
    # another, baseline and attack alike. Back to back, a quiet second holds more
    # invokes than a busy one (each is faster), so the median weighs the attack's quiet
    # moments most; paced (each invoke well under the period), every second of the
    # attack weighs the same.
    invoke_every_s: float | None = None


@dataclass(frozen=True)
class Context:
    """What an attack module may use: the run's folder, the victim, the honest peer
    and its cluster (add nodes of your own with ``cluster.add``), the parsed
    arguments."""

    root: Path
    victim: Victim
    honest: Honest
    cluster: LocalCluster
    args: argparse.Namespace


# A line's own keys and their targets (checked where the line has the key).
TARGETS: dict[str, Callable[[Any], bool]] = {
    "victim_alive": bool,
    "victim_rss_growth_mb": lambda mb: (mb or 0) <= 50,
    "db_growth_mb": lambda mb: (mb or 0) <= 20,
    "honest_success_rate": lambda rate: (rate or 0) >= 0.95,
    "newcomer_joined_s": lambda s: s is not None and s <= 10,
    "job_completed": bool,
    "revoked_token_refused": bool,
    "answer_ms": lambda ms: ms is not None and ms <= 100,
}


def missed_targets(result: dict[str, Any]) -> list[str]:
    """The keys of ``result`` that miss their target (empty: every target met)."""
    missed = [key for key, ok in TARGETS.items() if key in result and not ok(result[key])]
    if not result["honest_p50_ms"] <= 2 * result["baseline_p50_ms"]:
        missed.append("honest_p50_ms")
    return missed


# ---- the victim: a real daemon in its own process ----------------------------------


class Victim:
    def __init__(self, root: Path, settings: dict[str, str] | None = None) -> None:
        self.home = root / "victim"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_")}
        env.update(DMS_HOME=str(self.home), DMS_PASSPHRASE=PASSPHRASE, DMS_LOG_LEVEL="ERROR")
        env.update(settings or {})
        dms = [sys.executable, "-m", "dms"]
        subprocess.run([*dms, "init"], env=env, check=True, capture_output=True)
        # A provider, so that placement can be attacked (and measured) too.
        onboard = [f"--{kind}={amount}" for kind, amount in VICTIM_ONBOARD.items()]
        subprocess.run([*dms, "onboard", *onboard], env=env, check=True, capture_output=True)
        self.log = open(root / "victim.log", "w")  # noqa: SIM115 (open for the run)
        self.proc = subprocess.Popen(
            [*dms, "run", "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the victim did not start: see {root / 'victim.log'}")
        self.info = json.loads(line)
        self.peer_id: str = self.info["peer_id"]
        self.addr: str = self.info["addrs"][0]
        self.process = psutil.Process(self.proc.pid)

    def rss_mb(self) -> float:
        return self.process.memory_info().rss / MIB

    def db_mb(self) -> float:
        """The victim's database on disk: ``dms.db`` with its WAL and shared memory."""
        files = [self.home / f"dms.db{suffix}" for suffix in ("", "-wal", "-shm")]
        return sum(f.stat().st_size for f in files if f.exists()) / MIB

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        """The victim's ``GET /metrics`` (its local API), as ``{series: value}``."""
        api = json.loads(api_file(self.home).read_text())
        # A victim under a flood may take seconds to answer (a full run's connection_slots
        # once took more than 10 s, and its figures were lost): the bench waits.
        conn = http.client.HTTPConnection("127.0.0.1", api["port"], timeout=METRICS_WAIT_S)
        try:
            token = token_file(self.home).read_text().strip()
            conn.request("GET", "/metrics", headers={TOKEN_HEADER: token})
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        series: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                series[name] = float(value)
        return series

    def refusals(self) -> Counter[str]:
        """Refusals so far, by ``layer:code`` (transport and actor system)."""
        counts: Counter[str] = Counter()
        for name, value in self.metrics().items():
            if name.startswith("dms_refusals_total{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', name))
                counts[f"{labels['layer']}:{labels['code']}"] += int(value)
        return counts

    def held(self) -> int:
        """Leases and allocations that hold the victim's resources now."""
        m = self.metrics()
        return int(
            m.get('dms_leases{state="locked"}', 0) + m.get('dms_leases{state="allocated"}', 0)
        )

    def events(self, kind: str) -> int:
        """How many events of ``kind`` the victim's store holds (read-only, beside it)."""
        db = sqlite3.connect(f"file:{self.home / 'dms.db'}?mode=ro", uri=True, timeout=10)
        try:
            return int(
                db.execute("SELECT count(*) FROM events WHERE kind = ?", (kind,)).fetchone()[0]
            )
        finally:
            db.close()

    def wait_released(self, timeout: float) -> bool:
        """Until nothing holds the victim's resources (leases expire, deadlines pass)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.held() == 0:
                return True
            time.sleep(0.5)
        return False

    def last_words(self, lines: int = 60) -> str:
        """How the victim ended (its exit code) and the end of its log: the log is in
        the run's temporary directory, gone once the bench ends."""
        self.log.flush()
        tail = (self.home.parent / "victim.log").read_text(errors="replace").splitlines()
        return "\n".join([f"the victim exited with code {self.proc.poll()}", *tail[-lines:]])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ---- the honest peer and the measurement -----------------------------------------


class Honest:
    """A dms node in this process, with the victim in its peers table."""

    def __init__(self, cluster: LocalCluster, victim: Victim, name: str = "honest") -> None:
        (self.node,) = [cluster.add(name, bootstrap=[victim.addr])]
        assert self.node.node is not None and self.node.db is not None
        self.ref = self.node.node
        self.victim = victim.peer_id
        self.target = root_handle(victim.peer_id)
        self.store = DeploymentStore(self.node.db)
        self.failures: list[str] = []  # why each failed placement failed, in order

    def invoke(self) -> float | None:
        """One signed invoke; its round trip in seconds, or None if it failed."""
        start = time.perf_counter()
        try:
            self.ref.ask(self.target, "/public/hello", timeout=10)
        except Exception:
            return None
        return time.perf_counter() - start

    def samples(self, n: int) -> list[float]:
        return [t for t in (self.invoke() for _ in range(n)) if t is not None]

    def knows_victim(self, timeout: float) -> bool:
        """Until a heartbeat of the victim showed its resources (placement asks only then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.node.peer_table.get(self.victim)
            if record is not None and record.heartbeat and record.heartbeat.onboarded.get("cpu"):
                return True
            time.sleep(0.1)
        return False

    def place(self) -> float | None:
        """One deployment on the victim (``/dms/node/deployment/new``): request to
        running in seconds, or None if it never ran within its deadline. Waits for it
        to end, so each placement finds the victim as the last one left it."""
        started = time.time()
        try:
            dep = self.ref.ask(self.ref.handle, DEPLOYMENT_NEW, {"spec": self.job()}, timeout=10)
        except Exception as exc:
            self.failures.append(f"deployment/new: {exc}"[:FAILURE_CHARS])
            return None
        deadline = time.monotonic() + HONEST_DEADLINE_S + 10
        row: dict[str, Any] = {}
        while time.monotonic() < deadline:
            row = self.store.get(dep["id"]) or {}
            if row.get("state") in DEPLOYMENT.terminal:
                break
            time.sleep(PLACE_POLL_S)
        running_at = row.get("running_at")
        if not running_at:
            self.failures.append(failure(row, started))
        return running_at - started if running_at else None

    def job(self) -> dict[str, Any]:
        return DeploymentSpec.model_validate(
            {
                "name": "honest",
                "deadline_s": HONEST_DEADLINE_S,
                "allocations": [
                    {
                        "name": "w",
                        "executor": "compute",
                        "resources": SLOT_RESOURCES,
                        "params": {"seconds": 0},
                        "constraints": {"include_peers": [self.victim]},
                    }
                ],
            }
        ).model_dump(mode="json")


def failure(row: dict[str, Any], started: float) -> str:
    """Why a placement did not run: its state, and its events after the first (the
    rounds, what each peer answered, the end's reason, which names every peer's),
    each at its second since the placement was asked for."""
    events = [
        f"+{e['at'] - started:.1f}s {e['what']}" if isinstance(e, dict) else str(e)
        for e in row.get("events") or []
    ]
    took = time.time() - started
    said = " | ".join(events[1:])  # the end's reason is last: kept whole
    return f"{row.get('state')} after {took:.1f} s: {said[-FAILURE_CHARS:]}"


def paced(probe: Callable[[], float | None], every_s: float | None) -> Callable[[], float | None]:
    """``probe``, started once every ``every_s`` seconds (at once if the last one took
    longer; no catching up); unpaced if ``every_s`` is None."""
    if every_s is None:
        return probe
    next_at = time.perf_counter()

    def run() -> float | None:
        nonlocal next_at
        wait = next_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        next_at = max(next_at + every_s, time.perf_counter())
        return probe()

    return run


def p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3) if samples else float("nan")


def run_attack(
    name: str,
    victim: Victim,
    honest: Honest,
    attack: Any,
    *,
    baseline_n: int,
    settle_s: float,
    placements: bool = False,
    invoke_every_s: float | None = None,
) -> dict[str, Any]:
    """Baseline, then the attack in a thread while the honest peer keeps invoking (or,
    with ``placements``, placing one deployment after another on the victim)."""
    probe = honest.place if placements else paced(honest.invoke, invoke_every_s)
    baseline = [t for t in (probe() for _ in range(baseline_n)) if t is not None]
    refusals_before = victim.refusals()
    rss_before = victim.rss_mb()
    db_before = victim.db_mb()
    peak = [rss_before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if victim.alive():
                peak[0] = max(peak[0], victim.rss_mb())
            time.sleep(0.05)

    extra: dict[str, Any] = {}

    def attacker() -> None:
        try:
            extra.update(attack() or {})
        finally:
            done.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cpu_before = victim.process.cpu_times(), psutil.Process().cpu_times()
    started = time.perf_counter()
    threading.Thread(target=attacker, daemon=True).start()
    during: list[float | None] = []
    honest.failures.clear()
    while not done.is_set():
        during.append(probe())
    attack_s = time.perf_counter() - started
    cpu_after = victim.process.cpu_times(), psutil.Process().cpu_times()
    # Shares of one core while the attack ran: the victim's, and this process's (the
    # honest node, and the hostile peer building nothing but sending).
    cpu = [
        round((a.user + a.system - b.user - b.system) / attack_s, 2)
        for a, b in zip(cpu_after, cpu_before, strict=True)
    ]
    time.sleep(settle_s)
    watcher.join(1)
    alive = victim.alive() and honest.invoke() is not None
    ok = [t for t in during if t is not None]
    cleanup = extra.pop("_cleanup", None)
    result = {
        "attack": name,
        "victim_rss_growth_mb": round(victim.rss_mb() - rss_before, 1) if alive else None,
        "victim_alive": alive,
        "honest_success_rate": round(len(ok) / len(during), 4) if during else None,
        "honest_p50_ms": p50_ms(ok),
        "baseline_p50_ms": p50_ms(baseline),
        "db_growth_mb": round(victim.db_mb() - db_before, 1),
        "victim_rss_peak_growth_mb": round(peak[0] - rss_before, 1),
        "honest_placements" if placements else "honest_invokes": len(during),
        "attack_s": round(attack_s, 2),
        **extra,
    }
    if placements:  # the lines of the first attacks keep their keys
        after = victim.refusals() if alive else Counter()
        result["victim_refusals"] = dict(sorted((after - refusals_before).items()))
        result["victim_cpu"], result["bench_process_cpu"] = cpu
        result["honest_failures"] = list(honest.failures)
    if cleanup is not None:  # after the figures: what the hostile holds goes back
        cleanup()
    return result


HOSTILE_ANSWER_S = 120.0  # the longest a hostile process's step may take (a flood, a wait)


class HostileProcess:
    """A hostile peer in a process of its own (``cmd``: a bench file run with a flag,
    whose side is :func:`serve`), driven by one JSON line each way per step. An
    attacker is a process of its own: in this one, its work took the honest node's
    interpreter lock and the bench measured itself (py-spy)."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.process = psutil.Process(self.proc.pid)

    def ask(self, what: dict[str, Any], timeout: float = HOSTILE_ANSWER_S) -> dict[str, Any]:
        """One step; a process silent past ``timeout`` is killed (the bench fails with
        the reason instead of hanging)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(what) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            raise RuntimeError(f"the hostile process did not answer {what} in {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the hostile process ended (exit {self.proc.wait(10)})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def cpu_s(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask({"stop": True})
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def serve(step: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The hostile process's side of :class:`HostileProcess`: each line of stdin is
    answered on stdout with ``step``'s answer (``{"error": ...}`` if it raised), until
    ``{"stop": true}``."""
    out, sys.stdout = sys.stdout, sys.stderr  # the answers only on stdout
    for line in sys.stdin:
        ask = json.loads(line)
        if "stop" in ask:
            print(json.dumps({"stopped": True}), file=out, flush=True)
            return
        try:
            answer = step(ask)
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), file=out, flush=True)


def say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)
