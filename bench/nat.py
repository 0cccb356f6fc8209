"""A placed mining job across real NATs, by path: direct, relayed, hole punched.

Root only (network namespaces, ``dms.sim.netns``); elsewhere one line says why not.
For each path a fresh topology, a relay/bootstrap node on the public network, an
owner and two providers, each a ``dms run`` in its namespace, then ``dms mine
skmeans --data examples/iris-features.csv --k 3 --shards 2`` from the owner:

- ``direct``: owner and providers on the public network (no NAT);
- ``relayed``: owner and providers behind three NATs, hole punching off
  (``DMS_HOLE_PUNCHING=false``): everything goes through the relay;
- ``hole_punched``: the same NATs with hole punching on; the job starts once the
  owner's path to both providers is direct (``punched_after_s``).

One JSON line per path (with --json): ``path, ok, mb_shipped, transfer_mb_per_s,
placement_ms, reachable_after_s`` and ``paths`` (result.json's path of each shard),
``labels_match_local``. ``reachable_after_s``: from launching a provider's ``dms
run`` to its address (relayed behind NAT) in the owner's peers table (polled with
``dms peers list``, itself ~1 s a call: the figure's resolution). ``placement_ms``:
from launching ``dms mine`` to its "running on" line; ``transfer_mb_per_s``: the
job's MB (both ways) over its wall time (result.json ``wall_s``, which includes the
workers' computing: a lower bound on the path's rate; the times of the progress
lines did not bound the transfers, so they gave no rate).
Run it under the shared lock: ``flock /tmp/dms-heavy.lock python bench/nat.py --json``.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dms.sim.netns import NatTopology, unavailable

IRIS = Path(__file__).resolve().parent.parent / "examples" / "iris-features.csv"
PASSPHRASE = "bench nat passphrase"
PROVIDERS = ("prov1", "prov2")


def wait(predicate: Any, timeout: float) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(0.2)
    return None


def peers(t: NatTopology, where: str) -> list[dict[str, Any]]:
    try:
        return t.dms_json("owner", "peers", "list", where=where)
    except (RuntimeError, json.JSONDecodeError):
        return []


def run_path(path: str, root: Path) -> dict[str, Any]:
    nated = path != "direct"
    env = {"DMS_PASSPHRASE": PASSPHRASE}
    if path == "relayed":
        env["DMS_HOLE_PUNCHING"] = "false"
    out: dict[str, Any] = {"path": path, "ok": False}
    with NatTopology(root, env=env) as t:
        where = {r: (r if nated else "relay") for r in ("owner", *PROVIDERS)}
        ports = {"owner": 4002, "prov1": 4003, "prov2": 4004}
        for role in ("relay", "owner", *PROVIDERS):
            t.dms(role, "init")
            relay = "relay = true\n" if role == "relay" else ""
            (t.home(role) / "config.toml").write_text("heartbeat_s = 0.5\n" + relay)
        for role in PROVIDERS:
            t.dms(role, "onboard", "--cpu", "1", "--ram", "1", "--disk", "1", timeout=120)
        boot = t.daemon("relay").info["addrs"][0]
        t.daemon("owner", "--bootstrap", boot, where=where["owner"], port=ports["owner"])
        reach: list[float] = []
        ids = {}
        for role in PROVIDERS:
            began = time.monotonic()
            d = t.daemon(role, "--bootstrap", boot, where=where[role], port=ports[role])
            ids[role] = d.info["peer_id"]

            def listed(pid: str = d.info["peer_id"]) -> bool:
                for row in peers(t, where["owner"]):
                    addrs = row.get("addrs") or []
                    if row["peer_id"] == pid and (
                        any("/p2p-circuit/" in a for a in addrs) if nated else addrs
                    ):
                        return True
                return False

            if wait(listed, 60) is not None:
                reach.append(time.monotonic() - began)
        out["reachable_after_s"] = round(max(reach), 2) if len(reach) == 2 else None

        def placeable() -> bool:
            rows = [r for r in peers(t, where["owner"]) if r["peer_id"] in ids.values()]
            return sum(1 for r in rows if r.get("onboarded", {}).get("cpu")) == 2

        if wait(placeable, 60) is None:
            out["error"] = "the owner never heard both providers"
            return out
        if path == "hole_punched":
            # Connect through the relay (a ping), then wait for DCUtR to go direct.
            for pid in ids.values():
                t.dms("owner", "peers", "ping", pid, where=where["owner"])

            def direct() -> bool:
                rows = peers(t, where["owner"])
                return all(r.get("path") == "direct" for r in rows if r["peer_id"] in ids.values())

            punched = wait(direct, 90)
            out["punched_after_s"] = None if punched is None else round(punched, 1)
        out.update(mine(t, where["owner"], root))
    return out


def mine(t: NatTopology, where: str, root: Path) -> dict[str, Any]:
    placed, local = root / "placed", root / "local"
    args = ["mine", "skmeans", "--data", str(IRIS), "--k", "3"]
    argv = ["ip", "netns", "exec", t.ns(where), sys.executable, "-m", "dms", *args]
    began = time.monotonic()
    proc = subprocess.Popen(
        [*argv, "--shards", "2", "--out", str(placed)],
        env={**t.env_for("owner"), "PYTHONUNBUFFERED": "1"},  # each line as it is said
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    running = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if running is None and "running on" in line:
            running = time.monotonic()
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0:
        return {"error": err.strip()[-500:]}
    result = json.loads((placed / "result.json").read_text())
    t.dms("owner", *args, "--out", str(local), "--local", where=where)
    mb = (result["bytes_to_worker"] + result["bytes_to_owner"]) / 1e6
    return {
        "ok": True,
        "mb_shipped": round(mb, 2),
        "transfer_mb_per_s": round(mb / result["wall_s"], 2) if result.get("wall_s") else None,
        "placement_ms": round((running - began) * 1000) if running else None,
        "paths": [p.get("path") for p in result["placement"]],
        "labels_match_local": (placed / "labels.csv").read_text()
        == (local / "labels.csv").read_text(),
        "wall_s": result.get("wall_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON line per path")
    parser.add_argument("--path", choices=("direct", "relayed", "hole_punched"), action="append")
    args = parser.parse_args()
    # A SIGTERM (timeout, flock's caller) unwinds: each topology deletes its namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    why = unavailable()
    if why is not None:
        print(json.dumps({"skipped": why}) if args.json else f"skipped: {why}")
        return
    for path in args.path or ("direct", "relayed", "hole_punched"):
        with tempfile.TemporaryDirectory(prefix=f"dms-nat-{path}-") as tmp:
            try:
                line = run_path(path, Path(tmp))
            except Exception as exc:  # one path's failure is a figure, not the end
                line = {"path": path, "ok": False, "error": str(exc)[-500:]}
        print(json.dumps(line) if args.json else line, flush=True)


if __name__ == "__main__":
    main()
