"""``dms onboard``/``offboard``/``resources`` as a user runs them, with and without a daemon,
and a daemon killed with SIGKILL that must come back with exactly what was committed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dms.resources import ResourceLedger, Resources
from dms.resources.machine import machine_total
from dms.store import open_database
from tests.clitools import Daemon, dms, dms_json, init_home_quick

MACHINE = machine_total(Path("/tmp"))
TOO_MANY_CORES = str(MACHINE.cpu_milli // 1000 + 1)
TOO_MUCH_RAM = f"{MACHINE.ram_mib // 1024 + 1}GiB"


@pytest.fixture(scope="module")
def onboarded_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home, onboarded once (the benchmark runs once for the module, at its default
    length, as for users: the other tests shorten it)."""
    home = tmp_path_factory.mktemp("onboarded")
    init_home_quick(home)
    args = ["onboard", "--cpu", "1", "--ram", "1", "--disk", "1", "--json"]
    done = dms(home, *args, timeout=120, quick_benchmark=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["capability"]["seconds"] > 9 * 0.4  # nine measurements
    return home


BAD_INPUTS = {
    "more cores than the machine": (["--cpu", TOO_MANY_CORES], "more than this machine has"),
    "more ram than the machine": (["--ram", TOO_MUCH_RAM], "more than this machine has"),
    "more disk than is free": (["--disk", "100000TiB"], "more than this machine has"),
    "negative cpu": (["--cpu", "-1"], "negative"),
    "zero ram": (["--ram", "0"], "must be more than zero"),
    "zero disk": (["--disk", "0MiB"], "must be more than zero"),
    "nonsense ram unit": (["--ram", "4parsecs"], "unknown unit 'parsecs'"),
    "nonsense cpu": (["--cpu", "lots"], "not a number"),
    "negative price": (["--price", "-1"], "price: must not be negative"),
    "negative gpu": (["--gpu", "-2"], "gpu: must not be negative"),
}


def pools(home: Path) -> dict:
    """What ``dms resources --json`` shows of a home whose node is not running (its
    ledger's pools), read here: a subprocess less for each bad input."""
    db = open_database(f"sqlite:///{home / 'dms.db'}")
    try:
        return ResourceLedger(db).pools().as_dict()
    finally:
        db.close()


@pytest.fixture(scope="module")
def resources_before(onboarded_home: Path) -> dict:
    """The onboarded home's resources before any bad input (each case compares with them:
    a case that changed anything fails, and so do the cases after it)."""
    assert pools(onboarded_home) == dms_json(onboarded_home, "resources")  # the same view
    return pools(onboarded_home)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_onboarding_input_is_one_line_and_changes_nothing(
    onboarded_home: Path, resources_before: dict, case: str
) -> None:
    override, message = BAD_INPUTS[case]
    args = {"--cpu": "1", "--ram": "1", "--disk": "1"}
    args.update(dict(zip(override[::2], override[1::2], strict=True)))
    done = dms(onboarded_home, "onboard", *[x for kv in args.items() for x in kv])
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert pools(onboarded_home) == resources_before


def test_onboard_offline_then_change_amounts_without_offboarding(onboarded_home: Path) -> None:
    status = dms_json(onboarded_home, "onboard", "--cpu", "500m", "--ram", "512MiB",
                      "--disk", "2", "--price", "1.5")  # fmt: skip
    assert status["onboarded"] == {"cpu": 0.5, "ram_gib": 0.5, "disk_gib": 2.0, "gpu": 0}
    assert status["price"] == 1.5
    assert status["capability"]["ckks_mul_per_s"] > 0  # measured once, kept
    pools = dms_json(onboarded_home, "resources")
    assert pools["free"] == pools["onboarded"]


def lock(home: Path, lease_s: float, **amounts: object) -> dict:
    payload = json.dumps({"resources": amounts, "lease_s": lease_s})
    return dms_json(home, "actor", "cmd", "/dms/node/resources/lock", "--payload", payload)


def test_a_daemon_killed_with_sigkill_restores_what_was_committed(tmp_path: Path) -> None:
    home = tmp_path / "node"
    init_home_quick(home)
    done = dms(home, "onboard", "--cpu", "2", "--ram", "4", "--disk", "4", timeout=120)
    assert done.returncode == 0, done.stderr
    daemon = Daemon(home)
    try:
        # Live changes go through the daemon.
        assert (
            dms_json(home, "onboard", "--cpu", "1.5", "--ram", "4", "--disk", "4")["onboarded"][
                "cpu"
            ]
            == 1.5
        )
        allocation = lock(home, 600, cpu="1", ram="1GiB")
        done = dms(home, "actor", "cmd", "/dms/node/resources/commit",
                   "--payload", json.dumps({"id": allocation["id"]}), "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        held = lock(home, 600, ram="2GiB")

        # What is in use must still fit a change, and offboarding needs --force.
        refused = dms(home, "onboard", "--cpu", "0.5", "--ram", "4", "--disk", "4")
        assert refused.returncode == 1 and "cpu 0.5 cores < 1 cores in use" in refused.stderr
        refused = dms(home, "offboard")
        assert refused.returncode == 1 and "--force" in refused.stderr
        # 6 s: it must still be live when the node is killed (it is counted expired at
        # the restart): 3 s was no longer than the lock command's exit and a pause.
        short = lock(home, 6.0, disk="3GiB")
        daemon.kill()
    finally:
        daemon.stop()

    time.sleep(6.5)  # the short lease runs out while the node is down
    daemon = Daemon(home)
    try:
        pools = dms_json(home, "resources")
        assert pools["allocated"] == {"cpu": 1.0, "ram_gib": 1.0, "disk_gib": 0.0, "gpu": 0}
        assert pools["locked"] == {"cpu": 0.0, "ram_gib": 2.0, "disk_gib": 0.0, "gpu": 0}
        assert pools["free"] == {"cpu": 0.5, "ram_gib": 1.0, "disk_gib": 4.0, "gpu": 0}
        assert pools["allocations"] == 1 and pools["leases"] == 1
        live = dms_json(home, "actor", "cmd", "/dms/node/resources/allocated")["leases"]
        assert {x["id"] for x in live} == {allocation["id"], held["id"]}
        released = dms_json(home, "offboard", "--force")["released"]
        assert {x["id"] for x in released} == {allocation["id"], held["id"]}
    finally:
        assert daemon.stop() == 0

    db = open_database(f"sqlite:///{home / 'dms.db'}")
    try:
        restored = db.events("node.restored", limit=1)[0].data
        assert restored["expired"] == 1 and restored["allocations"] == 1

        ledger = ResourceLedger(db)
        assert ledger.lease(short["id"]).state == "expired"
        assert ledger.pools().onboarded == Resources()
    finally:
        db.close()
