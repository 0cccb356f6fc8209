"""Providers behind real NATs (network namespaces, masquerading routers): reachability,
relayed addresses, a placed mining job through relays. Root only: skipped elsewhere,
with the reason (dms.sim.netns.unavailable)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dms.sim.netns import NatTopology, NsDaemon, unavailable
from tests.clitools import PASSPHRASE
from tests.conftest import wait_for

IRIS = Path("examples/iris-features.csv").resolve()
WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no NAT topology: {WHY_NOT}")


@pytest.fixture
def nat(tmp_path: Path) -> Iterator[NatTopology]:
    with NatTopology(tmp_path, env={"DMS_PASSPHRASE": PASSPHRASE}) as topology:
        for role in ("relay", "prov1", "prov2", "owner"):
            assert topology.dms(role, "init").returncode == 0
            config = "heartbeat_s = 0.5\n" + ("relay = true\n" if role == "relay" else "")
            (topology.home(role) / "config.toml").write_text(config)
        for role in ("prov1", "prov2"):
            done = topology.dms(role, "onboard", "--cpu", "1", "--ram", "1", "--disk", "1",
                                timeout=120)  # fmt: skip
            assert done.returncode == 0, done.stderr
        yield topology


def start_all(nat: NatTopology) -> dict[str, NsDaemon]:
    relay = nat.daemon("relay")
    boot = relay.info["addrs"][0]
    out = {"relay": relay}
    for role in ("prov1", "prov2", "owner"):
        out[role] = nat.daemon(role, "--bootstrap", boot)
    return out


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
