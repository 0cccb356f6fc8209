"""Providers behind real NATs (network namespaces, masquerading routers): reachability,
relayed addresses, a placed mining job through relays. Root only: skipped elsewhere,
with the reason (dms.sim.netns.unavailable)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dms.sim.netns import NatTopology, NsDaemon, unavailable
from tests.clitools import BENCHMARK_STEP_S, PASSPHRASE, init_home_quick, side_by_side
from tests.conftest import wait_for

IRIS = Path("examples/iris-features.csv").resolve()
WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no NAT topology: {WHY_NOT}")


# The quick capability benchmark, as in every test but test_onboarding's.
ENV = {"DMS_PASSPHRASE": PASSPHRASE, "DMS_BENCHMARK_STEP_S": BENCHMARK_STEP_S}
# Fast heartbeats; a lost relay (or bootstrap) dialed again every 2 s, not 10.
CONFIG = "heartbeat_s = 0.5\nreconnect_interval_s = 2\n"
NATED = ("prov1", "prov2", "owner")


@pytest.fixture
def nat(tmp_path: Path) -> Iterator[NatTopology]:
    with NatTopology(tmp_path, env=dict(ENV)) as topology:
        # Homes as 'dms init' makes them, keys sealed at the tests' scrypt cost: every
        # 'dms run' start and every command below that signs (the waits poll 'dms peers
        # list' and 'peers self' for seconds) opens them (tests.clitools.TEST_SCRYPT_N).
        for role in ("relay", *NATED):
            init_home_quick(topology.home(role))
            config = CONFIG + ("relay = true\n" if role == "relay" else "")
            (topology.home(role) / "config.toml").write_text(config)
        onboard = ("onboard", "--cpu", "1", "--ram", "1", "--disk", "1")
        for done in side_by_side(
            lambda r=r: topology.dms(r, *onboard, timeout=120) for r in ("prov1", "prov2")
        ):
            assert done.returncode == 0, done.stderr
        yield topology


def start_all(nat: NatTopology) -> dict[str, NsDaemon]:
    """The relay, then the three NATed nodes side by side, bootstrapping from it."""
    relay = nat.daemon("relay")
    boot = relay.info["addrs"][0]
    started = side_by_side(lambda r=r: nat.daemon(r, "--bootstrap", boot) for r in NATED)
    return {"relay": relay, **dict(zip(NATED, started, strict=True))}


def relayed_addrs(nat: NatTopology, role: str) -> list[str]:
    lines = nat.dms(role, "peers", "self").stdout.splitlines()
    return [line for line in lines if "/p2p-circuit/" in line]


def test_nated_providers_are_private_and_reached_through_the_relay(nat: NatTopology) -> None:
    daemons = start_all(nat)
    for role in ("prov1", "prov2", "owner"):
        wait_for(lambda r=role: relayed_addrs(nat, r), 30, f"{role}'s relayed address")
        said = nat.dms(role, "peers", "self").stdout
        assert "reachability: private" in said and "0.0.0.0" not in said
    assert "reachability: public" in nat.dms("relay", "peers", "self").stdout
    # The NATed owner cannot dial a NATed provider directly; it pings it through the relay.
    prov1 = daemons["prov1"].info["peer_id"]

    def owner_knows_relayed_prov1() -> bool:
        rows = nat.dms_json("owner", "peers", "list")
        return any(
            r["peer_id"] == prov1 and any("/p2p-circuit/" in a for a in r.get("addrs", []))
            for r in rows
        )

    wait_for(owner_knows_relayed_prov1, 30, "prov1's relayed address at the owner")
    done = nat.dms("owner", "peers", "ping", prov1)
    assert done.returncode == 0, done.stderr

    # Over the relayed connection both sides try DCUtR: the routers drop unsolicited
    # packets (no reset), so the simultaneous TCP open goes through and the path
    # becomes direct.
    def path_to_prov1() -> str:
        rows = nat.dms_json("owner", "peers", "list")
        return next((r.get("path", "") for r in rows if r["peer_id"] == prov1), "")

    wait_for(lambda: path_to_prov1() == "direct", 60, "a hole-punched direct connection")


def test_mining_from_a_nated_owner_on_two_nated_providers(nat: NatTopology) -> None:
    daemons = start_all(nat)

    def both_providers_placeable() -> bool:
        rows = nat.dms_json("owner", "peers", "list")
        return (
            sum(
                1
                for r in rows
                if r.get("onboarded", {}).get("cpu") == 1.0
                and any("/p2p-circuit/" in a for a in r.get("addrs", []))
            )
            == 2
        )

    wait_for(both_providers_placeable, 45, "both providers' relayed addresses at the owner")
    placed, local = nat.root / "placed", nat.root / "local"
    args = ["mine", "skmeans", "--data", str(IRIS), "--k", "3"]
    done = nat.dms("owner", *args, "--shards", "2", "--out", str(placed), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert nat.dms("owner", *args, "--out", str(local), "--local").returncode == 0
    assert (placed / "labels.csv").read_text() == (local / "labels.csv").read_text()
    result = json.loads((placed / "result.json").read_text())
    peers = {p["peer_id"] for p in result["placement"]}
    assert peers == {daemons["prov1"].info["peer_id"], daemons["prov2"].info["peer_id"]}
    # Neither provider can be dialed from the owner's NAT: each shard ran relayed, or
    # direct once hole punching upgraded the connection.
    assert {p["path"] for p in result["placement"]} <= {"relayed", "direct"}, result["placement"]


def test_a_provider_whose_router_drops_its_mappings_is_reached_again(
    nat: NatTopology,
) -> None:
    """prov1's router forgets its NAT mappings (a reboot): its connection to the relay,
    and so its reservation and the owner's relayed path to it, are dead. prov1 redials
    the relay, reserves again, and the owner reaches it through the relay again."""
    nat.env["DMS_HOLE_PUNCHING"] = "false"  # the owner's only path to prov1: the relay
    daemons = start_all(nat)
    prov1 = daemons["prov1"].info["peer_id"]
    wait_for(lambda: relayed_addrs(nat, "prov1"), 30, "prov1's relayed address")
    wait_for(
        lambda: nat.dms("owner", "peers", "ping", prov1).returncode == 0,
        45,
        "a ping from the owner to prov1 through the relay",
    )
    log = nat.root / "prov1.log"

    def reservations() -> int:
        return log.read_text().count("reserved a relay slot")

    before = reservations()
    assert before >= 1
    nat.drop_mappings("prov1")
    wait_for(lambda: reservations() > before, 120, "prov1's reservation made again")
    wait_for(
        lambda: nat.dms("owner", "peers", "ping", prov1).returncode == 0,
        60,
        "a ping from the owner to prov1 through the relay again",
    )
    said = nat.dms("prov1", "peers", "self").stdout
    assert "reachability: private" in said and relayed_addrs(nat, "prov1")


@pytest.mark.slow  # about two minutes: the job waits out the providers' heartbeats
def test_a_relay_that_dies_mid_job_ends_the_job_with_the_reason(nat: NatTopology) -> None:
    """Hole punching off: every byte goes through the relay. The relay dies while the
    job runs: the job does not hang; it completes (it had finished) or fails and says
    why (its providers are gone or unreachable)."""
    nat.env["DMS_HOLE_PUNCHING"] = "false"
    daemons = start_all(nat)

    def placeable() -> bool:
        rows = nat.dms_json("owner", "peers", "list")
        return sum(1 for r in rows if r.get("onboarded", {}).get("cpu") == 1.0) == 2

    wait_for(placeable, 45, "both providers at the owner")
    args = ["mine", "skmeans", "--data", str(IRIS), "--k", "3", "--shards", "2"]
    job = subprocess.Popen(
        ["ip", "netns", "exec", nat.ns("owner"), sys.executable, "-m", "dms", *args,
         "--out", str(nat.root / "placed")],
        env={**nat.env_for("owner"), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert job.stdout is not None
    for line in job.stdout:
        if "shipping" in line or "running on" in line:
            daemons["relay"].kill()
            break
    _, err = job.communicate(timeout=600)
    # Measured: the relay was also the gossip hub, so the providers' heartbeats stop
    # reaching the owner: the job fails, saying the providers are gone.
    if job.returncode != 0:
        # Or, when the relay dies before every bid is in, the bid rounds time out.
        reasons = ("the provider is gone", "unreachable", "no reply from")
        assert any(reason in err for reason in reasons), err[-2000:]


@pytest.mark.slow  # two relays, a placed job, one relay killed mid-job
def test_a_relay_that_dies_mid_job_is_replaced_by_the_second_relay(tmp_path: Path) -> None:
    """Two public relays; the providers and the owner hold a reservation on each, so
    each provider advertises two relayed addresses. Hole punching off: every byte goes
    through a relay. The first relay (also the first bootstrap) is killed while the job
    ships its data: the job goes on through the second relay and completes with the
    labels of --local."""
    roles = ("prov1", "prov2", "owner")
    env = {**ENV, "DMS_HOLE_PUNCHING": "false"}
    with NatTopology(tmp_path, env=env, public=("relay", "relay2"), nated=roles) as nat:
        for role in ("relay", "relay2", *roles):
            assert nat.dms(role, "init").returncode == 0
            relay = "relay = true\n" if role.startswith("relay") else ""
            (nat.home(role) / "config.toml").write_text(CONFIG + relay)
        for role in ("prov1", "prov2"):
            done = nat.dms(role, "onboard", "--cpu", "1", "--ram", "1", "--disk", "1",
                           timeout=120)  # fmt: skip
            assert done.returncode == 0, done.stderr
        first = nat.daemon("relay")
        second = nat.daemon("relay2", "--bootstrap", first.info["addrs"][0])
        boots = [a for d in (first, second) for a in ("--bootstrap", d.info["addrs"][0])]
        daemons = {role: nat.daemon(role, *boots) for role in roles}
        relays = {first.info["peer_id"], second.info["peer_id"]}

        def relays_of(row: dict[str, Any]) -> set[str]:
            circuits = [a for a in row.get("addrs", []) if "/p2p-circuit/" in a]
            return {a.split("/p2p-circuit/")[0].rsplit("/p2p/", 1)[1] for a in circuits}

        def both_providers_on_both_relays() -> bool:
            rows = nat.dms_json("owner", "peers", "list")
            ready = [
                r for r in rows
                if r.get("onboarded", {}).get("cpu") == 1.0 and relays_of(r) == relays
            ]  # fmt: skip
            return len(ready) == 2

        wait_for(both_providers_on_both_relays, 90, "both providers with two relayed addresses")
        args = ["mine", "skmeans", "--data", str(IRIS), "--k", "3", "--shards", "2"]
        placed, local = nat.root / "placed", nat.root / "local"
        job = subprocess.Popen(
            ["ip", "netns", "exec", nat.ns("owner"), sys.executable, "-m", "dms", *args,
             "--out", str(placed)],
            env={**nat.env_for("owner"), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert job.stdout is not None
        for line in job.stdout:
            if "shipping" in line or "running on" in line:
                first.kill()
                break
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
        alone = [*args[:-2], "--out", str(local), "--local"]
        assert nat.dms("owner", *alone).returncode == 0
        assert (placed / "labels.csv").read_text() == (local / "labels.csv").read_text()
        result = json.loads((placed / "result.json").read_text())
        peers = {p["peer_id"] for p in result["placement"]}
        assert peers <= {daemons["prov1"].info["peer_id"], daemons["prov2"].info["peer_id"]}
